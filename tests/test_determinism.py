"""The same command twice gives the same result folder, apart from times."""

from __future__ import annotations

import json

import tiny
from typer.testing import CliRunner

from esa_core.cli import app
from esa_core.resume import comparable

VOLATILE = ("argv", "started_at", "finished_at", "timings")


def test_same_command_twice_gives_identical_results(tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(tiny.wikitext_sample(12_000))
    outputs = [tmp_path / "first", tmp_path / "second"]
    for out_dir in outputs:
        result = CliRunner().invoke(app, [
            "run", "--model", str(tiny_llama_dir), "--dataset", str(text), "--seq-len", "16",
            "--max-samples", "6", "--eval-samples", "2", "--seeds", "11,22,33", "--mode",
            "global", "--topk", "40", "--device", "cpu", "--out-dir", str(out_dir)])
        assert result.exit_code == 0, result.output
    first, second = outputs
    assert (first / "top_weights.csv").read_bytes() == (second / "top_weights.csv").read_bytes()
    assert (first / "sensitivity_stats.json").read_bytes() == (
        second / "sensitivity_stats.json").read_bytes()

    manifests = [json.loads((d / "experiment_manifest.json").read_text()) for d in outputs]
    stable = [{**{k: v for k, v in m.items() if k not in VOLATILE},
               "config": comparable(m["config"])} for m in manifests]  # config without out_dir
    assert stable[0] == stable[1]
    # every seed is recorded with the blocks it drew, and different seeds drew different blocks
    seeds = manifests[0]["seeds"]
    assert sorted(seeds) == ["11", "22", "33"]
    drawn = [tuple(s["calibration_blocks"]) for s in seeds.values()]
    assert all(len(d) == 6 for d in drawn) and len(set(drawn)) == 3
