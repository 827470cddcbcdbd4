"""--checkpoint: what a run writes for --resume, and that a full disk never ends a run."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import pytest
import torch

import esa_core
from esa_core import resume as ckpt
from esa_core.engine import ScoringRun
from esa_core.layout import CHECKPOINTS
from esa_core.resume import Checkpoints, folder_bytes, human_bytes

SEEDS = [1, 2, 3]
SETTINGS = dict(topk=4, seq_len=16, max_samples=3, eval_samples=2, seeds=SEEDS, device="cpu")


def run(model_dir: Path, out_dir: Path, **extra) -> esa_core.RunResult:
    return esa_core.run(model=str(model_dir), out_dir=str(out_dir), **{**SETTINGS, **extra})


@pytest.fixture
def writes(monkeypatch) -> list[tuple[str, int, str]]:
    """Every tensor checkpoint written: (unit, bytes, thread), in order; the folder is kept."""
    written = []
    real = Checkpoints._write

    def spy(self, unit, tensors, meta):
        written.append((unit, ckpt.tensor_bytes(tensors), threading.current_thread().name))
        return real(self, unit, tensors, meta)

    monkeypatch.setattr(Checkpoints, "_write", spy)
    monkeypatch.setattr(Checkpoints, "clear", lambda self: None)
    return written


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory) -> Path:
    return run(tiny_llama_dir, tmp_path_factory.mktemp("reference") / "run",
               checkpoint="never").out_dir


def same_results(a: Path, b: Path) -> bool:
    return (a / "top_weights.csv").read_bytes() == (b / "top_weights.csv").read_bytes()


def test_batch_size_defaults_by_device_and_a_given_one_is_kept():
    from esa_core.config import RunConfig

    assert RunConfig().resolved("cuda").batch_size == 4
    assert RunConfig().resolved("cpu").batch_size == 1
    assert RunConfig(batch_size=2).resolved("cuda").batch_size == 2


def test_auto_writes_the_sum_only_when_writing_is_cheap_next_to_scoring():
    c = Checkpoints(Path("unused"), {}, "auto")
    eight_b_scores = 7_000_000_000 * 4  # fp32 scores of Llama-3.1-8B's block matrices
    write_s = eight_b_scores / ckpt.ASSUMED_DISK_BYTES_PER_S
    assert not c.worth_writing(eight_b_scores, recompute_s=100.0)  # a 100 s seed: recompute
    assert c.worth_writing(eight_b_scores, recompute_s=write_s / ckpt.WRITE_COST_SHARE)
    assert Checkpoints(Path("unused"), {}, "always").worth_writing(eight_b_scores, 0.0)
    assert not Checkpoints(Path("unused"), {}, "never").worth_writing(1, 1e9)


def test_short_seeds_under_auto_write_no_model_sized_checkpoint(tiny_llama_dir, tmp_path,
                                                                 writes, reference, monkeypatch):
    # a disk this slow makes the tiny model's score sum cost minutes to write, seeds take < 1 s
    monkeypatch.setattr(ckpt, "ASSUMED_DISK_BYTES_PER_S", 1000.0)
    result = run(tiny_llama_dir, tmp_path / "run", checkpoint="auto")
    assert [unit for unit, _, _ in writes] == [f"seed_{s}" for s in SEEDS]
    largest = max(nbytes for _, nbytes, _ in writes)
    assert largest < result.manifest["model"]["n_scored"]  # k picks per matrix, never a score set
    assert same_results(result.out_dir, reference)


def test_always_writes_the_sum_after_every_seed_in_the_background(tiny_llama_dir, tmp_path,
                                                                   writes, reference):
    result = run(tiny_llama_dir, tmp_path / "run", checkpoint="always")
    sums = [(nbytes, thread) for unit, nbytes, thread in writes if unit == "scores"]
    assert len(sums) == len(SEEDS)
    assert all(nbytes == 4 * result.manifest["model"]["n_scored"] for nbytes, _ in sums)
    # the sums before the last are written while the next seed scores; the last one before the
    # in-place division into the mean
    assert [thread.startswith("checkpoint") for _, thread in sums] == [True, True, False]
    assert same_results(result.out_dir, reference)


def test_never_writes_no_checkpoint(tiny_llama_dir, tmp_path, writes):
    run(tiny_llama_dir, tmp_path / "run", checkpoint="never")
    assert writes == [] and not (tmp_path / "run" / "checkpoints").exists()


def full_disk_by_free_space(monkeypatch):
    """The disk fills while the run scores: the check before the model loaded saw room (a disk
    full from the start is refused then: tests/test_options.py), the checkpoint's own does not."""
    full = ckpt.shutil._ntuple_diskusage(total=100, used=100, free=0)
    real = ckpt.shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: (
        full if Path(path).name == CHECKPOINTS else real(path)))


def full_disk_mid_write(monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)


@pytest.mark.parametrize("fill", [full_disk_by_free_space, full_disk_mid_write])
def test_full_disk_warns_once_and_the_run_finishes(tiny_llama_dir, tmp_path, reference,
                                                   monkeypatch, caplog, fill):
    fill(monkeypatch)
    with caplog.at_level(logging.WARNING):
        result = run(tiny_llama_dir, tmp_path / "run", checkpoint="always")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "not saved" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "the run goes on" in warnings[0]
    assert result.manifest["status"] == "complete"
    assert same_results(result.out_dir, reference)
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_a_checkpoint_replaces_its_previous_version_before_writing(tmp_path, monkeypatch):
    """Never the old and the new version on disk together: the old one is gone first."""
    c = Checkpoints(tmp_path, {}, "always")
    c.save_tensors("scores", {"w": torch.zeros(1000)})
    seen = []
    import safetensors.torch

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata: (
        seen.append(sorted(p.name for p in c.folder.iterdir())), real(tensors, path, metadata)))
    c.save_tensors("scores", {"w": torch.ones(1000)})
    assert not any("scores.safetensors" in names for names in seen)
    assert torch.equal(c.load_tensors("scores")[0]["w"], torch.ones(1000))


def _stop_at_second_seed(monkeypatch) -> None:
    real, calls = ScoringRun.score, []

    def stop(self, blocks, seed, label=""):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, blocks, seed, label)

    monkeypatch.setattr(ScoringRun, "score", stop)


def test_a_stopped_run_says_how_big_its_checkpoints_are(tiny_llama_dir, tmp_path, monkeypatch):
    _stop_at_second_seed(monkeypatch)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(tiny_llama_dir, tmp_path / "run", checkpoint="always")
    folder = tmp_path / "run" / "checkpoints"
    size = folder_bytes(folder)
    assert size >= (folder / "scores.safetensors").stat().st_size > 0
    note = f"{folder} holds {human_bytes(size)} for --resume; --overwrite"
    assert stopped.value.__notes__[-1].startswith(note)


def test_the_cli_ends_a_stopped_run_with_its_checkpoint_size(tiny_llama_dir, tmp_path,
                                                             monkeypatch):
    from typer.testing import CliRunner

    from esa_core.cli import app

    _stop_at_second_seed(monkeypatch)
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_llama_dir), "--out-dir", str(out),
            "--checkpoint", "always", "--seeds", "1,2,3", "--max-samples", "2",
            "--eval-samples", "2", "--seq-len", "32", "--topk", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    last = result.stderr.strip().splitlines()[-1]
    size = human_bytes(folder_bytes(out / "checkpoints"))
    assert last.startswith("Interrupted:")
    assert last.endswith(f"{out / 'checkpoints'} holds {size} for --resume; --overwrite (or "
                         "deleting the folder) frees the space.")
