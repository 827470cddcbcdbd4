"""One cell on disk: is it complete with the study's settings, and running it (fresh, resumed,
or started over). `run_cell` is what every executor runs, in this process or another one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from esa_core.errors import EsaError
from esa_core.layout import MANIFEST, read_json
from esa_core.resume import comparable
from esa_core.study.spec import Cell

COMPLETE = "complete"
SKIPPED, FAILED = "skipped", "failed"


def differences(cell: Cell, folder: Path) -> list[str] | None:
    """How the cell's settings differ from those its folder's run used ([] when the same);
    None when the folder holds no run. A setting the study leaves to the device (seq_len None:
    128 on a CPU, 512 on a GPU) matches what the run resolved it to."""
    path = cell.folder(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        before = comparable(read_json(path).get("config", {}))
    except (OSError, ValueError):
        return None  # a torn manifest (killed while writing): nothing to keep
    wanted = comparable(cell.config(folder).to_dict())
    return [f"{key} {before.get(key)!r} -> {value!r}" for key, value in sorted(wanted.items())
            if value is not None and before.get(key) != value]


def is_complete(cell: Cell, folder: Path) -> bool:
    path = cell.folder(folder) / MANIFEST
    try:
        return path.is_file() and read_json(path).get("status") == COMPLETE
    except (OSError, ValueError):
        return False


def refuse_changed(cells: list[Cell], folder: Path, study_file: Path) -> None:
    """A complete cell whose settings the study file changed is refused (one line), unless
    the user passes --overwrite: its results would silently stop matching the file."""
    for cell in cells:
        changed = differences(cell, folder)
        if changed and is_complete(cell, folder):
            raise EsaError(f"study {study_file}: cell {cell.name} is complete with other "
                           f"settings ({'; '.join(changed)}); pass --overwrite to run it again.")


def say(line: str) -> None:
    """One progress line, written whole: worker processes share the study's stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_cell(cell: Cell, folder: Path, count: int, overwrite: bool = False,
             verbose: bool = False) -> dict[str, Any]:
    """Bring one cell to complete: skip it if it is, resume it if it was interrupted with the
    same settings, else (re)start it. Returns its outcome; a failure is caught and returned,
    so that one broken cell does not stop the others. An interrupt (Ctrl-C, SIGTERM, a
    scheduler's pre-emption) propagates: the cell's manifest says `interrupted`."""
    from esa_core import loading, pipeline, progress
    from esa_core.guards import terminate_as_interrupt

    outcome: dict[str, Any] = {"index": cell.index, "name": cell.name}
    changed = differences(cell, folder)
    complete = is_complete(cell, folder)
    if complete and not changed:
        return {**outcome, "status": SKIPPED, "elapsed_s": 0.0}
    resume = changed == [] and not complete
    if complete and not overwrite:
        raise EsaError(f"cell {cell.name} is complete with other settings; pass --overwrite.")
    say(f"cell {cell.index}/{count} {cell.name}: {'resuming' if resume else 'starting'}")
    start = time.perf_counter()
    config = cell.config(folder, resume=resume, overwrite=not resume)
    try:
        with terminate_as_interrupt(), progress.shown(verbose):
            pipeline.run(config, argv=["esa", "study", f"cells/{cell.name}"])
    except EsaError as exc:
        loading.forget_loaded()
        return {**outcome, "status": FAILED, "error": str(exc),
                "elapsed_s": round(time.perf_counter() - start, 3)}
    except Exception as exc:
        from esa_core import unexpected

        loading.forget_loaded()  # the weights may not have been restored
        exc.esa_out_dir = getattr(exc, "esa_out_dir", cell.folder(folder))
        return {**outcome, "status": FAILED,
                "error": unexpected.one_line(exc, unexpected.write_log(exc), None),
                "elapsed_s": round(time.perf_counter() - start, 3)}
    return {**outcome, "status": COMPLETE, "elapsed_s": round(time.perf_counter() - start, 3)}
