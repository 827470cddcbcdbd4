"""One exception type for what the user can fix: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
import errno
import re
from collections.abc import Iterable


class EsaError(Exception):
    """Something the user can fix: a bad flag, a missing or corrupt file, an impossible
    request, a full disk."""


class PluginFailure(EsaError):
    """A plugin (metric, perturbation, evaluator) raised: name it instead of a traceback."""


def closest(value: str, choices: Iterable[str]) -> str | None:
    """The choice a user most likely meant: `activation_magnitude` -> `act_mag`."""
    choices = list(choices)
    words = value.lower().replace("-", "_").split("_")

    def abbreviates(choice: str) -> bool:
        parts = choice.split("_")
        return len(parts) <= len(words) and all(
            w.startswith(p) or p.startswith(w) for p, w in zip(parts, words)
        )

    by_prefix = [c for c in choices if abbreviates(c)]
    if by_prefix:
        return by_prefix[0]
    match = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> EsaError:
    """The one error for a value outside a known set, naming the valid choices."""
    choices = sorted(choices)
    hint = closest(value, choices)
    did_you_mean = f" Did you mean '{hint}'?" if hint else ""
    return EsaError(
        f"unknown {what} '{value}'.{did_you_mean} Valid choices: {', '.join(choices)}."
    )


# An operating system's refusal to write, by errno: the cause, and what to do ({elsewhere}).
_WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full", "Free some space or {elsewhere}"),
    errno.EDQUOT: ("the disk quota is exhausted", "Free some space or {elsewhere}"),
    errno.EACCES: ("permission denied", "{Elsewhere} or change its permissions"),
    errno.EPERM: ("permission denied", "{Elsewhere} or change its permissions"),
    errno.EROFS: ("the folder is on a read-only file system", "{Elsewhere}"),
}
OUT_DIR_ELSEWHERE = "choose another --out-dir"


def errno_of(exc: BaseException) -> int | None:
    """The OS error number behind `exc`: an OSError's, or the one safetensors' writer puts in
    its message (`Os { code: 28, ... }`): a full disk mid-save is a SafetensorError."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"Os \{ code: (\d+)", str(exc))
    return int(found[1]) if found else None


def write_failure(exc: BaseException, path: object = None,
                  elsewhere: str = OUT_DIR_ELSEWHERE) -> EsaError | None:
    """A full disk, a refused permission or a read-only folder, said as one line naming the
    path (`path`, else the one the result writer attached, else the OSError's); None for any
    other failure, which stays unexpected."""
    code = errno_of(exc)
    if code not in _WRITE_FAILURES:
        return None
    path = path or getattr(exc, "esa_path", None) or getattr(exc, "filename", None) or "a file"
    cause, remedy = _WRITE_FAILURES[code]
    remedy = remedy.format(elsewhere=elsewhere, Elsewhere=elsewhere[0].upper() + elsewhere[1:])
    return EsaError(f"cannot write {path}: {cause}. {remedy}.")
