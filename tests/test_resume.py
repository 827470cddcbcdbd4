"""Kill a real `esa run` mid-scoring (SIGINT, SIGKILL), then `--resume` it.

The resumed folder must equal an uninterrupted run's byte for byte (CSV) and number for number
(JSON), repeat none of the finished seeds, and hold no half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from esa_core.cli import app
from esa_core.engine import ScoringRun
from esa_core.resume import comparable

SEEDS = [1, 2, 3, 4]
# four seeds of 30 blocks: a few seconds of scoring, so a signal lands between seeds
FLAGS = ["--seq-len", "32", "--max-samples", "30", "--eval-samples", "2", "--topk", "5",
         "--seeds", ",".join(map(str, SEEDS)), "--device", "cpu"]
VOLATILE = ("argv", "started_at", "finished_at", "timings", "resumed")


@contextlib.contextmanager
def one_thread():
    """The subprocesses run with OMP_NUM_THREADS=1; in-process runs match them exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def command(tmp_path_factory, tiny_llama_dir) -> list[str]:
    text = tmp_path_factory.mktemp("data") / "text.txt"
    text.write_text(tiny.wikitext_sample(40_000))
    return ["run", "--model", str(tiny_llama_dir), "--dataset", str(text), *FLAGS]


def run_here(command: list[str], out_dir: Path, *extra: str):
    with one_thread():
        return CliRunner().invoke(app, [*command, "--out-dir", str(out_dir), *extra])


def uninterrupted(command: list[str], out_dir: Path) -> Path:
    """The result folder of `command` run to the end, to compare resumed runs against."""
    result = run_here(command, out_dir)
    assert result.exit_code == 0, result.output
    return out_dir


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory) -> Path:
    return uninterrupted(command, tmp_path_factory.mktemp("reference") / "run")


def signal_when(command: list[str], out_dir: Path, sig: signal.Signals, ready) -> None:
    """Start `esa run` in its own process and send `sig` as soon as `ready()` holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell's background job (`cmd &`) ignores SIGINT, and a child inherits that: restore
    # the default so the run gets its KeyboardInterrupt wherever the tests are started from
    proc = subprocess.Popen([sys.executable, "-m", "esa_core.cli", *command, "--out-dir",
                             str(out_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not ready():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.002)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), stderr


def start_and_stop(command: list[str], out_dir: Path, sig: signal.Signals) -> list[int]:
    """Send `sig` once a seed is checkpointed; return the seeds the checkpoint then holds."""
    checkpoint = out_dir / "checkpoints" / "scores.safetensors"
    signal_when(command, out_dir, sig, checkpoint.exists)
    with safe_open(str(checkpoint), framework="pt") as f:
        saved = [int(s) for s in f.metadata()["seeds"].split(",")]
    assert saved == SEEDS[:len(saved)] and 0 < len(saved) < len(SEEDS), "not stopped mid-run"
    assert not (out_dir / "top_weights.csv").exists()
    return saved


def resume_counting_seeds(command, out_dir, monkeypatch) -> list[int]:
    scored_seeds = []
    score = ScoringRun.score

    def counting(self, blocks, seed, label=""):
        scored_seeds.append(seed)
        return score(self, blocks, seed, label)

    monkeypatch.setattr(ScoringRun, "score", counting)
    result = run_here(command, out_dir, "--resume")
    assert result.exit_code == 0, result.output
    return scored_seeds


def stable(manifest: dict) -> dict:
    """What must not change between runs: no times, no out_dir, no --resume."""
    kept = {k: v for k, v in manifest.items() if k not in VOLATILE}
    if "config" in kept:
        kept["config"] = comparable(kept["config"])
    return kept


def assert_equals_uninterrupted(out_dir: Path, reference: Path) -> None:
    assert (out_dir / "top_weights.csv").read_bytes() == (
        reference / "top_weights.csv").read_bytes()
    for name in ("sensitivity_stats.json", "experiment_manifest.json"):
        got, want = (json.loads((d / name).read_text()) for d in (out_dir, reference))
        assert stable(got) == stable(want), name
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "complete" and sorted(map(int, manifest["seeds"])) == SEEDS
    # nothing half-written: no temporary file anywhere, every JSON parses, checkpoints gone
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
    assert not (out_dir / "checkpoints").exists()


def test_ctrl_c_during_scoring_then_resume(command, reference, tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    saved = start_and_stop(command, out_dir, signal.SIGINT)
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["last_completed_stage"] == "data"  # scoring was under way
    assert manifest["error"].startswith("KeyboardInterrupt")

    scored = resume_counting_seeds(command, out_dir, monkeypatch)
    assert scored == SEEDS[len(saved):]  # the finished seeds are not scored again
    assert_equals_uninterrupted(out_dir, reference)
    resumed = json.loads((out_dir / "experiment_manifest.json").read_text())["resumed"]
    assert [r["previous_status"] for r in resumed] == ["interrupted"]


def test_resume_under_checkpoint_always_equals_uninterrupted(command, reference, tmp_path,
                                                             monkeypatch):
    """--checkpoint always (the sum after every seed) resumes like the default auto policy;
    the policy says what is saved, not what is computed, so the reference run is shared."""
    command, out_dir = [*command, "--checkpoint", "always"], tmp_path / "run"
    saved = start_and_stop(command, out_dir, signal.SIGINT)
    assert resume_counting_seeds(command, out_dir, monkeypatch) == SEEDS[len(saved):]
    assert_equals_uninterrupted(out_dir, reference)


def test_sigkill_during_scoring_then_resume(command, reference, tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    saved = start_and_stop(command, out_dir, signal.SIGKILL)
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "running"  # SIGKILL cannot be caught; --resume copes
    # what a kill in the middle of a write leaves behind
    (out_dir / ".top_weights.csv.k1ll3d.tmp").write_text("rank,par")
    (out_dir / "checkpoints" / ".scores.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 10)

    scored = resume_counting_seeds(command, out_dir, monkeypatch)
    assert scored == SEEDS[len(saved):]
    assert_equals_uninterrupted(out_dir, reference)


# ------------------------------------------------------------------ during the perturbation stage

PERTURB = ["--perturb", "sign_flip", "--controls", "random_k,bottom_k", "--control-repeats",
           "40", "--eval-samples", "40"]


@pytest.fixture(scope="module")
def perturb_command(command) -> list[str]:
    # later flags win: more evaluation blocks and 52 trials, so the stage lasts long enough
    return [*command, *PERTURB]


@pytest.fixture(scope="module")
def perturb_reference(perturb_command, tmp_path_factory) -> Path:
    return uninterrupted(perturb_command, tmp_path_factory.mktemp("perturb-reference") / "run")


def stop_during_perturbation(command: list[str], out_dir: Path, sig: signal.Signals) -> int:
    """Send `sig` once the first perturbation trial is saved; return how many trial units were
    saved when the process ended."""
    folder = out_dir / "checkpoints"
    signal_when(command, out_dir, sig, lambda: bool(list(folder.glob("perturb_*_seed*.json"))))
    saved = len(list(folder.glob("perturb_*_seed*.json")))
    assert 0 < saved < 52, "not stopped mid-stage"
    assert not (out_dir / "perturbation_results.json").exists()
    return saved


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_stopped_during_perturbation_then_resume(perturb_command, perturb_reference, tmp_path,
                                                 monkeypatch, sig):
    from esa_core import perturbation

    out_dir = tmp_path / "run"
    saved = stop_during_perturbation(perturb_command, out_dir, sig)
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == ("running" if sig == signal.SIGKILL else "interrupted")

    trials = []
    real = perturbation.perturbed
    monkeypatch.setattr(perturbation, "perturbed",
                        lambda *a: trials.append(a) or real(*a))
    result = run_here(perturb_command, out_dir, "--resume")
    assert result.exit_code == 0, result.output
    assert len(trials) == 52 - saved  # finished trials are not evaluated again
    for name in ("perturbation_results.json", "control_analysis.json"):
        got, want = (json.loads((d / name).read_text()) for d in (out_dir, perturb_reference))
        assert got == want, name
    assert (out_dir / "top_weights.csv").read_bytes() == (
        perturb_reference / "top_weights.csv").read_bytes()
    assert not (out_dir / "checkpoints").exists()
    assert not [p for p in out_dir.rglob("*.tmp")]


# ------------------------------------------------------------------ a metric's findings

@pytest.fixture(scope="module")
def super_command(command) -> list[str]:
    return [*command, "--metric", "super_weight", "--metric-arg", "threshold=0",
            "--checkpoint", "always"]


@pytest.fixture(scope="module")
def super_reference(super_command, tmp_path_factory) -> Path:
    return uninterrupted(super_command, tmp_path_factory.mktemp("super-reference") / "run")


def detection(folder: Path) -> dict:
    stats = json.loads((folder / "sensitivity_stats.json").read_text())
    return stats["findings"]["super_weight_detection"]


def test_killed_super_weight_run_resumes_with_the_uninterrupted_detection_table(
        super_command, super_reference, tmp_path, monkeypatch):
    """Each seed's channel peaks are part of its unit: the table of a run killed after seed 1
    and resumed covers every seed, as the uninterrupted run's does."""
    out_dir = tmp_path / "run"
    saved = start_and_stop(super_command, out_dir, signal.SIGKILL)
    with safe_open(str(out_dir / "checkpoints" / f"seed_{SEEDS[0]}.safetensors"), "pt") as f:
        assert any(key.startswith("kept.") for key in f.keys())
    assert resume_counting_seeds(super_command, out_dir, monkeypatch) == SEEDS[len(saved):]
    want = detection(super_reference)
    assert detection(out_dir) == want
    assert want["rows"] and all(d["passes"] for d in want["rows"])  # threshold 0
    assert_equals_uninterrupted(out_dir, super_reference)


def test_super_weight_run_stopped_after_scoring_resumes_with_every_seeds_table(
        super_command, super_reference, tmp_path, monkeypatch):
    """Stopped once every seed is scored: no seed is scored again, and the table is whole."""
    from esa_core import pipeline

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    out_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "sensitivity_stats", broken)
        assert run_here(super_command, out_dir).exit_code != 0
    assert resume_counting_seeds(super_command, out_dir, monkeypatch) == []
    assert detection(out_dir) == detection(super_reference)
    assert_equals_uninterrupted(out_dir, super_reference)
