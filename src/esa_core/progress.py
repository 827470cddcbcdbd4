"""Progress a person can follow: a bar on a terminal, periodic lines in a log file.

Large runs live in batch jobs whose stderr is a file, where a tqdm bar stays silent: a
seven-minute run would print nothing until its end. There, each loop prints a line at most
every 30 s and one when it ends (`scoring seed 1337: 200/200 batches, 31.8 s, 6.3 batches/s`),
so the log shows that the run is alive and how fast it goes. `--quiet` turns both off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm.auto import tqdm

from esa_core import distributed

INTERVAL_S = 30.0
clock = time.monotonic
T = TypeVar("T")
_enabled = True


@contextmanager
def shown(on: bool) -> Iterator[None]:
    """Within the block, bars and lines on (the default) or off (`--quiet`)."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def _watched_by_log() -> bool:
    return _enabled and distributed.is_main() and not sys.stderr.isatty()


def note(line: str) -> None:
    """One progress line, where no terminal shows a bar (a log file, a pipe)."""
    if _watched_by_log():
        print(line, file=sys.stderr, flush=True)


def track(items: Iterable[T], desc: str, unit: str, *, final: bool = True) -> Iterator[T]:
    """`items`, with a tqdm bar on a terminal, else a line every INTERVAL_S seconds and
    (with `final`) one when the loop ends; a loop that raises prints no end line.

    `unit` names the items in the plural (`batches`).
    """
    if not (_enabled and distributed.is_main()):
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, unit=unit, leave=False, disable=False)
        return
    items = list(items)
    start = last = now = clock()
    for done, item in enumerate(items, start=1):
        yield item
        now = clock()
        if now - last >= INTERVAL_S and done < len(items):
            note(f"{desc}: {done}/{len(items)} {unit}, {now - start:.1f} s")
            last = now
    elapsed = now - start
    if final and items:  # a data-free metric loops over nothing: no line to say so
        rate = f", {len(items) / elapsed:.1f} {unit}/s" if elapsed > 0 else ""
        note(f"{desc}: {len(items)}/{len(items)} {unit}, {elapsed:.1f} s{rate}")
