"""Running a study's cells: in turn in this process, N at once in worker processes
(concurrent.futures), or as one Slurm array job through submitit (study.slurm).

Every executor runs `cells.run_cell`, which decides on disk whether a cell is skipped, resumed
or started, so a rerun after any stop (Ctrl-C, kill, pre-emption) picks up where it was.
A worker process keeps the model it loaded for its next cell of the same model.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from esa_core.errors import EsaError, unknown_choice
from esa_core.plugins import Registry
from esa_core.study.cells import (
    FAILED,
    SKIPPED,
    differences,
    is_complete,
    refuse_changed,
    run_cell,
    say,
)
from esa_core.study.spec import Cell, Study

LOCAL, SLURM = "local", "slurm"
EXECUTORS = (LOCAL, SLURM)
STUDY_JSON = "study.json"

_worker_stack = ExitStack()  # a worker process keeps loaded models for its whole life


def announce(outcome: dict[str, Any], count: int) -> dict[str, Any]:
    """The cell's end line: `cell 4/18 NAME: done, 12.3 s` (or why it failed)."""
    head = f"cell {outcome['index']}/{count} {outcome['name']}"
    if outcome["status"] == SKIPPED:
        say(f"{head}: complete already, skipped")
    elif outcome["status"] == FAILED:
        say(f"{head}: failed after {outcome['elapsed_s']:.1f} s: {outcome['error']}")
    else:
        say(f"{head}: done, {outcome['elapsed_s']:.1f} s")
    return outcome


def run_local(cells: list[Cell], folder: Path, count: int, jobs: int, overwrite: bool,
              verbose: bool) -> list[dict[str, Any]]:
    """`--executor local`: the cells in turn (jobs=1, in this process), or `jobs` at once."""
    from esa_core import loading

    if jobs == 1:
        with loading.keep_loaded():
            return [announce(run_cell(cell, folder, count, overwrite, verbose), count)
                    for cell in cells]
    # each worker gets its share of the cores; spawn, not fork: torch's threads do not fork
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_cell, cell, folder, count, overwrite, verbose)
                   for cell in cells]
        try:
            outcomes = [announce(f.result(), count) for f in as_completed(futures)]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # running cells stop on the signal
            raise
    return sorted(outcomes, key=lambda o: o["index"])


def _start_worker(threads: int) -> None:
    import torch

    from esa_core import loading

    torch.set_num_threads(threads)
    _worker_stack.enter_context(loading.keep_loaded())


def run_study(study: Study, folder: Path, *, executor: str = LOCAL, jobs: int = 1,
              overwrite: bool = False, verbose: bool = False,
              slurm: dict[str, Any] | None = None, registry: Registry | None = None,
              cluster=None) -> dict[str, Any]:
    """Bring every cell to complete with the chosen executor, then write study.json and
    study.html from the cells' files. `cluster`: a submitit executor to use instead of Slurm
    (the tests pass submitit's LocalExecutor). Returns study.json's content."""
    from esa_core.plugins import registry as default_registry
    from esa_core.results import check_writable, write_json
    from esa_core.study import answer, page

    registry = registry or default_registry()
    folder = Path(folder).absolute()  # worker processes and array tasks may start elsewhere
    if executor not in EXECUTORS:
        raise unknown_choice("executor", executor, EXECUTORS)
    if jobs < 1:
        raise EsaError(f"--jobs must be a positive integer; got {jobs}.")
    if executor == SLURM:
        from esa_core.study import slurm as slurm_module

        slurm_module.require()  # before anything runs: the extra is missing
    check_writable(folder)
    if not overwrite:
        refuse_changed(study.cells, folder, study.file)
    count = len(study.cells)
    todo = []
    for cell in study.cells:
        if is_complete(cell, folder) and differences(cell, folder) == []:
            announce({"index": cell.index, "name": cell.name, "status": SKIPPED}, count)
        else:
            todo.append(cell)
    # cells of one model side by side, so a process's kept model serves the next cell
    todo.sort(key=lambda c: (str(c.settings.get("model")), c.index))
    if executor == SLURM:
        backend = cluster or slurm_module.slurm_executor(folder, **(slurm or {}))
        outcomes = slurm_module.run_array(backend, todo, folder, count, overwrite, verbose)
    else:
        outcomes = run_local(todo, folder, count, jobs, overwrite, verbose)
    failed = [o for o in outcomes if o["status"] == FAILED]
    if failed:
        raise EsaError(f"{len(failed)} of {count} cells failed (first: {failed[0]['name']}: "
                       f"{failed[0]['error']}); fix it and run the study again: complete cells "
                       "are kept.")
    found = answer.answer(study, folder, registry)
    write_json(folder / STUDY_JSON, found)
    page.write(found, folder)
    return found
