"""Finished units of work, kept so that `--resume` never repeats them.

A long run saves each unit as it completes (a seed's scores, a perturbation condition's result)
under `<out_dir>/checkpoints/`, atomically, tagged with the fingerprint of the config that made
it: a unit made under another config is never reused. The folder is removed once the run
completes; checkpoints are a means to the results, not part of them.

A checkpoint must never cost more than it saves, nor fill the disk: `--checkpoint auto` writes
a model-sized unit only when writing it is cheap next to recomputing it, any write first checks
the free space (a unit replaces its previous version, never sits beside it), and a full disk
skips the checkpoint with one warning instead of ending the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from esa_core import distributed
from esa_core.api import LogicalMatrix, Slot
from esa_core.config import DEFAULTS, NOT_RESULTS
from esa_core.errors import EsaError
from esa_core.layout import CHECKPOINTS, MANIFEST, read_json
from esa_core.results import atomic_path, restore_nonfinite, write_json
from esa_core.selection import Picks, Selection

log = logging.getLogger(__name__)

#: --checkpoint auto's guess of the disk's write speed until a model-sized write measures it
ASSUMED_DISK_BYTES_PER_S = 200e6
#: --checkpoint auto writes when writing takes at most this share of the time it saves
WRITE_COST_SHARE = 0.1
#: room left free beside a checkpoint, so that the results themselves can still be written
FREE_SPACE_MARGIN = 64 << 20


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's numbers (those declared `results=True`), in their JSON
    form as the manifest has them; one an older manifest lacks counts as its declared default."""
    return json.loads(json.dumps({k: v for k, v in {**DEFAULTS, **config}.items()
                                  if k not in NOT_RESULTS}))


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


#: what the result files take beside top_weights.csv's rows: JSON, report, figures
RESULT_FILES_BYTES = 32 << 20
CSV_ROW_BYTES = 200


def check_disk_room(out_dir: Path, policy: str, score_sum_bytes: int, csv_rows: int) -> None:
    """Refuse, before the model loads, a run whose files cannot fit on the disk: the result
    files, and the seeds' score sum when `--checkpoint always` will save it (`auto` warns, as
    it then skips that checkpoint, and goes on)."""
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free + folder_bytes(out_dir / CHECKPOINTS)
    results = RESULT_FILES_BYTES + csv_rows * CSV_ROW_BYTES
    where = f"{existing} has {human_bytes(free)} free"
    if free < results:
        raise EsaError(f"the result files need about {human_bytes(results)} and {where}. Free "
                       "some space or choose another --out-dir.")
    if policy == "never" or free >= results + score_sum_bytes + FREE_SPACE_MARGIN:
        return
    need = (f"the score sum that --checkpoint {policy} saves for --resume needs "
            f"{human_bytes(score_sum_bytes)} beside the results, and {where}")
    if policy == "always":
        raise EsaError(f"{need}. Free some space, choose another --out-dir, or pass "
                       "--checkpoint auto or never.")
    log.warning("%s: the run goes on, but it will not save the score sum, so --resume "
                "would score the seeds again.", need)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def folder_bytes(folder: Path) -> int:
    """Bytes held by the files under `folder` (0 when there is none)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Checkpoints:
    """Completed units of one run: named tensor dicts (safetensors) or JSON values.

    `policy` (--checkpoint): `always` saves every unit, `never` none (a run that cannot resume),
    `auto` every small unit and a model-sized one only when `worth_writing` says so.
    """

    def __init__(self, out_dir: Path, config: dict[str, Any], policy: str = "always") -> None:
        self.folder = out_dir / CHECKPOINTS
        self.fingerprint = fingerprint(config)
        self.policy = policy
        self.disk_bytes_per_s = ASSUMED_DISK_BYTES_PER_S
        self._warned = False
        self._pending: threading.Thread | None = None
        self._failure: BaseException | None = None

    def worth_writing(self, nbytes: int, recompute_s: float) -> bool:
        """Should a unit of `nbytes`, which took `recompute_s` seconds to make, be saved?"""
        if self.policy != "auto":
            return self.policy == "always"
        return nbytes / self.disk_bytes_per_s <= WRITE_COST_SHARE * recompute_s

    def save_tensors(self, unit: str, tensors: dict[str, torch.Tensor],
                     meta: dict[str, str] | None = None, background: bool = False) -> None:
        """Save `tensors` as `unit`, replacing its previous version; with `background`, in a
        thread (the caller must not change `tensors` before `wait()`)."""
        if self.policy == "never" or not distributed.is_main():
            return  # every rank holds the same reduced scores; rank 0 writes them
        self.wait()
        if not background:
            return self._write(unit, tensors, meta)
        self._pending = threading.Thread(target=self._write_catching, daemon=True,
                                         args=(unit, tensors, meta), name=f"checkpoint {unit}")
        self._pending.start()

    def wait(self) -> None:
        """Finish the background write, if any; re-raise what it failed with."""
        self.settle()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def settle(self) -> None:
        """Let a background write finish (a stopping run keeps what it was saving)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None

    def _write_catching(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as exc:  # handed to the main thread by wait()
            self._failure = exc

    def _write(self, unit: str, tensors: dict[str, torch.Tensor],
               meta: dict[str, str] | None) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"{unit}.safetensors"
        nbytes = tensor_bytes(tensors)
        self.folder.mkdir(parents=True, exist_ok=True)
        old = path.stat().st_size if path.is_file() else 0
        free = shutil.disk_usage(self.folder).free
        if free + old < nbytes + FREE_SPACE_MARGIN:
            return self._skip(unit, f"it needs {human_bytes(nbytes)}, plus "
                              f"{human_bytes(FREE_SPACE_MARGIN)} kept free so that the results "
                              f"can still be written, and the disk has {human_bytes(free + old)}"
                              " free")
        path.unlink(missing_ok=True)  # never the old and the new version on disk at once
        start = time.perf_counter()
        try:
            with atomic_path(path) as tmp:
                save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={**(meta or {}), "fingerprint": self.fingerprint})
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return self._skip(unit, "the disk is full")
        if nbytes >= 1 << 26:  # small files measure the file system's latency, not its speed
            self.disk_bytes_per_s = nbytes / max(time.perf_counter() - start, 1e-6)

    def _skip(self, unit: str, why: str) -> None:
        if not self._warned:
            log.warning("checkpoint '%s' not saved (%s); the run goes on, but --resume would "
                        "score this part again", unit, why)
            self._warned = True

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
        if self.policy != "never":
            write_json(self.folder / f"{unit}.json",
                       {"fingerprint": self.fingerprint, "data": data})

    def load_json(self, unit: str) -> Any | None:
        """The unit's saved value, or None if it was not saved under this config."""
        path = self.folder / f"{unit}.json"
        if not path.is_file():
            return None
        saved = read_json(path)
        if saved.get("fingerprint") != self.fingerprint:
            return None
        return restore_nonfinite(saved["data"])

    def size_note(self) -> str | None:
        """What an unfinished run's checkpoints hold on disk, and how to free it."""
        nbytes = folder_bytes(self.folder)
        if not nbytes:
            return None
        return (f"{self.folder} holds {human_bytes(nbytes)} for --resume; --overwrite (or "
                "deleting the folder) frees the space.")

    def clear(self) -> None:
        if distributed.is_main():
            self.settle()
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
    held = sorted({int(k.split(".")[0]) for k in tensors if not k.startswith(KEPT)})
    return Selection([
        Picks(matrices[i], *(tensors[f"{i}.{part}"].to(devices[matrices[i].param])
                             for part in ("rows", "cols", "scores")))
        for i in held
    ])


KEPT = "kept."


def kept_tensors(kept: dict[Slot, dict[str, torch.Tensor]], slots: list[Slot]
                 ) -> dict[str, torch.Tensor]:
    """What a metric kept of each matrix (`Metric.keep`) as named tensors
    (`kept.<slot index>.<name>`), saved in the seed's unit beside its top-k."""
    return {f"{KEPT}{i}.{name}": value for i, slot in enumerate(slots)
            for name, value in kept.get(slot, {}).items()}


def kept_from(tensors: dict[str, torch.Tensor], slots: list[Slot]
              ) -> dict[Slot, dict[str, torch.Tensor]]:
    """The kept state `kept_tensors` saved, by slot."""
    kept: dict[Slot, dict[str, torch.Tensor]] = {slot: {} for slot in slots}
    for key, value in tensors.items():
        if key.startswith(KEPT):
            index, name = key[len(KEPT):].split(".", 1)
            kept[slots[int(index)]][name] = value
    return kept
