"""Every bad input: exit code 2, one line `Error: ...`, no traceback, and no file touched.

Each case runs `esa run` in a watched folder that also holds every input file the case uses;
the folder (and the model folder) is fingerprinted before and after, byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from typer.testing import CliRunner

from esa_core import pipeline
from esa_core.api import Perturbation
from esa_core.cli import app
from esa_core.config import RunConfig
from esa_core.errors import closest, unknown_choice, write_failure
from esa_core.plugins import PluginInfo, Registry

BASE = {"--model": "{tiny}", "--dataset": "small.txt", "--seq-len": "16", "--device": "cpu",
        "--max-samples": "2", "--eval-samples": "2", "--topk": "5", "--out-dir": "out"}


class NoopPerturbation(Perturbation):
    """A perturbation that changes nothing (stands in until real ones are registered)."""

    name = "test_noop"


class Pickled:
    """An object whose unpickling runs code: it would create a file in the watched folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# (id, flags replacing BASE's (None drops one; True is a bare switch), what the line must say)
CASES = [
    ("unknown metric", {"--metric": "activation_magnitude"},
     ["unknown metric 'activation_magnitude'", "grad_x_weight"]),
    ("unknown perturbation", {"--perturb": "gaussian"}, ["unknown perturbation 'gaussian'"]),
    ("unknown control", {"--perturb": "test_noop", "--controls": "random"},
     ["unknown control 'random'", "Did you mean 'random_k'?", "bottom_k"]),
    ("controls without perturb", {"--controls": "random_k"}, ["--controls needs --perturb"]),
    ("unknown mode", {"--mode": "globl"}, ["unknown mode 'globl'", "Did you mean 'global'?"]),
    ("unknown dtype", {"--dtype": "bf32"}, ["unknown dtype 'bf32'", "bf16, fp16, fp32"]),
    ("unknown device", {"--device": "tpu"}, ["unknown device 'tpu'", "cuda"]),
    ("unknown device map", {"--device-map": "everywhere"}, ["unknown device map 'everywhere'"]),
    ("unknown accumulator dtype", {"--accum-dtype": "fp8"}, ["unknown accumulator dtype 'fp8'"]),
    ("unknown checkpoint policy", {"--checkpoint": "sometimes"},
     ["unknown checkpoint policy 'sometimes'", "always, auto, never"]),
    ("unknown adapter", {"--adapter": "lama"}, ["unknown model adapter 'lama'",
                                                "Did you mean 'llama'?"]),
    ("seeds with a hole", {"--seeds": "1,,2"}, ["--seeds must be comma-separated integers"]),
    ("seeds not numbers", {"--seeds": "one,two"}, ["--seeds must be comma-separated integers"]),
    ("seeds repeated", {"--seeds": "1,1"}, ["--seeds has a repeated seed"]),
    ("seeds negative", {"--seeds": "-3"}, ["--seeds must be non-negative"]),
    ("topk zero", {"--topk": "0"}, ["--topk must be a positive integer; got 0"]),
    ("topk negative", {"--topk": "-5"}, ["--topk must be a positive integer; got -5"]),
    ("topk above a matrix", {"--topk": "513"},
     ["--topk 513 is larger than the smallest scored matrix (512 weights)"]),
    ("topk above the model", {"--mode": "global", "--topk": "100000000"},
     ["--topk 100000000 is larger than the number of scored weights"]),
    ("max-samples zero", {"--max-samples": "0"}, ["--max-samples must be a positive integer"]),
    ("max-samples above the pool", {"--max-samples": "100000"},
     ["--max-samples 100000 is larger than the calibration pool"]),
    ("eval-samples zero", {"--eval-samples": "0"}, ["--eval-samples must be a positive integer"]),
    ("batch-size zero", {"--batch-size": "0"}, ["--batch-size must be a positive integer"]),
    ("perturb-prob above 1", {"--perturb-prob": "1.5"}, ["--perturb-prob must lie in [0, 1]"]),
    ("perturb-prob below 0", {"--perturb-prob": "-0.1"}, ["--perturb-prob must lie in [0, 1]"]),
    ("seq-len one", {"--seq-len": "1"}, ["--seq-len must be at least 2"]),
    ("seq-len above the context", {"--seq-len": "1000"},
     ["--seq-len 1000 exceeds the model's context (256)"]),
    ("metric-arg without =", {"--metric-arg": "scale"}, ["--metric-arg must look like key=value"]),
    ("metric-arg unknown", {"--metric-arg": "scale=2"},
     ["grad_x_weight has no option 'scale'"]),
    ("perturb-arg without =", {"--perturb": "zero", "--perturb-arg": "scale"},
     ["--perturb-arg must look like key=value"]),
    ("perturb-arg unknown", {"--perturb": "sign_flip", "--perturb-arg": "prob=0.1"},
     ["sign_flip has no option 'prob'. Valid options: scale"]),
    ("perturb-scale for a rule without it", {"--perturb": "zero", "--perturb-scale": "2"},
     ["zero has no option 'scale'"]),
    ("perturb-arg out of range", {"--perturb": "bit_flip", "--perturb-arg": "prob=2"},
     ["bit_flip option 'prob' must lie in [0, 1]; got 2.0"]),
    ("eval-limit zero", {"--eval-limit": "0"}, ["--eval-limit must be a positive integer"]),
    ("model path missing", {"--model": "./no-such-model"}, ["model path not found"]),
    ("model gguf missing", {"--model": "no-such.gguf"}, ["model file not found"]),
    ("model hub id unknown (offline)", {"--model": "nobody-esa/no-such-model"},
     ["could not read the config of 'nobody-esa/no-such-model'"]),
    ("model folder without config", {"--model": "no_config"}, ["is not a model folder"]),
    ("model config unreadable", {"--model": "locked"}, ["could not read the config"]),
    ("model not a causal LM", {"--model": "distilbert"},
     ["is a distilbert model, not a causal language model"]),
    ("model config not JSON", {"--model": "garbage"},
     ["garbage/config.json is corrupt or truncated (JSONDecodeError", "re-download it"]),
    ("model config without model_type", {"--model": "no_type"}, ["could not read the config"]),
    ("model weights pickle code", {"--model": "pickled"},
     ["refused to load 'pickled'", "pickled code"]),
    ("dataset empty", {"--dataset": "empty.txt"}, ["too short for --seq-len 16"]),
    ("dataset too short", {"--dataset": "short.txt"}, ["too short for --seq-len 16"]),
    ("dataset folder without text", {"--dataset": "no_text"}, ["has no .txt files"]),
    ("dataset missing", {"--dataset": "missing.txt"}, ["--dataset path not found"]),
    ("out-dir is a file", {"--out-dir": "a_file"}, ["exists and is a file"]),
    ("out-dir holds results", {"--out-dir": "done"}, ["already holds results", "--overwrite",
                                                      "--resume"]),
    ("overwrite and resume", {"--overwrite": True, "--resume": True},
     ["--overwrite and --resume contradict each other"]),
    ("resume a folder that is not ESA's", {"--out-dir": "foreign", "--resume": True},
     ["has no experiment_manifest.json"]),
    ("resume a complete run", {"--out-dir": "done", "--resume": True}, ["already complete"]),
    ("resume with other settings", {"--out-dir": "interrupted", "--resume": True},
     ["the settings differ", "topk 7 -> 5)"]),
    ("model safetensors truncated", {"--model": "cut_weights"},
     ["cut_weights/model.safetensors is corrupt or truncated", "re-download it"]),
    ("model safetensors damaged", {"--model": "bad_weights"},
     ["bad_weights/model.safetensors is corrupt or truncated", "SafetensorError"]),
    ("model gguf truncated", {"--model": "cut.gguf"},
     ["cut.gguf is corrupt or truncated", "cannot reshape", "re-download it"]),
    ("model gguf not a gguf", {"--model": "junk.gguf"},
     ["junk.gguf is corrupt or truncated", "re-download it"]),
    ("model config truncated", {"--model": "cut_config"},
     ["cut_config/config.json is corrupt or truncated", "re-download it"]),
    ("model without a tokenizer", {"--model": "no_tokenizer"},
     ["no_tokenizer has no tokenizer", "tokenizer.json"]),
    ("dataset binary", {"--dataset": "binary.txt"},
     ["--dataset binary.txt is not UTF-8 text", "pass a plain-text .txt file"]),
    ("dataset not UTF-8", {"--dataset": "latin1.txt"},
     ["--dataset latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"]),
    ("dataset mostly control characters", {"--dataset": "controls.txt"},
     ["--dataset controls.txt is not text", "control characters"]),
    ("dataset folder with a binary file", {"--dataset": "mixed"},
     ["mixed/b.txt is not UTF-8 text"]),
    ("out-dir read-only", {"--out-dir": "read_only/run"},
     ["cannot write", "read_only: permission denied", "Choose another --out-dir"]),
    ("device cuda without CUDA", {"--device": "cuda"},
     ["--device cuda was asked for, but torch sees no CUDA device"]),
]


def argv(changes: dict, model: Path) -> list[str]:
    flags = {**BASE, **changes}
    out = ["run"]
    for flag, value in flags.items():
        if value is True:
            out.append(flag)
        elif value is not None:
            out.append(f"{flag}={value.format(tiny=model)}")
    return out


def fingerprint(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under `roots`: kind, mode, size, mtime and content hash."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                      if path.is_file() and os.access(path, os.R_OK) else None)
            seen[str(path)] = (path.is_dir(), st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tiny_llama_dir) -> Path:
    """A working folder holding every input the cases name, and nothing else."""
    root = tmp_path_factory.mktemp("watched")
    (root / "small.txt").write_text(tiny.wikitext_sample(6000))
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("Too short.")
    (root / "no_text").mkdir()
    (root / "no_text" / "notes.md").write_text("not a .txt file")
    (root / "a_file").write_text("a file, not a folder")
    (root / "no_config").mkdir()
    (root / "locked").mkdir()
    tiny.llama_config().save_pretrained(root / "locked")
    (root / "locked" / "config.json").chmod(0)
    from transformers import DistilBertConfig

    DistilBertConfig(vocab_size=tiny.VOCAB, dim=32, n_layers=1, n_heads=2,
                     hidden_dim=64).save_pretrained(root / "distilbert")
    (root / "garbage").mkdir()
    (root / "garbage" / "config.json").write_text("{not json")
    (root / "no_type").mkdir()
    (root / "no_type" / "config.json").write_text('{"hidden_size": 32}')
    pickled = root / "pickled"
    tiny.llama_config().save_pretrained(pickled)
    tiny.tokenizer().save_pretrained(pickled)
    torch.save({"model.embed_tokens.weight": Pickled(root / "PWNED")},
               pickled / "pytorch_model.bin")
    add_corrupt_inputs(root, tiny_llama_dir)
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.tex").write_text("someone else's work")
    (root / "done").mkdir()
    (root / "done" / "experiment_manifest.json").write_text('{"status": "complete"}')
    config = RunConfig(model=str(tiny_llama_dir), dataset="small.txt", seq_len=16, device="cpu",
                       max_samples=2, eval_samples=2, topk=7, out_dir="interrupted")
    (root / "interrupted").mkdir()
    (root / "interrupted" / "experiment_manifest.json").write_text(json.dumps(
        {"status": "interrupted", "config": config.resolved("cpu").to_dict()}))
    return root


def add_corrupt_inputs(root: Path, model: Path) -> None:
    """Damaged copies of a good model, a tiny truncated GGUF, and data that is not text."""
    import random
    import shutil

    import gguf
    import numpy as np

    for name in ("cut_weights", "bad_weights", "cut_config", "no_tokenizer"):
        shutil.copytree(model, root / name)
    weights = (model / "model.safetensors").read_bytes()
    (root / "cut_weights" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "bad_weights" / "model.safetensors").write_bytes(b"\xff" * 8 + weights[8:])
    config = (model / "config.json").read_bytes()
    (root / "cut_config" / "config.json").write_bytes(config[: len(config) // 2])
    for f in (root / "no_tokenizer").glob("*token*"):
        f.unlink()
    writer = gguf.GGUFWriter(root / "cut.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = (root / "cut.gguf").read_bytes()
    (root / "cut.gguf").write_bytes(whole[: len(whole) - 4000])
    (root / "junk.gguf").write_bytes(b"not a gguf file at all")
    (root / "binary.txt").write_bytes(random.Random(0).randbytes(5000))
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait ".encode("latin-1") * 500)
    (root / "controls.txt").write_bytes(b"\x00\x01\x02 text " * 500)
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text(tiny.wikitext_sample(6000))
    (root / "mixed" / "b.txt").write_bytes(random.Random(1).randbytes(5000))
    (root / "read_only").mkdir()
    (root / "read_only").chmod(0o555)


@pytest.fixture
def registry_with_a_perturbation(monkeypatch):
    """The installed plugins plus a test perturbation, so a control set can be asked for."""
    installed = pipeline.default_registry()
    extra = PluginInfo("perturbation", NoopPerturbation.name, "", "tests", "0",
                       NoopPerturbation)
    monkeypatch.setattr(pipeline, "default_registry",
                        lambda: Registry([*installed.entries, extra]))


def assert_one_error_line(stderr: str, words: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.usefixtures("registry_with_a_perturbation")
@pytest.mark.parametrize("changes, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(changes, words, watched, tiny_llama_dir,
                                                   monkeypatch):
    if "locked" in changes.values() and os.geteuid() == 0:
        pytest.skip("root reads a file whatever its permissions")
    if changes.get("--device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if os.geteuid() == 0:  # root may write anywhere: the kernel's answer to anyone else, simulated
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            Path(path).name != "read_only" and access(path, mode, **kw)))
    monkeypatch.chdir(watched)
    before = fingerprint(watched, tiny_llama_dir)
    result = CliRunner().invoke(app, argv(changes, tiny_llama_dir))
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, words)
    assert fingerprint(watched, tiny_llama_dir) == before


def test_max_samples_error_says_how_big_the_pool_is(watched, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(watched)
    result = CliRunner().invoke(app, argv({"--max-samples": "100000"}, tiny_llama_dir))
    pool = int(re.search(r"calibration pool: (\d+) blocks of 16 tokens", result.stderr)[1])
    ids = tiny.tokenizer()((watched / "small.txt").read_text(),
                           add_special_tokens=False)["input_ids"]
    blocks = len(ids) // 16
    assert pool == blocks - blocks // 10  # the last tenth of the blocks is held out


def test_verbose_adds_the_traceback(watched, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(watched)
    result = CliRunner().invoke(app, [*argv({"--topk": "0"}, tiny_llama_dir), "--verbose"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith(
        "Error: --topk must be a positive integer")


def test_bad_input_in_a_real_process(watched, tiny_llama_dir):
    """The console process itself: stderr holds the one line and nothing else (no warnings)."""
    before = fingerprint(watched, tiny_llama_dir)
    done = subprocess.run(
        [sys.executable, "-m", "esa_core.cli", *argv({"--seeds": "1,,2"}, tiny_llama_dir)],
        cwd=watched, capture_output=True, text=True)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, ["--seeds must be comma-separated integers"])
    assert fingerprint(watched, tiny_llama_dir) == before


def test_typer_usage_errors_also_exit_2(watched, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(watched)
    result = CliRunner().invoke(app, argv({"--topk": "abc"}, tiny_llama_dir))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--topk'" in result.output


@pytest.mark.parametrize("value, meant", [
    ("activation_magnitude", "act_mag"),
    ("gaussian", "gauss_noise"),
    ("random", "random_k"),
    ("grad_weight", "grad_x_weight"),
    ("signflip", "sign_flip"),
    ("zzz", None),
])
def test_closest_choice_is_what_the_user_meant(value, meant):
    choices = ["act_mag", "grad_x_weight", "grad_squared", "hessian_diag", "gauss_noise",
               "sign_flip", "bit_flip", "zero", "random_k", "bottom_k"]
    assert closest(value, choices) == meant
    message = str(unknown_choice("metric", value, choices))
    assert (f"Did you mean '{meant}'?" in message) == (meant is not None)
    assert message.endswith(f"Valid choices: {', '.join(sorted(choices))}.")


# what a run prints on stderr, where no terminal shows a bar, before it fails (esa_core.progress)
PROGRESS_LINE = re.compile(r"(scoring seed \d+: \d+/\d+ batches, .* s, .*/s|\w+: done, [\d.]+ s)$")

# (id, the errno a write into the result folder fails with, what the line must say)
WRITE_FAULTS = [
    ("disk full", errno.ENOSPC, ["the disk is full", "Free some space or choose another"]),
    ("permission denied", errno.EACCES, ["permission denied", "change its permissions"]),
    ("read-only file system", errno.EROFS, ["read-only file system", "Choose another --out-dir"]),
]


@pytest.mark.parametrize("code, words", [f[1:] for f in WRITE_FAULTS],
                         ids=[f[0] for f in WRITE_FAULTS])
def test_a_write_that_fails_mid_run_is_one_line(code, words, watched, tiny_llama_dir,
                                                monkeypatch, tmp_path):
    """Simulated: writing top_weights.csv fails as a full disk (or a revoked permission) would.
    The inputs are untouched, no half-written file is left, the manifest says `interrupted`."""
    write_bytes = Path.write_bytes

    def fail_on_results(path, data):
        if ".top_weights.csv." in path.name:
            raise OSError(code, os.strerror(code), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_results)
    monkeypatch.chdir(watched)
    out_dir = tmp_path / "run"
    before = fingerprint(watched, tiny_llama_dir)
    result = CliRunner().invoke(app, argv({"--out-dir": str(out_dir)}, tiny_llama_dir))
    assert result.exit_code == 2, result.output
    *progress, error = result.stderr.strip().splitlines()
    assert all(PROGRESS_LINE.match(line) for line in progress), result.stderr
    assert error.startswith(f"Error: cannot write {out_dir / 'top_weights.csv'}: ")
    assert_one_error_line(error, words)
    assert fingerprint(watched, tiny_llama_dir) == before
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["last_completed_stage"] == "scoring"
    assert f"Error: [Errno {code}] {os.strerror(code)}" in manifest["error"]  # OS or Permission
    assert not list(out_dir.glob("*top_weights*")) and not list(out_dir.glob(".*.tmp"))


def test_fp16_on_a_cpu_is_supported_so_it_runs(watched, tiny_llama_dir, tmp_path, monkeypatch):
    """torch computes fp16 on the CPU (slowly): --dtype fp16 is honoured, not refused."""
    monkeypatch.chdir(watched)
    out_dir = tmp_path / "fp16"
    result = CliRunner().invoke(app, argv({"--dtype": "fp16", "--out-dir": str(out_dir)},
                                          tiny_llama_dir))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["model"]["dtype"] == "float16"


def test_a_full_disk_under_safetensors_is_recognised():
    """safetensors reports a full disk as SafetensorError, the OS error inside its message."""
    from safetensors import SafetensorError

    raised = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                             'message: "No space left on device" })')
    raised.esa_path = "out/checkpoints/scores.safetensors"
    assert str(write_failure(raised)) == ("cannot write out/checkpoints/scores.safetensors: the "
                                          "disk is full. Free some space or choose another "
                                          "--out-dir.")
    assert write_failure(SafetensorError("invalid header length")) is None
