"""`esa compare`: how far the top-k sets of several result folders agree.

Runs are compared weight by weight (param, expert, row, col), so every folder must come from the
same model: the top-k sets of two different models share no weights, and matching them by
(layer, component) position would compare unrelated numbers. Such folders are refused with the
reason. Different metrics, modes, k and seeds on one model are what this command is for.
Runs that scored different components (a metric may score only down-projections) are also
compared on the components both scored, since the others' top-k can never meet there.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from esa_core import criteria
from esa_core.errors import EsaError
from esa_core.layout import COMPARISON, COMPARISON_HEATMAP, MANIFEST, TOP_WEIGHTS, read_json
from esa_core.results import atomic_write_bytes, prepare_out_dir, write_json
from esa_core.stability import JACCARD_NOTE, jaccard, rank_correlation

SAME_MODEL_KEYS = ("id", "n_params")


@dataclass
class RunTop:
    """One result folder's top-k weights: their identities and scores, and what produced them."""

    label: str
    folder: Path
    model: dict[str, Any]
    config: dict[str, Any]
    weights: list[tuple[str, str, str, str]]  # (param, expert, row, col)
    scores: dict[tuple[str, str, str, str], float]
    component: dict[tuple[str, str, str, str], str]  # each selected weight's component
    scope: frozenset[str] | None  # the components the run scored; None where unrecorded


def read_run(folder: Path) -> RunTop:
    """Read a result folder's manifest and top_weights.csv, or say what is missing."""
    folder = Path(folder)
    for name in (MANIFEST, TOP_WEIGHTS):
        if not (folder / name).is_file():
            raise EsaError(f"{folder} is not an ESA result folder: {name} is missing.")
    manifest = read_json(folder / MANIFEST)
    with open(folder / TOP_WEIGHTS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    weights = [(r["param"], r["expert"], r["row"], r["col"]) for r in rows]
    scores = {w: float(r["score"]) for w, r in zip(weights, rows)}
    component = {w: r["component"] for w, r in zip(weights, rows)}
    scope = manifest.get("metric", {}).get("components")
    return RunTop(folder.name, folder, manifest["model"], manifest["config"], weights, scores,
                  component, frozenset(scope) if scope else None)


def _labels(runs: list[RunTop]) -> None:
    """Folder names, made unique with their parent folder where two share a name."""
    names = [r.folder.name for r in runs]
    for r in runs:
        if names.count(r.folder.name) > 1:
            r.label = f"{r.folder.parent.name}/{r.folder.name}"
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):
        if labels.count(r.label) > 1:
            r.label = f"{i + 1}:{r.label}"


def _same_model(runs: list[RunTop]) -> None:
    first = runs[0]
    for r in runs[1:]:
        differs = [k for k in SAME_MODEL_KEYS if r.model.get(k) != first.model.get(k)]
        if differs:
            raise EsaError(
                f"cannot compare {first.folder} ({first.model.get('id')}, "
                f"{first.model.get('model_type')}) with {r.folder} ({r.model.get('id')}, "
                f"{r.model.get('model_type')}): they come from different models "
                f"({', '.join(differs)} differ), whose top-k sets share no weights. "
                "Compare runs of one model.")


def _common_scope(a: RunTop, b: RunTop) -> frozenset[str] | None:
    """The components both runs scored, where their scopes differ; None where they agree."""
    if a.scope is None or b.scope is None or a.scope == b.scope:
        return None
    return a.scope & b.scope


def compare(folders: list[Path]) -> dict[str, Any]:
    """comparison.json: pairwise Jaccard of top-k sets and rank correlation on shared weights."""
    if len(folders) < 2:
        raise EsaError("esa compare needs at least two result folders.")
    runs = [read_run(f) for f in folders]
    _same_model(runs)
    _labels(runs)
    n = len(runs)
    matrix = np.eye(n)
    pairs = []
    for i, j in combinations(range(n), 2):
        a, b = runs[i], runs[j]
        shared = [w for w in a.weights if w in b.scores]
        value = jaccard(set(a.weights), set(b.weights))
        matrix[i, j] = matrix[j, i] = value
        rho = rank_correlation(np.array([a.scores[w] for w in shared]),
                               np.array([b.scores[w] for w in shared])) if shared else None
        pair = {"a": a.label, "b": b.label, "jaccard": value, "shared": len(shared),
                "spearman_shared": rho}
        common = _common_scope(a, b)
        if common is not None:
            pair["common_components"] = sorted(common)
            pair["jaccard_common_components"] = jaccard(
                {w for w in a.weights if a.component[w] in common},
                {w for w in b.weights if b.component[w] in common})
        pairs.append(pair)
    result = {
        "runs": [{"label": r.label, "folder": str(r.folder), "metric": r.config.get("metric"),
                  "mode": r.config.get("mode"), "topk": r.config.get("topk"),
                  "seeds": r.config.get("seeds"), "n_selected": len(r.weights)} for r in runs],
        "model": {k: runs[0].model.get(k) for k in ("id", "model_type", "n_params")},
        "labels": [r.label for r in runs],
        "jaccard_matrix": matrix.tolist(),
        "jaccard_note": JACCARD_NOTE,
        "pairs": pairs,
        "spearman_note": "Spearman correlation of the two runs' scores over the weights both "
                         "selected (null with fewer than two); scores of different metrics "
                         "differ in scale, their order is what is compared.",
        "scope_note": "where two runs scored different components, `jaccard` still counts "
                      "every selected weight and `jaccard_common_components` counts only the "
                      "weights of the components both runs scored.",
    }
    result["success_criteria"] = criteria.consistency(result["jaccard_matrix"])
    return result


def matrix_text(result: dict[str, Any]) -> str:
    """The Jaccard matrix as a table with numbered rows, and the numbers' legend."""
    labels, matrix = result["labels"], result["jaccard_matrix"]
    head = "Jaccard  " + "  ".join(f"{i + 1:>5}" for i in range(len(labels)))
    lines = [head] + [f"{i + 1:>7}  " + "  ".join(f"{v:5.3f}" for v in row)
                      for i, row in enumerate(matrix)]
    lines += [f"  {i + 1}: {label}" for i, label in enumerate(labels)]
    for p in result["pairs"]:
        if "jaccard_common_components" in p:
            a, b = labels.index(p["a"]) + 1, labels.index(p["b"]) + 1
            lines.append(f"  {a} vs {b} on the components both scored "
                         f"({', '.join(p['common_components'])}): "
                         f"{p['jaccard_common_components']:.3f}")
    return "\n".join(lines)


def write_comparison(folders: list[Path], out_dir: Path, overwrite: bool) -> dict[str, Any]:
    """Compare the folders and write comparison.json and the heatmap into `out_dir`."""
    from esa_core.plots import comparison_heatmap  # matplotlib only when a figure is drawn

    result = compare(folders)
    out_dir = prepare_out_dir(Path(out_dir), overwrite)
    write_json(out_dir / COMPARISON, result)
    atomic_write_bytes(out_dir / COMPARISON_HEATMAP, comparison_heatmap(result))
    return result
