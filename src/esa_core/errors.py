"""One exception type for what the user can fix: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class EsaError(Exception):
    """Something the user can fix: a bad flag, a missing or corrupt file, an impossible
    request, a full disk."""


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


# What to do about an operating-system refusal to write: by errno, the cause and the remedy.
_WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full", "free some space or choose another --out-dir"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space or choose another --out-dir"),
    errno.EACCES: ("permission denied", "choose another --out-dir or change its permissions"),
    errno.EPERM: ("permission denied", "choose another --out-dir or change its permissions"),
    errno.EROFS: ("the folder is on a read-only file system", "choose another --out-dir"),
}


def write_failure(exc: OSError, path: object) -> EsaError | None:
    """A full disk, a refused permission or a read-only folder, said as one line about `path`;
    None for any other OSError (that stays unexpected)."""
    if exc.errno not in _WRITE_FAILURES:
        return None
    cause, remedy = _WRITE_FAILURES[exc.errno]
    return EsaError(f"cannot write {path}: {cause}. {remedy[0].upper()}{remedy[1:]}.")
