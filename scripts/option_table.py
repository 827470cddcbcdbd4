"""Print the README's table of `esa run` options, or (`--write`) refresh it in README.md.

The table is rendered from the declarations in src/esa_core/config.py; tests/test_options.py
fails when the README's copy drifts from them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from esa_core.config import option_table

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- esa run options: begin -->", "<!-- esa run options: end -->"


def section(text: str) -> str:
    """The table between the markers in `text`."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def refreshed(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{option_table()}\n{END}{rest.split(END, 1)[1]}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(refreshed(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(option_table())
