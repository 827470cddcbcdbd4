"""One exception type for user mistakes: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EsaError(Exception):
    """A mistake the user can fix (bad flag, missing file, impossible request)."""


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
