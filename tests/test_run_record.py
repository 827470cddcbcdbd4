"""A run record that never says more than happened: broken weights and losses are refused in one
line, `complete` is written after every file, and `--resume` finishes a run whose report failed."""

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from esa_core import engine
from esa_core.cli import app
from esa_core.resume import Checkpoints

FAST = ["--seq-len", "16", "--max-samples", "4", "--eval-samples", "2"]
MANIFEST = "experiment_manifest.json"


def run_cli(model: Path, out_dir: Path, *extra: str):
    return CliRunner().invoke(app, ["run", "--model", str(model), "--out-dir", str(out_dir),
                                    *FAST, *extra])


def changed_copy(tiny_llama_dir: Path, folder: Path, change) -> Path:
    """The tiny model saved again after `change(weights)` edits its tensors in place."""
    folder.mkdir()
    for item in tiny_llama_dir.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(tiny_llama_dir / "model.safetensors")
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_nonfinite_weights_are_refused_at_load_naming_count_and_parameters(tiny_llama_dir,
                                                                           tmp_path):
    def break_two(weights):
        weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("-inf")
        weights["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("nan")

    model = changed_copy(tiny_llama_dir, tmp_path / "broken", break_two)
    result = run_cli(model, tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"Error: '{model.name}' has 3 non-finite weights (NaN or infinite) in 2 parameters: "
        "model.layers.0.self_attn.q_proj.weight (1), model.layers.1.mlp.down_proj.weight (2); "
        "every score would be NaN. Repair or re-download the model."]
    assert not (tmp_path / "run").exists()  # refused before the result folder is made


def test_a_loss_that_turns_nonfinite_stops_scoring_naming_seed_and_batch(tiny_llama_dir,
                                                                         tmp_path):
    """Finite weights, but an output head of 3e38 overflows the logits: the loss is NaN."""
    def overflow(weights):
        weights["lm_head.weight"].fill_(3e38)

    model = changed_copy(tiny_llama_dir, tmp_path / "overflowing", overflow)
    result = run_cli(model, tmp_path / "run", "--seeds", "7")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the loss became non-finite while scoring seed 7, at batch 1 of 4 (and 3 later "
        "ones), so every score would be NaN: the model overflows on this text (in fp16, try "
        "--dtype bf16 or fp32).")
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["status"] == "interrupted" and manifest["failed_stage"] == "scoring"
    assert not (tmp_path / "run" / "top_weights.csv").exists()


def failing_write(monkeypatch, name: str) -> None:
    """Writing `name` (its temporary file) fails as a full disk would."""
    write_bytes = Path.write_bytes

    def fail(path, data):
        if path.name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", fail)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def complete_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """An uninterrupted run with plots: the files a resumed run must end up with."""
    out_dir = tmp_path_factory.mktemp("complete") / "run"
    result = run_cli(tiny_llama_dir, out_dir, "--save-plots")
    assert result.exit_code == 0, result.output
    return out_dir


@pytest.mark.parametrize("failing", ["report.html", "perturbation_effects.png"])
def test_a_failed_report_write_leaves_interrupted_and_resume_writes_only_what_is_missing(
        failing, tiny_llama_dir, complete_run, tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        failing_write(patch, failing)
        result = run_cli(tiny_llama_dir, out_dir, "--save-plots", "--perturb", "zero",
                         "--controls", "random_k")
    assert result.exit_code == 2, result.output
    written = out_dir / ("plots/" if failing.endswith(".png") else "") / failing
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: cannot write {written}: the disk is full.")
    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["failed_stage"] == ("report" if failing == "report.html" else "plots")
    assert manifest["error"].startswith("OSError: [Errno 28]")
    assert not (out_dir / "report.html").exists() and not written.exists()
    before = files_of(out_dir)

    def no_recompute(*args, **kwargs):
        raise AssertionError("--resume recomputed what the folder already holds")

    monkeypatch.setattr(engine.ScoringRun, "score", no_recompute)
    monkeypatch.setattr("esa_models.llama.LlamaAdapter.load", no_recompute)
    resumed = run_cli(tiny_llama_dir, out_dir, "--save-plots", "--perturb", "zero",
                      "--controls", "random_k", "--resume")
    assert resumed.exit_code == 0, resumed.output
    after = files_of(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert manifest["status"] == "complete" and "error" not in manifest
    assert manifest["resumed"][0]["previous_status"] == "interrupted"
    assert {"scoring_s", "evaluation_s", "plots_s", "total_s"} <= set(manifest["timings"])
    # the results are those of the interrupted run, byte for byte; what was missing is there
    # now, and the checkpoints kept for --resume are gone with the run complete
    results = {k: v for k, v in before.items() if k != MANIFEST and "checkpoints" not in k}
    assert {k: v for k, v in after.items() if k in results} == results
    assert any(k.startswith("checkpoints/") for k in before)
    expected = set(files_of(complete_run)) | {"perturbation_results.json",
                                              "control_analysis.json",
                                              "plots/perturbation_effects.png"}
    assert set(after) == expected
    assert "status <b>complete</b>" in (out_dir / "report.html").read_text()


def test_the_manifest_is_written_complete_only_after_the_report(tiny_llama_dir, tmp_path,
                                                                monkeypatch):
    """The order of the last writes: report.html first, then the manifest that says complete."""
    order = []
    write_bytes = Path.write_bytes

    def record(path, data):
        if path.name.startswith((".report.html.", f".{MANIFEST}.")):
            order.append((path.name.split(".")[1], json.loads(data).get("status")
                          if MANIFEST in path.name else None))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", record)
    assert run_cli(tiny_llama_dir, tmp_path / "run").exit_code == 0
    assert order[-2:] == [("report", None), ("experiment_manifest", "complete")]
    assert [status for _, status in order].count("complete") == 1


def test_the_checkpoint_skip_warning_names_the_margin_it_keeps_and_why(tmp_path, monkeypatch,
                                                                       caplog):
    from esa_core import resume

    free = resume.shutil._ntuple_diskusage(total=10**9, used=10**9 - 405_500, free=405_500)
    monkeypatch.setattr(resume.shutil, "disk_usage", lambda path: free)
    with caplog.at_level(logging.WARNING):
        Checkpoints(tmp_path, {}, "always").save_tensors("seed_1337", {"w": torch.zeros(350)})
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint 'seed_1337' not saved (it needs 1.4 KB, plus 67.1 MB kept free so that the "
        "results can still be written, and the disk has 405.5 KB free); the run goes on, but "
        "--resume would score this part again"]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_library_warning_reaches_the_screen_only_with_verbose(verbose):
    code = ("import warnings; from esa_core.cli import _setup_logging; "
            f"_setup_logging({verbose}); warnings.warn('a library speaks')")
    shown = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                           text=True, check=True)
    assert ("a library speaks" in shown.stderr) == verbose, shown.stderr


def test_score_figures_with_nonfinite_scores_are_skipped_with_the_reason(full_result, tmp_path):
    """A NaN score (null in JSON, nan in the CSV) never reaches a log axis or a colour map."""
    import warnings

    from esa_core import plots
    from esa_core.layout import RunFiles

    run = RunFiles.read(full_result)
    run.stats["global"]["max"] = None
    run.top[0]["score"] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = plots.render(run)
    reason = "the scores are not finite (NaN or infinite): there is nothing to draw"
    assert figures.skipped == {"sensitivity_heatmap.png": reason,
                               "weight_distribution.png": reason}
    assert "perturbation_effects.png" in figures.png


def test_the_finite_check_counts_what_a_loop_counts():
    """Counted per matrix on the device: the count a brute-force loop over the values gives."""
    from esa_core.errors import EsaError
    from esa_core.loading import refuse_nonfinite

    model = tiny.build(tiny.llama_config())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.view(-1)[::7] = float("inf")
    expected = sum(1 for v in model.model.layers[0].mlp.up_proj.weight.view(-1).tolist()
                   if v in (float("inf"), float("-inf")) or v != v)
    with pytest.raises(EsaError, match=f"has {expected} non-finite weights .* in 1 parameter: "
                       rf"model.layers.0.mlp.up_proj.weight \({expected}\);"):
        refuse_nonfinite(model, "m")
