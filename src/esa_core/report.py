"""report.html: one self-contained page that tells a run's story, from its result folder alone.

Images are embedded as base64 and a Content-Security-Policy forbids every fetch, so the page
opens offline, mailed or archived, exactly as written.
"""

from __future__ import annotations

import base64
import shlex
from html import escape
from pathlib import Path
from typing import Any

from esa_core.analysis import with_interval
from esa_core.layout import (
    CONDITION_LABELS,
    CONDITIONS,
    CSV_COLUMNS,
    FIGURES,
    NOTHING_KEPT,
    PLOTS,
    REPORT,
    SENSITIVITY_STATS,
    RunFiles,
)
from esa_core.plots import Figures, perturbation_sections, render
from esa_core.results import atomic_write_text

TOP_ROWS = 20
TERMINAL_ROWS = 20  # marked rows of a findings table printed; the rest are in the file
CAPTIONS = dict(zip(FIGURES, (
    "Where the sensitive weights are: per-matrix maximum score and "
    "mean score of the selected weights, by layer and component.",
    "Score distribution (complementary CDF, log-log) with the top-k "
                               "cut and the fitted tail index; |w| of the selected weights "
                               "versus all scored weights.",
    "Agreement of the seeds' top-k sets: pairwise Jaccard, and "
                              "overlap as k grows.",
    "Damage done by perturbing the top-k weights versus the control sets, one panel per "
    "measure, every seed shown.",
    "Each candidate removed alone: the measured effect against its score rank, with the "
    "critical ratio and the Spearman correlation of score and effect.",
    "The --protect rule applied to every scored matrix: the damage left against the number of "
    "weights kept exact, one line per kept set; the dashed line keeps nothing.",
)))
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
max-width:1150px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 9px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;
font-variant-numeric:tabular-nums}code,pre{font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;word-break:break-all}
.PASS{background:#d7f0e6;font-weight:600}.FAIL{background:#f9dccf;font-weight:600}
.other{background:#eeeeee}figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption,.note{color:#555;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:0 32px}
"""


def build(folder: str | Path, save_plots: bool = True) -> Path:
    """`esa report`: re-draw the figures (into plots/ when `save_plots`) and write report.html."""
    run = RunFiles.read(folder)
    figures = render(run)
    if save_plots:
        figures.save(run.folder / PLOTS)
    return write(run, figures)


def write(run: RunFiles, figures: Figures) -> Path:
    path = run.folder / REPORT
    atomic_write_text(path, page(run, figures))
    return path


def page(run: RunFiles, figures: Figures) -> str:
    m = run.manifest
    status = m.get("status", "unknown")
    stage = m.get("last_completed_stage")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>ESA report: {escape(run.title())}</title><style>{CSS}</style></head><body>",
        f"<h1>ESA report: {escape(run.title())}</h1>",
        f"<p class='note'>status <b>{escape(str(status))}</b>"
        + (f" (last completed stage: {escape(str(stage))})" if stage else "")
        + f" · ESA {escape(str(m.get('esa_version', '?')))} · started "
        f"{escape(str(m.get('started_at', '?')))} · finished "
        f"{escape(str(m.get('finished_at', '?')))}</p>",
        "<h2>Command</h2>", f"<pre>{escape(shlex.join(map(str, m.get('argv', []))))}</pre>",
        _criteria(run),
        "<div class='grid'>",
        _section("Model", m.get("model", {})),
        _section("Data", {**m.get("data", {}), "seeds": ", ".join(m.get("seeds", {}))}),
        _section("Timings (wall seconds)", m.get("timings", {})),
        _section("Environment", m.get("environment", {})),
        "</div>",
        _results(run),
        _ablation(run),
        _protection(run),
        *_findings(run),
        _top_weights(run),
        "<h2>Figures</h2>",
    ]
    for name in FIGURES:
        if name in figures.png:
            data = base64.b64encode(figures.png[name]).decode("ascii")
            parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'>"
                         f"<figcaption><code>plots/{name}</code>: {CAPTIONS[name]}"
                         "</figcaption></figure>")
        else:
            parts.append(f"<p class='note'><code>plots/{name}</code> not drawn: "
                         f"{escape(figures.skipped.get(name, 'not made'))}.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{'-' if value is None else value}</td>"
    if isinstance(value, float):
        return f"<td class='num'>{value:.4g}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value:,}</td>"
    return f"<td>{escape(str(value))}</td>"


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _section(title: str, values: dict[str, Any]) -> str:
    rows = [[k, v] for k, v in values.items() if not isinstance(v, (dict, list))]
    return f"<div><h2>{escape(title)}</h2>{_table(None, rows)}</div>"


def _criteria(run: RunFiles) -> str:
    """The success criteria: the manifest's list, else the control analysis's."""
    rows = run.manifest.get("success_criteria") or (run.control or {}).get("success_criteria")
    if not rows:
        return ("<h2>Success criteria</h2><p class='note'>No success criteria in this result "
                "folder (they come with --stability-check and --perturb ... --controls).</p>")
    return f"<h2>Success criteria</h2>{criteria_table(rows)}"


def criteria_table(rows: list[dict[str, Any]]) -> str:
    """Criterion rows (criteria.check's shape) as a table, the verdict coloured."""
    body = []
    for r in rows:
        verdict = str(r.get("verdict"))
        css = verdict if verdict in ("PASS", "FAIL") else "other"
        body.append("<tr>" + _cell(r.get("criterion")) + _cell(r.get("value"))
                    + _cell(r.get("threshold")) + f"<td class='{css}'>{escape(verdict)}</td>"
                    + _cell(r.get("note")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("criterion", "value", "threshold", "verdict",
                                             "note"))
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _results(run: RunFiles) -> str:
    """The headline numbers of the distribution, stability and perturbation stages."""
    out = []
    if run.stats:
        g = run.stats["global"]
        out.append(_section("Score distribution (all scored weights)", {
            k: g.get(k) for k in ("count", "mean", "std", "max", "excess_kurtosis",
                                  "hill_tail_index", "top1_median_ratio", "heavy_tailed")}))
    if run.stability:
        s = run.stability
        out.append(_section("Stability across seeds", {
            k: s.get(k) for k in ("num_seeds", "jaccard_mean", "jaccard_std",
                                  "topk_overlap_size")}))
    for title, p in perturbation_sections(run.perturbation):
        measures = p.get("measures", [])
        base = p.get("baseline", {})
        rows = [["baseline"] + [v for m in measures for v in (base.get(m["name"]), None)]]
        for name in CONDITIONS:
            if isinstance(p.get(name), dict):
                c = p[name]
                rows.append([name] + [v for m in measures
                                      for v in (c.get(m["name"]), c.get(m["change_name"]))])
        header = ["condition"] + [h for m in measures for h in (m["name"], m["change_name"])]
        out.append(f"<div><h2>{escape(title)} (means over seeds)</h2>"
                   + _table(header, rows) + "</div>")
    if change_rows(run.control):
        out.append("<div><h2>Changes with their intervals over the evaluation items</h2>"
                   + _table(["type", "change", "condition", "value [interval]", "interval"],
                            change_rows(run.control)) + "</div>")
    return f"<div class='grid'>{''.join(out)}</div>" if out else ""


def _top_weights(run: RunFiles) -> str:
    if not run.top:
        return "<h2>Top weights</h2><p class='note'>top_weights.csv is missing.</p>"
    cols = list(CSV_COLUMNS)
    rows = [[w[c] for c in cols] for w in sorted(run.top, key=lambda w: w["rank"])[:TOP_ROWS]]
    return (f"<h2>Top {min(TOP_ROWS, len(run.top))} weights (of {len(run.top):,})</h2>"
            "<p class='note'>the weight is <code>param[row, col]</code>, or "
            "<code>param[expert, row, col]</code> where an expert is given.</p>"
            + _table(cols, rows))


def change_rows(control: dict[str, Any] | None) -> list[list[Any]]:
    """[type, change, condition, value with its interval, what the interval is] for every change
    in control_analysis.json (the type empty for a single perturbation type)."""
    sections = (control or {}).get("by_perturbation") or ({"": control} if control else {})
    # a folder written before intervals existed has none: its rows say so
    return [[kind, key, name, with_interval(change, m.get("intervals", {}).get(name)),
             m.get("interval_note", "no intervals in this result folder")]
            for kind, a in sections.items() for key, m in a.get("measures", {}).items()
            for name, change in m["changes"].items()]


def change_lines(control: dict[str, Any] | None) -> list[str]:
    """Terminal lines: every change of the perturbation study with its interval."""
    rows = change_rows(control)
    if not rows:
        return []
    notes = sorted({r[4] for r in rows})
    cells = [[f"{r[0]} {r[1]}".strip(), r[2], r[3]] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    return ([f"Changes against the baseline ({'; '.join(notes)}):"]
            + [f"  {c[0].ljust(widths[0])}  {c[1].ljust(widths[1])}  {c[2]}" for c in cells])


def findings(manifest: dict[str, Any], stats: dict[str, Any] | None) -> list[str]:
    """Terminal lines: the critical weights of --ablate-top and the metric's findings tables
    (their marked rows, as an aligned table)."""
    lines = []
    ablation = manifest.get("ablation")
    if ablation:
        crit = ablation["critical_weights"]
        lines.append(f"Critical weights (removing one alone multiplies {ablation['measure']} by "
                     f">= {ablation['critical_ratio']:g}; {len(crit)} of "
                     f"{ablation['candidates']} ablated):")
        lines += [f"  {_where(w)}  x{w['ratio']:.3g}  (score rank {w['score_rank']})"
                  if w["ratio"] is not None else f"  {_where(w)}  broken (non-finite)"
                  for w in crit] or ["  none"]
    for table in (stats or {}).get("findings", {}).values():
        lines += _findings_text(table)
    return lines


def _where(w: dict[str, Any]) -> str:
    index = f"{w['row']}, {w['col']}" if w.get("expert") is None else \
        f"{w['expert']}, {w['row']}, {w['col']}"
    return f"{w['param']}[{index}]"


def _ablation(run: RunFiles) -> str:
    entry = run.manifest.get("ablation")
    if not entry or not run.ablation:
        return ""
    cols = list(run.ablation[0])
    rho = entry.get("spearman_score_vs_effect")
    crit = entry["critical_weights"]
    return (f"<h2>Ablation: each of the top {entry['candidates']} weights removed alone</h2>"
            f"<p class='note'>{len(crit)} critical weight(s): removing one alone multiplies "
            f"{escape(entry['measure'])} by &ge; {entry['critical_ratio']:g}. Measured on "
            f"{entry['eval_blocks']} held-out blocks. Spearman correlation of score and "
            f"measured effect: {'-' if rho is None else f'{rho:.3f}'} (does the metric order "
            "the weights as removal does?)</p>" + _table(cols, [list(r.values())
                                                              for r in run.ablation]))


def _marked(table: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The rows a findings table marks (all rows when it marks none), and how many of how many."""
    rows, mark = table["rows"], table.get("mark")
    if mark is None:
        return rows, f"{len(rows)} row(s)"
    marked = [r for r in rows if r[mark]]
    return marked, f"{len(marked)} of {len(rows)} row(s) with {mark}"


def _findings_text(table: dict[str, Any]) -> list[str]:
    """A findings table's title and count, then its marked rows aligned under their columns."""
    marked, count = _marked(table)
    cols = [c["name"] for c in table["columns"] if c["name"] != table.get("mark")]
    cells = [cols] + [[_text(r[c]) for c in cols] for r in marked[:TERMINAL_ROWS]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [f"{table['title']}{_facts(table, ' (', ')')}: {count}"]
    if marked:
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                  for row in cells]
    if len(marked) > TERMINAL_ROWS:
        lines.append(f"  ... {len(marked) - TERMINAL_ROWS} more in {SENSITIVITY_STATS}")
    return lines


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _facts(table: dict[str, Any], before: str = "", after: str = "") -> str:
    """A findings table's facts as `name value, ...` (empty when it has none)."""
    facts = ", ".join(f"{k} {_text(v)}" for k, v in table["facts"].items())
    return f"{before}{facts}{after}" if facts else ""


def _findings(run: RunFiles) -> list[str]:
    """One section per findings table a metric returned, as it declared it."""
    sections = []
    for table in (run.stats or {}).get("findings", {}).values():
        cols = [c["name"] for c in table["columns"]]
        said = "; ".join(filter(None, (table["note"], _facts(table), _marked(table)[1])))
        legend = "; ".join(f"<code>{escape(c['name'])}</code>: {escape(c['help'])}"
                           for c in table["columns"] if c["help"])
        sections.append(f"<h2>{escape(table['title'])}</h2><p class='note'>{escape(said)}</p>"
                        + _table(cols, [[r[c] for c in cols] for r in table["rows"]])
                        + (f"<p class='note'>{legend}</p>" if legend else ""))
    return sections


def _protection(run: RunFiles) -> str:
    """--protect: per kept set and size, every measure, its change and the damage recovered."""
    p = run.protection
    if not p:
        return ""
    measures = p["measures"]
    header = ["kept set", "k", "weights kept"] + [
        h for m in measures for h in (m["name"], m["change_name"], "recovered")]

    def row(label: str, k: Any, c: dict[str, Any]) -> list[Any]:
        shares = c.get("recovered", {})
        return [label, k, c.get("n_kept")] + [
            v for m in measures for v in (c.get(m["name"]), c.get(m["change_name"]),
                                          _percent(shares.get(m["change_name"])))]

    rows = [["unchanged model", None, None] + [v for m in measures
                                               for v in (p["baseline"].get(m["name"]), None,
                                                         None)],
            row("nothing kept", 0, {**p[NOTHING_KEPT], "n_kept": 0})]
    rows += [row(CONDITION_LABELS[name], c["k"], c)
             for name in CONDITION_LABELS if isinstance(p.get(name), list) for c in p[name]]
    rule = ", ".join(f"{k}={v}" for k, v in p["rule"].items() if k != "name")
    per = "per matrix" if p["mode"] == "per_layer" else "in total"
    return (f"<h2>Protection: {escape(p['rule']['name'])} ({escape(rule)}) on every scored "
            f"matrix</h2><p class='note'>{p['matrices']:,} matrices, {p['scored_weights']:,} "
            f"weights; k weights kept exact {per} (prefixes of the top-k ranking; each control "
            "set of the same size); recovered = the share of the damage with nothing kept that "
            f"keeping the set removes. Means over {len(p['seeds'])} seed(s), measured on "
            f"{p['eval']['blocks']} held-out blocks.</p>" + _table(header, rows))


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"
