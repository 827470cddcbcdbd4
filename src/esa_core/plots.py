"""Figures of a result folder, drawn from its files alone: never from the model.

`esa report RUN_DIR` and the pipeline's plots stage both call `render`, so a finished folder can
be re-plotted anywhere, in seconds. One style for every figure (Okabe-Ito colours, cividis maps,
titles naming model, metric and k); PNGs carry no timestamp or version, so the same results give
the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects, rc_context, ticker
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from esa_core.layout import (
    COMPONENTS,
    CONDITION_LABELS,
    FIGURES,
    NOTHING_KEPT,
    RANDOM_K,
    RANDOM_K_REPEATS,
    RunFiles,
)
from esa_core.results import atomic_write_bytes

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
             "#000000")
DPI = 150
MARKED_RANKS = 10  # the heatmap numbers the cells holding the 10 highest-ranked weights
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "figure.titlesize": 11,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": False,
    "grid.color": "#dddddd", "grid.linewidth": 0.6, "legend.fontsize": 8,
    "legend.frameon": False, "image.cmap": "cividis", "savefig.dpi": DPI,
    "svg.hashsalt": "esa", "path.simplify": True,
}


@dataclass
class Figures:
    """Rendered PNGs by file name, and for each figure not drawn the reason why."""

    png: dict[str, bytes] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def save(self, plots_dir: Path) -> list[Path]:
        paths = []
        for name, data in self.png.items():
            atomic_write_bytes(plots_dir / name, data)
            paths.append(plots_dir / name)
        return paths


def render(run: RunFiles) -> Figures:
    """Every figure the folder's files allow; the rest skipped with a reason."""
    makers: dict[str, Callable[[RunFiles], Figure | str]] = dict(zip(FIGURES, (
        sensitivity_heatmap, weight_distribution, stability_analysis, perturbation_effects,
        ablation_effects, protection_effects)))
    figures = Figures()
    with rc_context(STYLE):
        for name, make in makers.items():
            made = make(run)
            if isinstance(made, str):
                figures.skipped[name] = made
            else:
                figures.png[name] = png_bytes(made)
    return figures


def png_bytes(fig: Figure) -> bytes:
    """PNG without the Software/creation metadata, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


# --------------------------------------------------------------------------- heatmap


def _row_key(component: str, expert: int | None) -> tuple:
    order = COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)
    return order, component, -1 if expert is None else expert


@dataclass
class HeatmapGrid:
    """Rows (component, expert), columns (layer), and per-cell max, top-k mean and count."""

    rows: list[tuple[str, int | None]]
    layers: list[int | None]
    peak: np.ndarray
    top_mean: np.ndarray
    count: np.ndarray


def heatmap_grid(stats: dict[str, Any], top: list[dict[str, Any]]) -> HeatmapGrid:
    """The heatmap's numbers: max from the stats, top-k mean and count from top_weights.csv."""
    entries = list(stats["per_layer"].values())
    rows = sorted({(e["component"], e["expert"]) for e in entries},
                  key=lambda r: _row_key(*r))
    layers = sorted({e["layer"] for e in entries}, key=lambda v: (v is None, v or 0))
    row_of = {r: i for i, r in enumerate(rows)}
    col_of = {v: i for i, v in enumerate(layers)}
    shape = (len(rows), len(layers))
    peak, sums, count = np.full(shape, np.nan), np.zeros(shape), np.zeros(shape, int)
    for e in entries:
        peak[row_of[(e["component"], e["expert"])], col_of[e["layer"]]] = e["max"]
    for w in top:
        where = (row_of[(w["component"], w["expert"])], col_of[w["layer"]])
        sums[where] += w["score"]
        count[where] += 1
    top_mean = np.divide(sums, count, out=np.full(shape, np.nan), where=count > 0)
    return HeatmapGrid(rows, layers, peak, top_mean, count)


def scores_unusable(run: RunFiles) -> str | None:
    """Why the score figures cannot be drawn, if they cannot: no statistics, or non-finite
    scores (stored as null in JSON, nan in the CSV), which no log axis or colour map can place."""
    if run.stats is None:
        return "sensitivity_stats.json is missing"
    peak = run.stats.get("global", {}).get("max")
    if not (isinstance(peak, (int, float)) and math.isfinite(peak)) or not all(
            math.isfinite(w["score"]) for w in run.top):
        return "the scores are not finite (NaN or infinite): there is nothing to draw"
    return None


def sensitivity_heatmap(run: RunFiles) -> Figure | str:
    """Layers across, components (x experts) down; per-matrix max and top-k mean, log colour."""
    if unusable := scores_unusable(run):
        return unusable
    grid = heatmap_grid(run.stats, run.top)
    rows, layers, count = grid.rows, grid.layers, grid.count
    height = 0.22 * len(rows) + 1.3
    fig = Figure(figsize=(11, 2 * height + 0.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    k = run.config.get("topk", "?")
    per_layer = run.config.get("mode") == "per_layer"
    panels = [(axes[0], grid.peak, "max score of each matrix"),
              (axes[1], grid.top_mean, f"mean score of the top-{k} weights in each matrix"
               if per_layer else f"mean score of the global top-{k} weights in each matrix "
               "(numbers: how many; blank: none)")]
    for ax, values, label in panels:
        positive = np.where(values > 0, values, np.nan)
        if np.isfinite(positive).any():
            norm = LogNorm(np.nanmin(positive), np.nanmax(positive))
            image = ax.imshow(np.ma.masked_invalid(positive), aspect="auto", norm=norm,
                              interpolation="nearest")
            fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04).set_label(
                f"{run.config.get('metric', 'score')} score (log)")
        ax.set_facecolor("#eeeeee")
        ax.set_title(label, loc="left")
        _label_rows(ax, rows)
        ax.set_ylabel("component" + (" · expert" if any(e is not None for _, e in rows) else ""))
    _mark_ranks(axes[0], run.top, {r: i for i, r in enumerate(rows)},
                {v: i for i, v in enumerate(layers)})
    if not per_layer:
        _write_counts(axes[1], count)
    axes[1].set_xticks(range(len(layers)), [("—" if v is None else str(v)) for v in layers],
                       fontsize=7 if len(layers) > 24 else 8)
    axes[1].set_xlabel("transformer layer (— = outside the blocks)" if None in layers
                       else "transformer layer")
    fig.suptitle(f"Where the sensitive weights are: {run.title()}")
    return fig


def _label_rows(ax, rows: list[tuple[str, int | None]]) -> None:
    labels = [c if e is None else f"{c} e{e}" for c, e in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7 if len(rows) > 16 else 8)
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:  # a white rule between components
            ax.axhline(i - 0.5, color="white", linewidth=1.5)


def _mark_ranks(ax, top: list[dict[str, Any]], row_of: dict, col_of: dict) -> None:
    """Number the cells that hold the highest-ranked weights (best rank; + when several)."""
    marked: dict[tuple[int, int], list[int]] = {}
    for w in sorted(top, key=lambda w: w["rank"])[:MARKED_RANKS]:
        marked.setdefault((row_of[(w["component"], w["expert"])], col_of[w["layer"]]),
                          []).append(w["rank"])
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for (r, c), ranks in marked.items():
        ax.text(c, r, f"{ranks[0]}" + ("+" if len(ranks) > 1 else ""), ha="center",
                va="center", color="white", fontsize=7, fontweight="bold", path_effects=outline)
    if marked:
        ax.set_title(f"numbers: cells holding the {MARKED_RANKS} highest-ranked weights "
                     "(best rank, + = more of them)", loc="right", fontsize=7, color="#444444")


def _write_counts(ax, count: np.ndarray) -> None:
    for r, c in zip(*np.nonzero(count)):
        ax.text(c, r, str(count[r, c]), ha="center", va="center", fontsize=6, color="white",
                path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])


# --------------------------------------------------------------------------- distributions


def weight_distribution(run: RunFiles) -> Figure | str:
    """CCDF of the scores (global, per component) with the tail fit; |w| of top-k vs all."""
    if unusable := scores_unusable(run):
        return unusable
    glob = run.stats["global"]
    if "ccdf" not in glob:
        return "sensitivity_stats.json has no ccdf (written by an older ESA)"
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax, hist = fig.subplots(1, 2, width_ratios=(1.35, 1))
    # the whole model underneath, wide and pale, so the components stay visible on top of it
    _ccdf_line(ax, glob["ccdf"], color="#bbbbbb", lw=4.5, label="all scored weights")
    for i, (comp, c) in enumerate(sorted(run.stats.get("per_component", {}).items(),
                                         key=lambda kv: _row_key(kv[0], None))):
        alpha = c.get("hill_tail_index")
        _ccdf_line(ax, c["ccdf"], color=OKABE_ITO[i % 7], lw=1.2,
                   linestyle="-" if i < 7 else "--",
                   label=f"{comp} (α={alpha:.2f})" if alpha else comp)
    _hill_fit(ax, glob)
    _thresholds(ax, run)
    ax.set_xscale("log")
    ax.set_yscale("log")
    # from where the bulk starts to fall (CCDF 0.99) to the largest score; one weight's share
    scores, fractions = np.asarray(glob["ccdf"]["score"]), np.asarray(
        glob["ccdf"]["fraction_at_least"])
    bulk = scores[(fractions <= 0.99) & (scores > 0)]
    if len(bulk):
        ax.set_xlim(bulk.min() / 3, glob["max"] * 3)
    ax.set_ylim(0.3 / glob["count"], 2)
    ax.grid(True, which="major")
    ax.set_xlabel(f"{run.config.get('metric', 'score')} score (log)")
    ax.set_ylabel("fraction of weights with score ≥ x (CCDF)")
    ax.set_title("score distribution, complementary CDF", loc="left")
    # a CCDF falls from the top left to the bottom right: the lower left stays empty
    ax.legend(loc="lower left", ncols=2 if len(run.stats.get("per_component", {})) > 5 else 1)
    _weight_histogram(hist, run)
    fig.suptitle(f"Score and weight distributions: {run.title()}")
    return fig


def _ccdf_line(ax, ccdf: dict, **style: Any) -> None:
    x, p = np.asarray(ccdf["score"], float), np.asarray(ccdf["fraction_at_least"], float)
    keep = x > 0
    ax.plot(x[keep], p[keep], drawstyle="steps-post", **style)


def _hill_fit(ax, glob: dict) -> None:
    """The fitted power law P(S >= x) = p_m (x / x_m)^-alpha over the tail it was fitted on."""
    alpha, m, n = glob.get("hill_tail_index"), glob.get("hill_order_statistics"), glob["count"]
    if not alpha:
        return
    ranks = np.asarray(glob["ccdf"]["fraction_at_least"]) * n
    scores = np.asarray(glob["ccdf"]["score"])
    anchor = int(np.argmin(np.abs(ranks - m)))
    x0, p0 = scores[anchor], ranks[anchor] / n
    x = np.geomspace(x0, glob["max"], 50)
    ax.plot(x, p0 * (x / x0) ** -alpha, color=OKABE_ITO[3], lw=1.6, linestyle=":",
            label=f"Hill fit, top {m:,} scores: α = {alpha:.2f}")


def _thresholds(ax, run: RunFiles) -> None:
    """The top-k cut: one line (global mode) or the range of the per-matrix cuts (per_layer)."""
    if not run.top:
        return
    k = run.config.get("topk", "?")
    if run.config.get("mode") == "per_layer":
        cuts: dict[tuple, float] = {}
        for w in run.top:
            key = (w["layer"], w["component"], w["expert"])
            cuts[key] = min(cuts.get(key, math.inf), w["score"])
        values = np.asarray(sorted(cuts.values()))
        ax.axvspan(values[0], values[-1], color="#999999", alpha=0.18, lw=0,
                   label=f"top-{k} cut of each matrix (range)")
        ax.axvline(float(np.median(values)), color="#555555", lw=1, linestyle="--",
                   label=f"median cut {np.median(values):.3g}")
    else:
        cut = min(w["score"] for w in run.top)
        ax.axvline(cut, color="#555555", lw=1, linestyle="--", label=f"top-{k} cut {cut:.3g}")


def _weight_histogram(ax, run: RunFiles) -> None:
    hist = run.stats.get("weight_abs_histogram") if run.stats else None
    if hist is None:
        ax.text(0.5, 0.5, "no |w| histogram in sensitivity_stats.json", ha="center",
                transform=ax.transAxes)
        return
    edges = np.asarray(hist["bin_edges"])
    counts = np.asarray(hist["counts"], float)
    ax.stairs(counts / max(hist["count"], 1), edges, color="black", lw=1.4,
              label=f"all scored weights (n={hist['count']:,})")
    if run.top:
        mags = np.abs([w["weight"] for w in run.top])
        top_counts, _ = np.histogram(mags, edges)
        ax.stairs(top_counts / len(mags), edges, color=OKABE_ITO[3], lw=1.4, fill=False,
                  label=f"top-k weights (n={len(mags):,})")
    used = np.nonzero(counts)[0]
    if len(used):
        ax.set_xlim(edges[max(used[0] - 2, 0)], edges[min(used[-1] + 3, len(edges) - 1)])
    ax.set_xscale("log")
    ax.set_xlabel("|w| (weight magnitude, log)")
    ax.set_ylabel("share of weights per 0.1-decade bin")
    ax.set_title("|w| of the top-k vs all weights", loc="left")
    ax.legend(loc="upper left")


# --------------------------------------------------------------------------- stability


def stability_analysis(run: RunFiles) -> Figure | str:
    """Seed x seed Jaccard matrix with values, and overlap as a function of k."""
    s = run.stability
    if s is None:
        return "stability_summary.json is missing (run with --stability-check and 2+ --seeds)"
    seeds = s.get("seeds") or run.config.get("seeds", [])
    pairs = s.get("pairs") or list(combinations(seeds, 2))
    if len(pairs) != len(s["jaccard_all"]):
        return "stability_summary.json: jaccard_all does not match the seed pairs"
    matrix = jaccard_matrix(seeds, pairs, s["jaccard_all"])
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.3))
    jaccard_panel(left, matrix, [str(seed) for seed in seeds], "Jaccard |A∩B| / |A∪B|", 3)
    left.set_xlabel("seed")
    left.set_ylabel("seed")
    k = s.get("topk", run.config.get("topk"))
    left.set_title(f"Jaccard of top-{k} sets: mean {s['jaccard_mean']:.3f} "
                   f"± {s['jaccard_std']:.3f}", loc="left")
    _overlap_vs_k(right, s, k)
    fig.suptitle(f"Stability across calibration seeds ({s['num_seeds']} seeds): {run.title()}")
    return fig


def jaccard_panel(ax, matrix: np.ndarray, labels: list[str], label: str, decimals: int) -> None:
    """A matrix of Jaccard values (0 to 1) with each value written in its cell."""
    image = ax.imshow(matrix, vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.{decimals}f}", ha="center", va="center", fontsize=9,
                color="black" if value > 0.6 else "white")
    long = max(map(len, labels)) > 6  # folder names, not seeds: slanted so they do not overlap
    ax.set_xticks(range(len(labels)), labels, rotation=35 if long else 0,
                  ha="right" if long else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.spines[:].set_visible(False)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label(label)


def comparison_heatmap(result: dict[str, Any]) -> bytes:
    """`esa compare`'s Jaccard matrix of the runs' top-k sets, as a PNG in the figures' style."""
    labels = result["labels"]
    with rc_context(STYLE):
        fig = Figure(figsize=(2.2 + 1.1 * len(labels), 1.8 + 1.0 * len(labels)),
                     layout="constrained")
        ax = fig.subplots()
        jaccard_panel(ax, np.array(result["jaccard_matrix"]), labels, "Jaccard of top-k sets", 2)
        ax.set_title(f"Top-k overlap: {result['model']['id']}", loc="left")
        return png_bytes(fig)


def jaccard_matrix(seeds: list[int], pairs: list, values: list[float]) -> np.ndarray:
    """The symmetric seed x seed matrix of the pairwise values (1 on the diagonal)."""
    index = {seed: i for i, seed in enumerate(seeds)}
    matrix = np.eye(len(seeds))
    for (a, b), value in zip(pairs, values):
        matrix[index[a], index[b]] = matrix[index[b], index[a]] = value
    return matrix


def _overlap_vs_k(ax, s: dict, k: Any) -> None:
    """overlap_vs_k: a list of {k, jaccard_mean, jaccard_std, ...} or a {k: overlap} map."""
    curve = s.get("overlap_vs_k")
    if not curve:
        ax.text(0.5, 0.5, "no overlap_vs_k in stability_summary.json", ha="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    if isinstance(curve, dict):
        points = sorted((int(kk), {"jaccard_mean": v}) for kk, v in curve.items())
    else:
        points = sorted((int(p["k"]), p) for p in curve)
    ks = np.asarray([kk for kk, _ in points])
    mean = np.asarray([p["jaccard_mean"] for _, p in points], float)
    std = np.asarray([p.get("jaccard_std") or 0.0 for _, p in points], float)
    ax.errorbar(ks, mean, yerr=std, marker="o", color=OKABE_ITO[0], capsize=3,
                label="mean pairwise Jaccard (± SD over pairs)")
    if all("topk_union_size" in p for _, p in points):
        every = [p["topk_overlap_size"] / p["topk_union_size"] if p["topk_union_size"] else 1.0
                 for _, p in points]
        ax.plot(ks, every, marker="s", color=OKABE_ITO[1], linestyle="--",
                label="in every seed's top-k / in any seed's")
    if k is not None:
        ax.axvline(float(k), color="#555555", lw=1, linestyle=":", label=f"this run's k = {k}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(v) for v in ks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.grid(True)
    ax.set_xlabel("k (weights selected" + (" per matrix)" if s.get("mode") == "per_layer"
                                            else ")"))
    ax.set_ylabel("overlap (fraction)")
    ax.set_title("overlap of the seeds' top-k sets as k grows", loc="left")
    ax.legend(loc="lower right")


# --------------------------------------------------------------------------- perturbation


def perturbation_sections(p: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(title, results) per perturbation type: one for the classic shape, one per type for
    several (`by_perturbation`)."""
    if p is None:
        return []
    if "by_perturbation" in p:
        return [(f"Perturbation: {name}", section)
                for name, section in p["by_perturbation"].items()]
    return [(f"Perturbation: {p.get('perturbation', {}).get('name', '?')}", p)]


def perturbation_effects(run: RunFiles) -> Figure | str:
    """Each declared measure's change per condition: mean ± SD, every seed, the random-k noise
    band; one row of panels per perturbation type."""
    sections = [(t, p) for t, p in perturbation_sections(run.perturbation)
                if any(isinstance(p.get(n), dict) for n in CONDITION_LABELS)]
    if run.perturbation is None:
        return "perturbation_results.json is missing (run with --perturb)"
    if not sections:
        return "perturbation_results.json holds no condition"
    measures = sections[0][1].get("measures", [])
    if not measures:
        return "perturbation_results.json declares no measures (written by an older ESA)"
    fig = Figure(figsize=(5.5 * len(measures), 4.2 * len(sections) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(sections), len(measures), squeeze=False))
    for row, (title, p) in enumerate(sections):
        names = [n for n in CONDITION_LABELS if isinstance(p.get(n), dict)]
        for ax, m in zip(axes[row], measures):
            key = m["change_name"]
            how = "relative change" if m["change"] == "relative" else "difference"
            ax.set_ylabel(f"{key} ({how}; > 0 is worse)")
            ax.set_title(f"{title.removeprefix('Perturbation: ')}: {key}", loc="left")
            _condition_panel(ax, p, names, key, 1.0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    base = sections[0][1].get("baseline", {})
    baseline = ", ".join(f"{m['name']} {base[m['name']]:.4g}" for m in measures
                         if isinstance(base.get(m["name"]), float))
    fig.suptitle(f"perturbing the top-k weights vs controls: {run.title()}\nbaseline {baseline}")
    return fig


def ablation_effects(run: RunFiles) -> Figure | str:
    """Measured harm of removing each candidate alone against its score rank."""
    entry = run.manifest.get("ablation")
    if not entry or not run.ablation:
        return "ablation.csv is missing (run with --ablate-top N)"
    ratio_key = f"{entry['measure']}_ratio"
    if ratio_key not in run.ablation[0]:
        return f"the primary measure {entry['measure']} has no ratio column"
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    x = [r["score_rank"] for r in run.ablation]
    y = [r[ratio_key] if isinstance(r[ratio_key], float) else math.nan for r in run.ablation]
    ax.plot(x, y, "o", color=OKABE_ITO[0], ms=6, label="one weight removed alone")
    for r in run.ablation:
        if r[ratio_key] is None:
            ax.annotate("non-finite", (r["score_rank"], 1), xycoords=("data", "axes fraction"),
                        ha="center", va="top", fontsize=7)
    ax.axhline(entry["critical_ratio"], color=OKABE_ITO[1], ls="--",
               label=f"critical ratio {entry['critical_ratio']:g}")
    for w in entry["critical_weights"]:
        if w["ratio"] is not None:
            ax.annotate(f"{w['param'].removesuffix('.weight')}[{w['row']}, {w['col']}]",
                        (w["score_rank"], w["ratio"]), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("score rank (top_weights.csv)")
    ax.set_ylabel(f"{ratio_key} = {entry['measure']} ablated / baseline")
    ax.grid(True, axis="y")
    ax.legend(loc="upper right")
    rho = entry.get("spearman_score_vs_effect")
    fig.suptitle(f"removing each top weight alone: {run.title()}\nSpearman(score, effect) = "
                 + ("-" if rho is None else f"{rho:.3f}")
                 + f" over {entry['candidates']} weights, {entry['eval_blocks']} blocks")
    return fig


def protection_effects(run: RunFiles) -> Figure | str:
    """The damage the rule leaves against the number of weights kept, one line per kept set
    (mean ± SD over seeds), on a log x axis; keeping nothing is the dashed line to beat."""
    p = run.protection
    if p is None:
        return "protection_results.json is missing (run with --protect RULE)"
    measures = p["measures"]
    names = [n for n in CONDITION_LABELS if isinstance(p.get(n), list)]
    fig = Figure(figsize=(5.5 * len(measures), 4.6), layout="constrained")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, m in zip(axes, measures):
        key = m["change_name"]
        nothing = p[NOTHING_KEPT].get(key)
        values = [0.0] + ([nothing] if nothing is not None else [])
        if nothing is not None:
            ax.axhline(nothing, color="black", ls="--", lw=1, label="nothing kept")
        ax.axhline(0, color="#888888", lw=0.8)
        for color, name in zip(OKABE_ITO, names):
            rows = p[name]
            y = [math.nan if r.get(key) is None else r[key] for r in rows]
            sd = [r["std"].get(key) or 0.0 for r in rows]
            values += [v for v in y if math.isfinite(v)]
            ax.errorbar([r["k"] for r in rows], y, yerr=sd if len(p["seeds"]) > 1 else None,
                        marker="o", ms=5, capsize=4, color=color, label=CONDITION_LABELS[name])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("weights kept " + ("per matrix" if p["mode"] == "per_layer"
                                         else "in total") + " (log)")
        how = "relative change" if m["change"] == "relative" else "difference"
        ax.set_ylabel(f"{key} ({how}; > 0 is worse)")
        _fit_y(ax, values)
        ax.grid(True, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    rule = p["rule"]
    options = ", ".join(f"{k}={v}" for k, v in rule.items() if k != "name")
    fig.suptitle(f"{rule['name']} ({options}) on every scored matrix, the kept weights exact: "
                 f"{run.title()}")
    return fig


def _seed_values(condition: dict, key: str, unit: float) -> list[float | None]:
    return [None if t.get(key) is None else unit * t[key] for t in condition.get("per_seed", [])]


def _condition_panel(ax, p: dict, names: list[str], key: str, unit: float) -> None:
    band = _noise_band(p, key, unit)
    if band is not None:
        low, high, n = band
        ax.axhspan(low, high, color="#999999", alpha=0.25, lw=0,
                   label=f"noise band: random-k draws, mean ± 2 SD (n={n})")
    ax.axhline(0, color="black", lw=0.8)
    finite_all: list[float] = []
    for x, name in enumerate(names):
        color = OKABE_ITO[x]
        values = _seed_values(p[name], key, unit)
        finite = [v for v in values if v is not None and math.isfinite(v)]
        finite_all += finite
        offsets = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else [0.0]
        for off, v in zip(offsets, values):
            if v is None:  # the model's outputs became non-finite: draw at the top edge
                ax.annotate("non-finite", (x + off, 1), xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7, color=color)
            else:
                ax.plot(x + off, v, "o", mfc="none", mec=color, ms=5, zorder=3)
        if finite:
            mean = float(np.mean(finite))
            std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
            ax.errorbar(x, mean, yerr=std, fmt="D", color=color, ms=7, capsize=5, zorder=4,
                        elinewidth=1.5)
    ax.plot([], [], "D", color="#555555", label="mean ± SD over seeds")
    ax.plot([], [], "o", mfc="none", mec="#555555", label="one seed")
    ax.set_xticks(range(len(names)), [CONDITION_LABELS[n] for n in names])
    ax.set_xlim(-0.6, len(names) - 0.4)
    _fit_y(ax, finite_all + [0.0] + ([band[0], band[1]] if band else []))
    ax.grid(True, axis="y")


def _noise_band(p: dict, key: str, unit: float) -> tuple[float, float, int] | None:
    """What perturbing k random weights does across draws: the floor a real effect must clear."""
    if not isinstance(p.get(RANDOM_K), dict):
        return None
    draws = _seed_values(p[RANDOM_K], key, unit) + [
        None if t.get(key) is None else unit * t[key] for t in p.get(RANDOM_K_REPEATS, [])]
    draws = [v for v in draws if v is not None and math.isfinite(v)]
    if not draws:
        return None
    mean = float(np.mean(draws))
    spread = 2 * float(np.std(draws, ddof=1)) if len(draws) > 1 else 0.0
    return mean - spread, mean + spread, len(draws)


def _fit_y(ax, values: list[float]) -> None:
    """Room for every point; a symmetric log axis where values span over two decades."""
    low, high = min(values), max(values)
    mags = np.abs([v for v in values if v != 0])
    if len(mags) and mags.max() / mags.min() > 100:
        linthresh = float(10 ** math.floor(math.log10(mags.min())))
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_title(f"symmetric log axis, linear within ±{linthresh:g}", loc="right",
                     fontsize=7, color="#444444")
        ax.set_ylim(low * 4 if low < -linthresh else -linthresh,
                    high * 4 if high > linthresh else linthresh)
    else:
        pad = 0.08 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
