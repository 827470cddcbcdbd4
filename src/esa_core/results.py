"""The one writer of result files: atomic, NaN-free JSON, and a guarded result folder.

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written file. Non-finite numbers become null, with a
`<key>_nonfinite` flag beside them saying what the value was. Under torchrun only rank 0
touches the result folder: the other ranks hold the same results and write nothing.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from esa_core import distributed
from esa_core.errors import EsaError, write_failure
from esa_core.layout import CSV_COLUMNS

TMP_SUFFIX = ".tmp"


def finite_json(value: Any) -> Any:
    """A copy of `value` in which every NaN/Infinity is null with a flag beside it."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key] = None
                out[f"{key}_nonfinite"] = "nan" if math.isnan(item) else (
                    "inf" if item > 0 else "-inf")
            else:
                out[key] = finite_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else finite_json(v)
                for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed into place only if the block succeeds.

    For writers that need a file name (safetensors); a failed or interrupted write leaves nothing.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not hasattr(exc, "esa_path"):
            exc.esa_path = path  # a full disk is then reported by the file's own name
        raise


def restore_nonfinite(value: Any) -> Any:
    """The inverse of `finite_json` for dicts: null + `<key>_nonfinite` flag -> the float."""
    if isinstance(value, dict):
        out = {k: restore_nonfinite(v) for k, v in value.items() if not k.endswith("_nonfinite")}
        for key, flag in value.items():
            if key.endswith("_nonfinite") and value.get(key[: -len("_nonfinite")]) is None:
                out[key[: -len("_nonfinite")]] = float(flag)
        return out
    if isinstance(value, list):
        return [restore_nonfinite(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place (rank 0 only)."""
    if not distributed.is_main():
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete temporary files a killed run (SIGKILL) left mid-write; they are never results."""
    if not distributed.is_main() or not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(finite_json(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]],
              columns: Sequence[str] = CSV_COLUMNS) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    atomic_write_text(path, buffer.getvalue())


def prepare_out_dir(out_dir: Path, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to touch an existing non-empty folder unless told to (--overwrite / --resume)."""
    if not distributed.is_main():
        return out_dir  # rank 0 checks; another rank's check would race with its writes
    if out_dir.exists() and not out_dir.is_dir():
        raise EsaError(f"--out-dir {out_dir} exists and is a file, not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise EsaError(
            f"--out-dir {out_dir} already holds results; pass --overwrite to replace them, "
            "--resume to continue an interrupted run, or choose another --out-dir."
        )
    check_writable(out_dir)
    return out_dir


def check_writable(out_dir: Path) -> None:
    """Refuse a result folder that cannot be written before the model is loaded, not after."""
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EACCES
    else:
        return
    failure = write_failure(OSError(code, os.strerror(code)), existing)
    assert failure is not None
    raise failure


class FolderLock:
    """One ESA process per result folder: a second one (say, `--resume` while the first still
    runs) is refused instead of interleaving writes. The kernel drops the lock when the holder
    dies, even by SIGKILL, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating the folder if needed); idempotent; rank 0 alone writes."""
        if self._fd is not None or not distributed.is_main():
            return
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks on folders
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EsaError(f"--out-dir {self.out_dir} is being written by another ESA process; "
                           "wait for it to finish, or choose another --out-dir.") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    __del__ = release
