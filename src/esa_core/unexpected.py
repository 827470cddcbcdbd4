"""An unexpected failure, said in one line; its full traceback kept in error.log.

A user needs what failed (the stage, and the plugin whose code raised), the exception and
where the details are; a 60-line traceback on screen hides that. The pipeline tags a failure
with its stage (`esa_stage`) and, once the result folder exists, with the folder
(`esa_out_dir`); before that, error.log goes to a temporary file.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

from esa_core.layout import ERROR_LOG


def write_log(exc: BaseException) -> Path:
    """The traceback, in the result folder's error.log, else in a new temporary file."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    folder = getattr(exc, "esa_out_dir", None)
    if folder is not None:
        try:
            path = Path(folder) / ERROR_LOG
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            pass  # a full or read-only folder: the temporary file below still works
    with tempfile.NamedTemporaryFile("w", prefix="esa-error-", suffix=".log", delete=False,
                                     encoding="utf-8") as f:
        f.write(text)
    return Path(f.name)


def plugin_of(exc: BaseException, plugin_modules: dict[str, str]) -> str | None:
    """The plugin whose code raised: the innermost traceback frame in a plugin's module."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        found = plugin_modules.get(module, found)
        tb = tb.tb_next
    return found


def one_line(exc: BaseException, log_path: Path, plugin: str | None) -> str:
    """`unexpected failure during scoring (metric 'x'): ValueError: ... Details: error.log`."""
    where = f" during {exc.esa_stage}" if hasattr(exc, "esa_stage") else ""
    if plugin:
        where += f" ({plugin})"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return (f"unexpected failure{where}: {what}. The full traceback is in {log_path}; "
            "please include it when you report this.")
