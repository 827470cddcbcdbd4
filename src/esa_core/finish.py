"""The last step of a run: figures and report from the result files, then `status: complete`.

A folder whose manifest says complete holds every file the run promises, so the manifest is
the last file written. The figures and the report are drawn from the files alone (as `esa
report` does), so a run that failed while drawing or writing them (a full disk, say) is
finished by `--resume` from its folder, without loading the model or recomputing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from esa_core import distributed, layout, plots, report
from esa_core.api import LogicalMatrix
from esa_core.layout import MANIFEST
from esa_core.results import write_json
from esa_core.selection import Picks, Selection

#: the stages that only draw and write from the result files
STAGES = ("plots", "report")
#: what a resumed run drops from the interrupted record it continues
FAILURE_KEYS = ("error", "failed_stage")


def only_finishing_left(previous: dict[str, Any] | None) -> bool:
    """Did the interrupted run fail after every result file was written?"""
    return bool(previous) and previous.get("failed_stage") in STAGES


def write_outputs(out_dir: Path, manifest: dict[str, Any], save_plots: bool,
                  stage: Callable[[str], AbstractContextManager[None]],
                  final: Callable[[], dict[str, Any]]) -> None:
    """Draw the figures (into plots/ with `save_plots`), write report.html, then the manifest
    updated with `final()` (status, timings, finish time): in that order, so that `complete`
    is never on disk before the files it vouches for.
    """
    write_json(out_dir / MANIFEST, {**manifest, "status": "running"})  # what the figures read
    with stage("plots"):
        # under torchrun only rank 0 wrote the files; the other ranks have nothing to draw
        figures = plots.render(layout.RunFiles.read(out_dir)) if distributed.is_main() else None
        if save_plots and figures is not None:
            figures.save(out_dir / layout.PLOTS)
    with stage("report"):
        done = {**manifest, **final()}
        if figures is not None:  # the page shows the final status and timings
            files = layout.RunFiles.read(out_dir)
            files.manifest = done
            report.write(files, figures)
        write_json(out_dir / MANIFEST, done)
    manifest.update(done)


def selection_of(rows: list[dict[str, Any]]) -> Selection:
    """The selection that top_weights.csv lists, one Picks per matrix in file order."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["param"], row["layer"], row["component"], row["expert"]),
                           []).append(row)
    return Selection([
        Picks(LogicalMatrix(*key),
              torch.tensor([r["row"] for r in picked], dtype=torch.int64),
              torch.tensor([r["col"] for r in picked], dtype=torch.int64),
              torch.tensor([r["score"] for r in picked], dtype=torch.float64))
        for key, picked in grouped.items()])
