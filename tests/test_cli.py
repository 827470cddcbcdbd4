"""`esa run` end to end: CliRunner, a real subprocess, the original runner, the Python API."""

import csv
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from esa_models.llama import LlamaAdapter
from safetensors.torch import load_file
from typer.testing import CliRunner

import esa_core
from esa_core import pipeline
from esa_core.cli import app
from esa_core.plugins import PluginInfo, Registry
from esa_core.resume import folder_bytes, human_bytes

ROOT = Path(__file__).resolve().parent.parent
FILES = ("experiment_manifest.json", "sensitivity_stats.json", "top_weights.csv")
FAST = ["--seq-len", "16", "--max-samples", "4", "--eval-samples", "2"]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_csv_indexes_true_weights(out_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    rows = read_csv(out_dir / "top_weights.csv")
    assert rows
    for row in rows:
        index = tuple(int(row[k]) for k in ("expert", "row", "col") if row[k] != "")
        assert float(weights[row["param"]][index]) == float(row["weight"])


def test_cli_run_global_on_saved_llama_folder(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_llama_dir), "--metric", "grad_x_weight", "--mode", "global",
        "--topk", "50", "--max-samples", "8", "--seq-len", "16", "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert all((out_dir / f).is_file() for f in FILES)
    rows = read_csv(out_dir / "top_weights.csv")
    assert len(rows) == 50
    assert [int(r["rank"]) for r in rows] == list(range(1, 51))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert_csv_indexes_true_weights(out_dir, load_file(tiny_llama_dir / "model.safetensors"))

    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["adapter"] == "llama"
    assert manifest["data"]["n_calibration"] == 8
    assert len(manifest["seeds"]["1337"]["calibration_blocks"]) == 8
    assert set(manifest["timings"]) >= {"load_s", "data_s", "scoring_s", "selection_s", "total_s"}
    stats = json.loads((out_dir / "sensitivity_stats.json").read_text())
    assert stats["global"]["count"] == manifest["model"]["n_scored"]
    # embeddings and lm_head are not scored by default
    assert not {r["component"] for r in rows} & {"embed", "lm_head"}


def test_per_layer_mode_takes_topk_from_every_matrix(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), "--topk", "3",
                                      *FAST, "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out_dir / "top_weights.csv")
    per_matrix = Counter((r["layer"], r["component"]) for r in rows)
    assert len(per_matrix) == 2 * 7 and set(per_matrix.values()) == {3}


def test_existing_result_folder_is_refused_without_overwrite(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_llama_dir), "--topk", "2", *FAST, "--out-dir", str(out_dir)]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert "--overwrite" in refused.output
    assert {p: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_unknown_metric_is_one_line_naming_the_choices(tiny_llama_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "esa_core.cli", "run", "--model", str(tiny_llama_dir),
         "--metric", "activation_magnitude", "--out-dir", str(tmp_path / "x")],
        capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "unknown metric 'activation_magnitude'" in lines[0]
    assert "grad_x_weight" in lines[0]
    assert not (tmp_path / "x").exists()


def test_flags_change_what_they_say(tiny_llama_dir, tmp_path):
    """--dtype, --seq-len, --eval-samples and --include reach the run (not accepted and ignored)."""
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_llama_dir), "--topk", "2", "--dtype", "bf16", "--seq-len", "24",
        "--max-samples", "3", "--eval-samples", "2", "--include", "mlp.down",
        "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["model"]["dtype"] == "bfloat16"
    assert manifest["data"]["seq_len"] == 24
    assert manifest["data"]["n_eval"] == 2
    assert {r["component"] for r in read_csv(out_dir / "top_weights.csv")} == {"mlp.down"}


def test_subprocess_console_script_and_runner_shim(tiny_llama_dir, tmp_path):
    esa = Path(sys.executable).parent / "esa"
    out_dir = tmp_path / "run"
    done = subprocess.run([str(esa), "run", "--model", str(tiny_llama_dir), "--topk", "2",
                           *FAST, "--out-dir", str(out_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all((out_dir / f).is_file() for f in FILES)
    # the original guide's entry point takes the same flags, --help included
    shim = subprocess.run([sys.executable, str(ROOT / "esa_runner.py"), "--help"],
                          capture_output=True, text=True)
    assert shim.returncode == 0
    for flag in ("--model", "--metric", "--mode", "--topk", "--max-samples", "--seeds",
                 "--stability-check", "--dtype", "--save-plots", "--verbose", "--out-dir",
                 "--perturb", "--perturb-scale", "--perturb-prob", "--controls"):
        assert flag in shim.stdout


def test_python_api_mirrors_the_cli(tiny_llama_dir, tmp_path):
    result = esa_core.run(model=str(tiny_llama_dir), topk=4, mode="global", seq_len=16,
                          max_samples=4, eval_samples=2, out_dir=str(tmp_path / "api"))
    assert len(result.selection) == 4
    assert result.manifest["status"] == "complete"
    assert (tmp_path / "api" / "top_weights.csv").is_file()


@pytest.mark.slow
def test_embedded_default_runs_offline(tmp_path):
    """`esa run` with no --model analyses SmolLM2-135M on the bundled WikiText-2."""
    out_dir = tmp_path / "default"
    result = subprocess.run(
        [sys.executable, str(ROOT / "esa_runner.py"), "--topk", "5", "--out-dir", str(out_dir)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["model"]["id"] == "SmolLM2-135M-Instruct"
    assert manifest["model"]["model_type"] == "llama"
    assert manifest["model"]["n_params"] > 100_000_000
    assert manifest["data"]["source"].startswith("wikitext2")
    from esa_core.loading import default_gguf, gguf_as_folder

    weights = load_file(gguf_as_folder(default_gguf()) / "model.safetensors")
    assert_csv_indexes_true_weights(out_dir, weights)
    assert len(read_csv(out_dir / "top_weights.csv")) == 5 * 30 * 7


def test_the_answer_is_printed_after_the_criteria(tiny_llama_dir, tmp_path):
    """The top 5 weights (as in top_weights.csv) and the report's path: no file to open."""
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), *FAST,
                                      "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    start = lines.index("Top 5 weights (all in top_weights.csv):")
    assert lines[start + 1].split() == ["rank", "param", "row", "col", "score", "weight"]
    for line, row in zip(lines[start + 2:start + 7], read_csv(out_dir / "top_weights.csv")):
        rank, param, r, c, score, weight = line.split()
        assert (rank, param, r, c) == (row["rank"], row["param"], row["row"], row["col"])
        assert float(score) == pytest.approx(float(row["score"]), rel=1e-3)
        assert float(weight) == pytest.approx(float(row["weight"]), rel=1e-3)
    assert lines[start + 7:] == [
        f"Results written to {out_dir}; the report is {out_dir / 'report.html'}"]


def test_quiet_prints_only_the_final_line(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), *FAST, "--quiet",
                                      "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"Results written to {out_dir}; the report is {out_dir / 'report.html'}"]
    assert result.stderr == ""


def test_a_log_file_gets_a_line_per_seed_and_per_stage(tiny_llama_dir, tmp_path):
    """Where stderr is not a terminal (a batch job's log), tqdm is silent: lines say instead."""
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), *FAST,
                                      "--seeds", "1,2", "--out-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "scoring seed 1", "scoring seed 2", "scoring", "selection", "plots", "report"]
    assert re.fullmatch(r"scoring seed 1: 4/4 batches, [\d.]+ s, [\d.]+ batches/s", lines[0])
    assert re.fullmatch(r"selection: done, [\d.]+ s", lines[3])


def test_progress_in_a_log_is_one_line_per_30_s(monkeypatch, capsys):
    from esa_core import progress

    clock = iter([0.0, 10.0, 31.0, 40.0, 65.0, 70.0, 75.0])  # start, then after each item
    monkeypatch.setattr(progress, "clock", lambda: next(clock))
    assert list(progress.track(range(6), "scoring seed 7", "batches")) == list(range(6))
    assert capsys.readouterr().err.splitlines() == [
        "scoring seed 7: 2/6 batches, 31.0 s",
        "scoring seed 7: 4/6 batches, 65.0 s",
        "scoring seed 7: 6/6 batches, 75.0 s, 0.1 batches/s",
    ]


class BrokenAdapter(LlamaAdapter):
    """An adapter with a bug: its load raises what no check foresaw."""

    name = "broken"

    def scored_params(self, model, include=(), exclude=()):
        raise AttributeError("'NoneType' object has no attribute 'weight'")


@pytest.fixture
def with_broken_adapter(registry, monkeypatch):
    entry = PluginInfo("model adapter", "broken", "", "tests", "0", BrokenAdapter)
    monkeypatch.setattr(pipeline, "default_registry",
                        lambda: Registry([*registry.entries, entry]))


@pytest.mark.usefixtures("with_broken_adapter")
def test_an_unexpected_failure_is_one_line_naming_stage_plugin_and_error_log(tiny_llama_dir,
                                                                            tmp_path):
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_llama_dir), *FAST, "--adapter", "broken",
            "--out-dir", str(out_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    match = re.fullmatch(r"Error: unexpected failure during load \(model adapter 'broken'\): "
                         r"AttributeError: 'NoneType' object has no attribute 'weight'\. "
                         r"The full traceback is in (\S+); please include it when you report "
                         r"this\.", line)
    assert match, line
    log = Path(match[1])
    assert "Traceback" in log.read_text() and "scored_params" in log.read_text()
    assert not out_dir.exists()  # refused before the folder was made: the log is a temp file
    log.unlink()

    verbose = CliRunner().invoke(app, [*args, "--verbose"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("Error: unexpected failure")


def test_an_unexpected_failure_mid_run_leaves_error_log_in_the_folder(tiny_llama_dir, tmp_path,
                                                                     monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "sensitivity_stats", bug)
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), *FAST,
                                      "--out-dir", str(out_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    size = human_bytes(folder_bytes(out_dir / "checkpoints"))  # the seed's top-k, for --resume
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: unexpected failure during selection: ZeroDivisionError: division by zero. "
        f"The full traceback is in {out_dir / 'error.log'}; please include it when you report "
        f"this. {out_dir / 'checkpoints'} holds {size} for --resume; --overwrite (or deleting "
        "the folder) frees the space.")
    assert "in bug" in (out_dir / "error.log").read_text()
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["last_completed_stage"] == "scoring"
    assert manifest["error"] == "ZeroDivisionError: division by zero"


def test_cli_prints_critical_weights_and_the_detection_table(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_llama_dir), "--metric", "super_weight", "--mode", "global",
        "--topk", "5", "--ablate-top", "3", "--critical-ratio", "1.0", "--metric-arg",
        "threshold=0", *FAST, "--out-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "experiment_manifest.json").read_text())
    critical = manifest["ablation"]["critical_weights"]
    assert f"{len(critical)} of 3 ablated" in result.output
    for w in critical:
        assert f"{w['param']}[{w['row']}, {w['col']}]" in result.output
    stats = json.loads((tmp_path / "run" / "sensitivity_stats.json").read_text())
    rows = stats["findings"]["super_weight_detection"]["rows"]
    assert (f"Super-weight detection, Yu et al. 2024 (threshold 0): {len(rows)} of {len(rows)} "
            "row(s) with passes") in result.output
    printed = [line.split() for line in result.output.splitlines()]
    for d in rows:  # every passing row, under its columns
        assert [d["param"], str(d["layer"]), d["component"], "-", str(d["row"]), str(d["col"]),
                f"{d['output_max']:.4g}", str(d["output_token"]), f"{d['input_max']:.4g}",
                str(d["input_token"])] in printed
