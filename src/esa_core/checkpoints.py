"""Finished units of work, kept so that `--resume` never repeats them.

A long run saves each unit as it completes (a seed's scores, a perturbation condition's result)
under `<out_dir>/checkpoints/`, atomically, tagged with the fingerprint of the config that made
it: a unit made under another config is never reused. The folder is removed once the run
completes; checkpoints are a means to the results, not part of them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from esa_core import distributed
from esa_core.api import LogicalMatrix
from esa_core.errors import EsaError
from esa_core.layout import MANIFEST, read_json
from esa_core.results import atomic_path, restore_nonfinite, write_json
from esa_core.selection import Picks, Selection

#: settings that say where and how verbosely to write, not what is computed
RESUME_IGNORES = ("out_dir", "overwrite", "resume", "verbose")
FOLDER = "checkpoints"


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's numbers, in their JSON form (as the manifest has them)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RESUME_IGNORES}))


def fingerprint(config: dict[str, Any]) -> str:
    text = json.dumps(comparable(config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def resumable_manifest(out_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the run that `--resume` continues, or None when there is none to continue.

    Refuses (EsaError) a folder that is not an ESA result folder, a run that already completed,
    and a run made with different settings, naming each difference.
    """
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None  # nothing yet: --resume starts the run, so a retry loop can always pass it
    path = out_dir / MANIFEST
    try:
        previous = read_json(path)
    except FileNotFoundError:
        raise EsaError(f"--resume: {out_dir} has no {MANIFEST}, so it is not an ESA result "
                       "folder to continue.") from None
    except (OSError, ValueError) as exc:
        raise EsaError(f"--resume: cannot read {path}: {exc}") from None
    if previous.get("status") == "complete":
        raise EsaError(f"--resume: the run in {out_dir} is already complete; pass --overwrite "
                       "to run it again.")
    before, now = comparable(previous.get("config", {})), comparable(config)
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}"
               for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if changed:
        raise EsaError(f"--resume: the settings differ from the interrupted run's "
                       f"({'; '.join(changed)}). Pass the same flags, or --overwrite to start "
                       "over.")
    return previous


def resume_record(previous: dict[str, Any], at: str) -> dict[str, Any]:
    """Manifest entries that keep the first start time and list every resumption."""
    entry = {"at": at, "previous_status": previous.get("status"),
             "last_completed_stage": previous.get("last_completed_stage"),
             "error": previous.get("error")}
    return {"started_at": previous.get("started_at", at),
            "resumed": [*previous.get("resumed", []), entry]}


class Checkpoints:
    """Completed units of one run: named tensor dicts (safetensors) or JSON values."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.folder = out_dir / FOLDER
        self.fingerprint = fingerprint(config)

    def save_tensors(self, unit: str, tensors: dict[str, torch.Tensor],
                     meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        if not distributed.is_main():
            return  # every rank holds the same reduced scores; rank 0 writes them
        path = self.folder / f"{unit}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={**(meta or {}), "fingerprint": self.fingerprint})

    def load_tensors(self, unit: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The unit's tensors (on the CPU) and metadata, or None if not saved under this config."""
        from safetensors import safe_open

        path = self.folder / f"{unit}.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, meta

    def save_json(self, unit: str, data: Any) -> None:
        write_json(self.folder / f"{unit}.json", {"fingerprint": self.fingerprint, "data": data})

    def load_json(self, unit: str) -> Any | None:
        """The unit's saved value, or None if it was not saved under this config."""
        path = self.folder / f"{unit}.json"
        if not path.is_file():
            return None
        saved = read_json(path)
        if saved.get("fingerprint") != self.fingerprint:
            return None
        return restore_nonfinite(saved["data"])

    def clear(self) -> None:
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)


def selection_tensors(selection: Selection, matrices: list[LogicalMatrix]
                      ) -> dict[str, torch.Tensor]:
    """A selection as named tensors (`<matrix index>.rows|cols|scores`) for a checkpoint."""
    index = {id(m): i for i, m in enumerate(matrices)}
    out = {}
    for p in selection.picks:
        i = index[id(p.matrix)]
        out.update({f"{i}.rows": p.rows, f"{i}.cols": p.cols, f"{i}.scores": p.scores})
    return out


def selection_from(tensors: dict[str, torch.Tensor], matrices: list[LogicalMatrix],
                   devices: dict[str, torch.device]) -> Selection:
    """The selection `selection_tensors` saved, each matrix's picks on its parameter's device."""
    held = sorted({int(k.split(".")[0]) for k in tensors})
    return Selection([
        Picks(matrices[i], *(tensors[f"{i}.{part}"].to(devices[matrices[i].param])
                             for part in ("rows", "cols", "scores")))
        for i in held
    ])
