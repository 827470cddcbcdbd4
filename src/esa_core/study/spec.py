"""The study file: a `name`, a [run] table shared by every cell and a [grid] of lists whose
product is the cells. Every key is a RunConfig field; every cell is checked by the same
`RunConfig.validate` as `esa run`, so a bad file is one line before anything runs.
"""

from __future__ import annotations

import itertools
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from esa_core.config import RunConfig
from esa_core.errors import EsaError
from esa_core.plugins import Registry

STUDY_KEYS = ("name", "run", "grid")
#: RunConfig fields the study itself decides, per cell (folder, what to do with what is there,
#: how much to print)
STUDY_DECIDES = ("out_dir", "overwrite", "resume", "verbose", "quiet")
#: `model = "embedded"` is the default model (`esa run` without --model)
EMBEDDED = "embedded"
CELLS = "cells"


@dataclass(frozen=True)
class Cell:
    """One run of the study: its grid values and the RunConfig keywords they make."""

    index: int  # 1-based, in the grid's order
    name: str  # its folder under cells/
    values: dict[str, Any]  # grid key -> value, as the file wrote it
    settings: dict[str, Any]  # RunConfig keywords, without the folder

    def config(self, study_folder: Path, **flags: Any) -> RunConfig:
        return RunConfig(**self.settings, out_dir=str(self.folder(study_folder)), **flags)

    def folder(self, study_folder: Path) -> Path:
        return Path(study_folder) / CELLS / self.name


@dataclass(frozen=True)
class Study:
    name: str
    file: Path
    run: dict[str, Any]
    grid: dict[str, list[Any]]
    cells: list[Cell]


def load(path: str | Path, registry: Registry) -> Study:
    """Read and check a study file; raise EsaError (one line) on the first problem."""
    path = Path(path)
    where = f"study file {path}"
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise EsaError(f"{where} not found.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EsaError(f"cannot read {where}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EsaError(f"{where} is not valid TOML: {exc}.") from None
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise EsaError(f"{where}: unknown key '{unknown[0]}'; a study file has name, [run] "
                       "and [grid].")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise EsaError(f"{where}: name must be letters, digits, '.', '_' or '-'; got {name!r}.")
    run, grid = data.get("run", {}), data.get("grid", {})
    for table, values in (("run", run), ("grid", grid)):
        if not isinstance(values, dict):
            raise EsaError(f"{where}: [{table}] must be a table of `esa run` options.")
        for key, value in values.items():
            _check_option(where, table, key, value, as_list=table == "grid")
    both = sorted(set(run) & set(grid))
    if both:
        raise EsaError(f"{where}: '{both[0]}' is in both [run] and [grid]; keep it in one.")
    if not grid:
        raise EsaError(f"{where}: the [grid] is empty; give at least one option a list of "
                       "values, e.g. metric = [\"grad_x_weight\", \"act_mag\"].")
    cells = []
    for cell in _cells(run, grid):
        try:
            config = cell.config(Path(".")).validate(registry)
        except EsaError as exc:
            raise EsaError(f"{where}, cell {cell.name}: {exc}") from None
        # as validated (seeds and lists parsed), so a cell compares equal to its manifest
        settings = {k: v for k, v in config.to_dict().items() if k not in STUDY_DECIDES}
        cells.append(Cell(cell.index, cell.name, cell.values, settings))
    return Study(name, path, run, grid, cells)


def _check_option(where: str, table: str, key: str, value: Any, as_list: bool) -> None:
    hints = typing.get_type_hints(RunConfig)
    options = [f.name for f in fields(RunConfig) if f.name not in STUDY_DECIDES]
    if key not in options:
        raise EsaError(f"{where}: [{table}] has unknown option '{key}'. Valid options: "
                       f"{', '.join(options)}.")
    if as_list:
        if not isinstance(value, list) or not value:
            raise EsaError(f"{where}: [grid] {key} must be a non-empty list of values.")
        if len({repr(v) for v in value}) != len(value):
            raise EsaError(f"{where}: [grid] {key} repeats a value.")
    for v in value if as_list else [value]:
        if not _accepts(hints[key], v):
            raise EsaError(f"{where}: [{table}] {key} = {v!r} has the wrong type "
                           f"(expected {_type_name(hints[key])}).")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value can stand for a RunConfig field of type `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(hint) if a is not type(None))
    if origin is list:
        return isinstance(value, (list, str))  # a list, or `esa run`'s comma-separated text
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace(" | None", "")


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    """TOML values as RunConfig keywords; the declarations' own parsing (RunConfig.validate)
    then reads them as it reads `esa run`'s (comma-separated lists, seeds)."""
    out = {}
    for key, value in values.items():
        if key == "model" and value == EMBEDDED:
            value = None
        elif isinstance(value, dict):  # plugin options key=value: text, as on the command line
            value = {k: str(v).lower() if isinstance(v, bool) else str(v)
                     for k, v in value.items()}
        out[key] = value
    return out


def _label(value: Any) -> str:
    """A grid value as part of a folder name: a path's file name, a list joined by '-'."""
    if isinstance(value, list):
        return "-".join(_label(v) for v in value)
    if isinstance(value, str) and ("/" in value or value.endswith((".gguf", ".txt"))):
        value = Path(value).stem if value.endswith((".gguf", ".txt")) else Path(value).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "_"


def _cells(run: dict[str, Any], grid: dict[str, list[Any]]) -> list[Cell]:
    keys = list(grid)
    cells, seen = [], set()
    for index, combo in enumerate(itertools.product(*grid.values()), start=1):
        values = dict(zip(keys, combo))
        name = "__".join(_label(v) for v in combo)
        if name in seen:  # two values that read the same (a/model and b/model)
            name = f"{name}__{index}"
        seen.add(name)
        cells.append(Cell(index, name, values, _settings({**run, **values})))
    return cells
