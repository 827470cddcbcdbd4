"""`--executor slurm`: the cells as one Slurm array job, through submitit (the `[cluster]` extra).

Each array task runs one cell. A pre-empted or timed-out task is requeued by submitit
(`Checkpointable`) with the same arguments, and `run_cell` resumes the cell from its folder.
The tests hand `run_array` submitit's LocalExecutor, which runs the same pickled tasks in local
processes, as the stand-in for a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esa_core.errors import EsaError
from esa_core.study.cells import FAILED, run_cell
from esa_core.study.execute import announce
from esa_core.study.spec import Cell

try:
    import submitit
except ImportError:  # the CLI says which extra to install before anything runs
    submitit = None

LOGS = "slurm"  # under the study folder: submitit's pickles and each task's stdout/stderr
POLL_S = 5.0


def require() -> None:
    if submitit is None:
        raise EsaError("--executor slurm needs submitit: pip install 'esa-toolkit[cluster]'.")


class CellTask(submitit.helpers.Checkpointable if submitit else object):
    """One array task: one cell. On pre-emption submitit resubmits it as it was called."""

    def __call__(self, cell: Cell, folder: Path, count: int, overwrite: bool,
                 verbose: bool) -> dict[str, Any]:
        return run_cell(cell, folder, count, overwrite, verbose)


def slurm_executor(folder: Path, partition: str | None, gpus_per_node: int | None,
                   time_min: int | None, array_parallelism: int | None):
    """A SlurmExecutor with the study's --slurm-* settings (None: Slurm's own default)."""
    require()
    executor = submitit.SlurmExecutor(folder=Path(folder) / LOGS)
    given = {"partition": partition, "gpus_per_node": gpus_per_node, "time": time_min,
             "array_parallelism": array_parallelism, "job_name": "esa-study"}
    executor.update_parameters(**{k: v for k, v in given.items() if v is not None})
    return executor


def run_array(executor, cells: list[Cell], folder: Path, count: int, overwrite: bool,
              verbose: bool, poll_s: float = POLL_S) -> list[dict[str, Any]]:
    """Submit the cells as one array (`map_array`) and wait, one line per finished cell."""
    require()
    n = len(cells)
    try:
        jobs = executor.map_array(CellTask(), cells, [Path(folder)] * n, [count] * n,
                                  [overwrite] * n, [verbose] * n)
    except (OSError, submitit.core.utils.FailedJobError) as exc:
        raise EsaError(f"could not submit the study's array job: {exc}. Run --executor slurm "
                       "on a machine with Slurm's sbatch, or use --executor local.") from None
    if jobs:
        array = jobs[0].job_id.split("_")[0]
        announce_submitted = f"submitted {n} cells as array job {array}; logs in {executor.folder}"
        print(announce_submitted, flush=True)
    by_job = {job.job_id: cell for job, cell in zip(jobs, cells)}
    outcomes = []
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll_s):
        cell = by_job[job.job_id]
        try:
            outcome = job.result()
        except Exception as exc:  # the task itself died (out of memory, node failure, ...)
            first = str(exc).strip().splitlines()
            outcome = {"index": cell.index, "name": cell.name, "status": FAILED,
                       "elapsed_s": 0.0, "error": f"array task {job.job_id} failed: "
                       f"{first[-1] if first else type(exc).__name__} (its log: "
                       f"{job.paths.stderr})"}
        outcomes.append(announce(outcome, count))
    return sorted(outcomes, key=lambda o: o["index"])
