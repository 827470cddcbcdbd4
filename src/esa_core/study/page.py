"""study.html and the study's figures, drawn from study.json alone (the same style as a run's
report: one self-contained page, figures embedded as base64, no fetch allowed)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

from esa_core.plots import OKABE_ITO, STYLE, png_bytes
from esa_core.report import CSS, _table, criteria_table
from esa_core.results import atomic_write_bytes, atomic_write_text

FIGURES_DIR = "figures"
CAPTIONS = {
    "consistency_heatmap.png": "Pairwise Jaccard of the metrics' top-k sets, one panel per "
                               "model and dataset.",
    "depth_profile.png": "Share of the top-k score mass by normalised depth (layer / number of "
                         "layers), one line per model.",
    "scaling.png": "Heavy-tail index (Hill) and excess kurtosis of the scores against the "
                   "number of parameters (log axis), one line per metric and dataset.",
}


def figures(found: dict[str, Any]) -> dict[str, bytes]:
    """Every figure the study's data allows, as PNG bytes by file name."""
    makers: dict[str, Callable[[dict[str, Any]], Figure | None]] = {
        "consistency_heatmap.png": consistency_heatmap, "depth_profile.png": depth_profile,
        "scaling.png": scaling}
    out = {}
    with rc_context(STYLE):
        for name, make in makers.items():
            fig = make(found)
            if fig is not None:
                out[name] = png_bytes(fig)
    return out


def _title(fixed: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in fixed.items()) or "all cells"


def _panels(n: int, width: float = 4.2, height: float = 3.6) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def consistency_heatmap(found: dict[str, Any]) -> Figure | None:
    groups = found["consistency"].get("groups", [])
    if not groups:
        return None
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        matrix = np.array(g["jaccard"], dtype=float)
        image = ax.imshow(matrix, vmin=0, vmax=1)
        ticks = range(len(g["metrics"]))
        ax.set_xticks(ticks, g["metrics"], rotation=30, ha="right")
        ax.set_yticks(ticks, g["metrics"])
        for i in ticks:
            for j in ticks:
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                        color="white" if matrix[i, j] < 0.5 else "black")
        ax.set_title(_title(g["fixed"]))
    fig.colorbar(image, ax=axes, shrink=0.8, label="Jaccard of top-k sets")
    fig.suptitle("Consistency across metrics")
    return fig


def _by_rest(rows: list[dict[str, Any]], axis: str = "model") -> dict[str, list[dict]]:
    """Rows grouped by every grid value but `axis` (one panel or line each)."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        rest = {k: v for k, v in row["values"].items() if k != axis}
        out.setdefault(_title(rest), []).append(row)
    return out


def depth_profile(found: dict[str, Any]) -> Figure | None:
    groups = {title: [r for r in rows if r["depth_profile"]]
              for title, rows in _by_rest(found["scaling"]["rows"]).items()}
    groups = {title: rows for title, rows in groups.items() if rows}
    if not groups:
        return None
    fig, axes = _panels(len(groups))
    for ax, (title, rows) in zip(axes, groups.items()):
        for i, row in enumerate(sorted(rows, key=lambda r: r["n_params"] or 0)):
            p = row["depth_profile"]
            ax.plot(p["depth"], [s or 0.0 for s in p["share"]], marker="o", markersize=3,
                    color=OKABE_ITO[i % len(OKABE_ITO)],
                    label=f"{row['model']} ({row['n_params']:,})")
        ax.set_xlim(-0.02, 1.0)
        ax.set_xlabel("normalised depth (layer / layers)")
        ax.set_ylabel("share of top-k score mass")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Where the top-k mass lies, by depth")
    return fig


def scaling(found: dict[str, Any]) -> Figure | None:
    lines = {t: sorted(rows, key=lambda r: r["n_params"] or 0)
             for t, rows in _by_rest(found["scaling"]["rows"]).items()
             if len({r["n_params"] for r in rows}) > 1}
    if not lines:
        return None
    fig, (tail, kurt) = _panels(2)
    for i, (title, rows) in enumerate(lines.items()):
        style = dict(marker="o", color=OKABE_ITO[i % len(OKABE_ITO)], label=title)
        x = [r["n_params"] for r in rows]
        tail.plot(x, [r["hill_tail_index"] for r in rows], **style)
        kurt.plot(x, [r["excess_kurtosis"] for r in rows], **style)
    for ax, label in ((tail, "Hill tail index (lower: heavier)"), (kurt, "excess kurtosis")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("Scaling with model size")
    return fig


def write(found: dict[str, Any], folder: Path) -> Path:
    """Save the figures under figures/ and write study.html beside study.json."""
    pngs = figures(found)
    for name, data in pngs.items():
        atomic_write_bytes(folder / FIGURES_DIR / name, data)
    path = folder / "study.html"
    atomic_write_text(path, page(found, pngs))
    return path


def _figure(name: str, pngs: dict[str, bytes]) -> str:
    if name not in pngs:
        return ""
    data = base64.b64encode(pngs[name]).decode("ascii")
    return (f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption><code>"
            f"{FIGURES_DIR}/{name}</code>: {CAPTIONS[name]}</figcaption></figure>")


def page(found: dict[str, Any], pngs: dict[str, bytes]) -> str:
    name = escape(found["name"])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>ESA study: {name}</title><style>{CSS}</style></head><body>",
        f"<h1>ESA study: {name}</h1>",
        f"<p class='note'>{len(found['cells'])} cells: "
        + " × ".join(f"{escape(k)} ({len(v)})" for k, v in found["grid"].items()) + "</p>",
        "<h2>Summary</h2><ul>" + "".join(f"<li>{escape(line)}</li>"
                                         for line in found["summary"]) + "</ul>",
    ]
    if found["success_criteria"]:
        parts.append("<h2>Success criteria</h2>" + criteria_table(found["success_criteria"]))
    parts += [_consistency(found["consistency"], pngs), _domains(found["domains"]),
              _scaling(found["scaling"], pngs), _architecture(found["architecture"]),
              "<h2>Cells</h2>", _table(
                  ["cell", "model", "parameters", "metric", "dataset", "top-k rows", "report"],
                  [[c["name"], c["model"], c["n_params"], c["metric"], c["dataset"], c["n_top"],
                    f"{c['folder']}/report.html"] for c in found["cells"]]),
              "</body></html>\n"]
    return "\n".join(parts)


def _matrix(labels: list[str], matrix: list[list[float | None]]) -> str:
    return _table(["", *labels], [[label, *row] for label, row in zip(labels, matrix)])


def _consistency(section: dict[str, Any], pngs: dict[str, bytes]) -> str:
    out = ["<h2>Consistency across metrics</h2>"]
    if "skipped" in section:
        return out[0] + f"<p class='note'>Not compared: {escape(section['skipped'])}.</p>"
    for g in section["groups"]:
        out.append(f"<h3>{escape(_title(g['fixed']))}</h3><div class='grid'><div>Jaccard"
                   f"{_matrix(g['metrics'], g['jaccard'])}</div><div>Spearman"
                   f"{_matrix(g['metrics'], g['spearman'])}</div></div>")
    out.append(f"<p class='note'>{escape(section['groups'][0]['spearman_note'])}</p>")
    out.append(_figure("consistency_heatmap.png", pngs))
    return "\n".join(out)


def _domains(section: dict[str, Any]) -> str:
    out = ["<h2>Domain dependence</h2>"]
    if "skipped" in section:
        return out[0] + f"<p class='note'>Not compared: {escape(section['skipped'])}.</p>"
    for g in section["groups"]:
        only = ", ".join(f"{n} only in {d}" for d, n in g["only_in_one"].items())
        critical = g.get("critical_weights")
        out.append(f"<h3>{escape(_title(g['fixed']))}</h3>{_matrix(g['datasets'], g['jaccard'])}"
                   f"<p>{g['domain_general']} weights in every domain's top-k "
                   f"(domain-general); {escape(only)}."
                   + ("" if not critical else " Critical weights: "
                      + ("the same in every domain." if critical["same"] else "they differ."))
                   + "</p>")
    return "\n".join(out)


def _scaling(section: dict[str, Any], pngs: dict[str, bytes]) -> str:
    rows = section["rows"]
    components = sorted({c for r in rows for c in r["component_share"]})
    table = _table(
        ["model", "parameters", "metric", "dataset", "tail index", "kurtosis", "critical",
         *components],
        [[r["model"], r["n_params"], r["metric"], r["dataset"], r["hill_tail_index"],
          r["excess_kurtosis"], (r.get("critical_weights") or {}).get("count"),
          *(r["component_share"].get(c) for c in components)] for r in rows])
    tables: dict[str, dict[str, Any]] = {}  # each metric's findings, as the metric declared them
    for r in rows:
        for name, t in (r.get("findings") or {}).items():
            entry = tables.setdefault(name, {"title": t["title"], "columns": t["columns"],
                                             "rows": []})
            entry["rows"] += [[r["model"], r["metric"], r["dataset"],
                               *(d.get(c) for c in t["columns"]), d["depth"]] for d in t["rows"]]
    return "\n".join([
        "<h2>Scaling</h2>", table,
        "<p class='note'>Component columns: share of the top-k score mass.</p>",
        _figure("depth_profile.png", pngs), _figure("scaling.png", pngs),
        *(f"<h3>{escape(t['title'])}</h3>" + _table(
            ["model", "metric", "dataset", *t["columns"], "depth"], t["rows"])
          for t in tables.values() if t["rows"])])


def _architecture(section: dict[str, Any]) -> str:
    return "<h2>Architecture</h2>" + _table(
        ["model", "model type", "architecture", "cell", "top-k mass in experts",
         "Gini over experts", "Spearman vs router load"],
        [[r["model"], r["model_type"], r["architecture"], _title(r["values"]),
          r["expert_share"], r.get("expert_gini"), r.get("spearman_mass_vs_router_load")]
         for r in section["rows"]])
