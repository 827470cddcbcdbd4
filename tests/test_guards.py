"""Bad endings made clear: out of memory, a plugin that raises, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import tiny
import torch
from typer.testing import CliRunner

from esa_core import pipeline
from esa_core.api import GRAD, Metric
from esa_core.cli import app
from esa_core.engine import ScoringRun
from esa_core.errors import PluginFailure
from esa_core.guards import Terminated, terminate_as_interrupt
from esa_core.plugins import PluginInfo, Registry
from esa_core.results import FolderLock

FAST = ["--seq-len", "16", "--max-samples", "3", "--eval-samples", "2", "--topk", "2",
        "--device", "cpu", "--dataset"]


class RaisesInOnGrad(Metric):
    """Fails on the first gradient it sees."""

    name = "raises_in_on_grad"
    needs = frozenset({GRAD})

    def on_grad(self, state, weight, grad):
        raise ValueError("boom")


class RaisesInFinalize(Metric):
    """Fails when asked for its scores."""

    name = "raises_in_finalize"

    def finalize(self, state, weight, num_batches):
        return state[state.shape[0]]  # one past the last row


class RunsOutOfMemory(Metric):
    """Behaves as a GPU does when an accumulator no longer fits."""

    name = "runs_out_of_memory"
    needs = frozenset({GRAD})

    def on_grad(self, state, weight, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    """A few thousand tokens: enough blocks, seconds less tokenizing than WikiText-2."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(tiny.wikitext_sample(8000))
    return str(path)


@pytest.fixture
def with_metrics(registry, monkeypatch) -> Registry:
    """The installed plugins plus this file's metrics, for the Python API and the CLI."""
    extra = [PluginInfo("metric", cls.name, "", "tests", "0", cls)
             for cls in (RaisesInOnGrad, RaisesInFinalize, RunsOutOfMemory)]
    combined = Registry([*registry.entries, *extra])
    monkeypatch.setattr(pipeline, "default_registry", lambda: combined)
    return combined


@pytest.mark.parametrize("metric, where", [
    ("raises_in_on_grad", "on_grad(model.layers.1.mlp.down_proj.weight): ValueError: boom"),
    ("raises_in_finalize", "finalize(model.layers.0.self_attn.q_proj.weight): IndexError"),
])
def test_a_plugin_that_raises_is_named(metric, where, with_metrics, tiny_llama_dir, text, tmp_path):
    with pytest.raises(PluginFailure) as failure:
        pipeline.run(model=str(tiny_llama_dir), metric=metric, seq_len=16, max_samples=2,
                     eval_samples=2, topk=2, dataset=text, out_dir=str(tmp_path / "api"),
                     registry=with_metrics)
    assert f"metric '{metric}' failed in {where}" in str(failure.value)

    out_dir = tmp_path / "cli"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), "--metric", metric,
                                      *FAST, text, "--out-dir", str(out_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"Error: {failure.value}"
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and metric in manifest["error"]


def test_out_of_memory_names_the_flags_that_help(with_metrics, tiny_llama_dir, text, tmp_path):
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), "--metric",
                                      "runs_out_of_memory", *FAST, text, "--out-dir", str(out_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: out of memory during scoring (CUDA out of memory. Tried")
    for flag in ("--batch-size", "--max-samples", "--gradient-checkpointing",
                 "--accum-dtype bf16", "--device-map auto"):
        assert flag in line
    assert "runs_out_of_memory" not in line  # the run's size is at fault, not the plugin
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["last_completed_stage"] == "data"
    assert manifest["error"].startswith("EsaError: out of memory during scoring")


def test_sigterm_is_raised_like_ctrl_c_and_the_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as stopped, terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises as soon as the signal lands
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_mid_scoring_is_recorded_then_resumed(tiny_llama_dir, text, tmp_path, monkeypatch):
    """`kill <pid>` after the first seed: exit 143, manifest `interrupted`, seed 1 kept."""
    score, calls, kill_at = ScoringRun.score, [], {6}

    def score_then_get_killed(self, blocks, seed, label=""):
        calls.append(seed)
        if seed in kill_at:
            kill_at.clear()
            os.kill(os.getpid(), signal.SIGTERM)
        return score(self, blocks, seed, label)

    monkeypatch.setattr(ScoringRun, "score", score_then_get_killed)
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_llama_dir), *FAST, text, "--seeds", "5,6,7",
            "--out-dir", str(out_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 128 + signal.SIGTERM
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["error"] == "Terminated: stopped by SIGTERM"
    assert (out_dir / "checkpoints" / "seed_5.safetensors").is_file()

    calls.clear()
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    assert calls == [6, 7]


def test_resume_of_nothing_starts_the_run(tiny_llama_dir, text, tmp_path):
    """A retry loop may always pass --resume: with no folder yet it simply runs."""
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), *FAST, text,
                                      "--out-dir", str(out_dir), "--resume"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "complete" and "resumed" not in manifest


def test_a_folder_another_run_is_writing_is_refused(tiny_llama_dir, text, tmp_path):
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_llama_dir), *FAST, text, "--out-dir", str(out_dir),
            "--resume"]
    other = FolderLock(out_dir)  # what a still-running `esa run` holds
    other.acquire()
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (f"Error: --out-dir {out_dir} is being written by another "
                                      "ESA process; wait for it to finish, or choose another "
                                      "--out-dir.")
    assert not any(out_dir.iterdir())
    other.release()
    assert CliRunner().invoke(app, args).exit_code == 0
