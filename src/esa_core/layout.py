"""The result folder's layout: every file name, the component and condition names, the readers.

One torch-free module, so that the pipeline that writes a folder and the plots, report and
compare that read it spell every name the same way, and reading needs no model stack.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa_core.errors import EsaError

# --------------------------------------------------------------------------- files of a run
MANIFEST = "experiment_manifest.json"
TOP_WEIGHTS = "top_weights.csv"
SENSITIVITY_STATS = "sensitivity_stats.json"
STABILITY_SUMMARY = "stability_summary.json"
PERTURBATION_RESULTS = "perturbation_results.json"
CONTROL_ANALYSIS = "control_analysis.json"
ABLATION = "ablation.csv"
PROTECTION_RESULTS = "protection_results.json"
PROTECTED_WEIGHTS = "protected_weights.safetensors"
REPORT = "report.html"
PLOTS = "plots"  # the folder of the figures below
ERROR_LOG = "error.log"  # only after an unexpected failure: its traceback
CHECKPOINTS = "checkpoints"  # only while a run is unfinished: the units --resume reuses
FIGURES = ("sensitivity_heatmap.png", "weight_distribution.png", "stability_analysis.png",
           "perturbation_effects.png", "ablation.png", "protection.png")
CSV_COLUMNS = ("rank", "param", "layer", "component", "expert", "row", "col", "score", "weight")

# --------------------------------------------------------------------------- files of `esa compare`
COMPARISON = "comparison.json"
COMPARISON_HEATMAP = "comparison_heatmap.png"

# --------------------------------------------------------------------------- names in the files
#: canonical components, in the order figures and tables show them
COMPONENTS = (
    "attn.q", "attn.k", "attn.v", "attn.o",
    "mlp.gate", "mlp.up", "mlp.down",
    "moe.router", "moe.gate", "moe.up", "moe.down",
    "embed", "lm_head", "other",
)
#: --mode: top-k in every weight matrix, or over the whole model
MODES = ("per_layer", "global")
#: the perturbed top-k set, then the control sets of the same size
SUPER = "super_weights"
RANDOM_K, BOTTOM_K, MAGNITUDE_K = "random_k", "bottom_k", "magnitude_k"
CONTROLS = (RANDOM_K, BOTTOM_K, MAGNITUDE_K)
RANDOM_K_REPEATS = "random_k_repeats"  # --control-repeats: the extra random_k draws
CONDITIONS = (SUPER, *CONTROLS)
CONDITION_LABELS = {SUPER: "super (top-k)", RANDOM_K: "random-k", BOTTOM_K: "bottom-k",
                    MAGNITUDE_K: "magnitude-k"}
#: --protect's condition that keeps no weight: the whole change, the damage to recover from
NOTHING_KEPT = "nothing_kept"


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass
class RunFiles:
    """The files of one result folder; those a run did not write are None (or empty)."""

    folder: Path
    manifest: dict[str, Any]
    stats: dict[str, Any] | None = None
    top: list[dict[str, Any]] = field(default_factory=list)
    stability: dict[str, Any] | None = None
    perturbation: dict[str, Any] | None = None
    control: dict[str, Any] | None = None
    ablation: list[dict[str, Any]] = field(default_factory=list)
    protection: dict[str, Any] | None = None

    @classmethod
    def read(cls, folder: str | Path) -> RunFiles:
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise EsaError(f"{folder} is not an ESA result folder (it has no {MANIFEST}).")

        def optional(name: str) -> dict[str, Any] | None:
            path = folder / name
            return read_json(path) if path.is_file() else None

        return cls(folder, read_json(folder / MANIFEST), optional(SENSITIVITY_STATS),
                   read_top_weights(folder), optional(STABILITY_SUMMARY),
                   optional(PERTURBATION_RESULTS), optional(CONTROL_ANALYSIS),
                   read_ablation(folder), optional(PROTECTION_RESULTS))

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    def title(self) -> str:
        """`model · metric · top-k`, the first line of every figure."""
        model = self.manifest.get("model", {}).get("id", "model")
        k = self.config.get("topk", "?")
        per = " per matrix" if self.config.get("mode") == "per_layer" else " overall"
        return f"{model} · {self.config.get('metric', 'metric')} · top-{k}{per}"


def read_top_weights(folder: Path) -> list[dict[str, Any]]:
    """top_weights.csv as typed rows (layer/expert None where empty); [] if it is missing."""
    path = Path(folder) / TOP_WEIGHTS
    if not path.is_file():
        return []

    def maybe_int(text: str) -> int | None:
        return int(text) if text != "" else None

    with path.open(newline="", encoding="utf-8") as f:
        return [{**row, "rank": int(row["rank"]), "layer": maybe_int(row["layer"]),
                 "expert": maybe_int(row["expert"]), "row": int(row["row"]),
                 "col": int(row["col"]), "score": float(row["score"]),
                 "weight": float(row["weight"])} for row in csv.DictReader(f)]


def read_ablation(folder: Path) -> list[dict[str, Any]]:
    """ablation.csv as rows, numbers parsed, empty cells None; [] if it is missing."""
    path = Path(folder) / ABLATION
    if not path.is_file():
        return []

    def parsed(text: str) -> Any:
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with path.open(newline="", encoding="utf-8") as f:
        return [{k: parsed(v) for k, v in row.items()} for row in csv.DictReader(f)]
