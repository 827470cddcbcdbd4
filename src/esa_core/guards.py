"""Ways a long run ends badly, turned into an end that is recorded and explained.

SIGTERM (`kill`, a scheduler's time limit) is raised like Ctrl-C, so the manifest records the
interruption; out-of-memory becomes a one-line error naming the flags that lower memory.
SIGKILL cannot be caught: the manifest then still says `running`, and `--resume` continues.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from esa_core.errors import EsaError, PluginFailure

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
MEMORY_FLAGS = ("a smaller --batch-size, fewer --max-samples, --gradient-checkpointing, "
                "--accum-dtype bf16, or --device-map auto (spread the model over several GPUs)")


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM); handled like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (in the main thread, where signals land)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def out_of_memory_help(stage: str) -> Iterator[None]:
    """Turn an out-of-memory error in `stage` into advice the user can act on."""
    try:
        yield
    except OUT_OF_MEMORY as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EsaError(f"out of memory during {stage} ({first}). Try {MEMORY_FLAGS}.") from exc


def plugin_call(failed: str, fn, *args, **kwargs):
    """`fn(*args)`, a plugin's code, whose crash becomes one line: `failed` and the cause.

    An EsaError is already explained; out of memory is the run's size, not the plugin's fault.
    """
    try:
        return fn(*args, **kwargs)
    except (EsaError, OUT_OF_MEMORY):
        raise
    except Exception as exc:
        raise PluginFailure(f"{failed}: {type(exc).__name__}: {exc}") from exc
