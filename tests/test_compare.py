"""`esa compare` over real tiny-model result folders, checked against the CSVs by hand."""

import csv
import json
import shutil

import numpy as np
import pytest
import tiny
from typer.testing import CliRunner

from esa_core.cli import app

RUNS = {"seed1337_k8": ["--seeds", "1337", "--topk", "8"],
        "seed123_k8": ["--seeds", "123", "--topk", "8"],
        "seed1337_k4": ["--seeds", "1337", "--topk", "4", "--mode", "global"],
        "super_weight": ["--seeds", "1337", "--topk", "8", "--metric", "super_weight"]}


@pytest.fixture(scope="module")
def run_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = root / "wiki.txt"
    text.write_text(tiny.wikitext_sample(), encoding="utf-8")
    folders = []
    for name, extra in RUNS.items():
        result = CliRunner().invoke(app, [
            "run", "--model", str(tiny_llama_dir), "--dataset", str(text), "--seq-len", "16",
            "--max-samples", "4", "--eval-samples", "2", "--out-dir", str(root / name), *extra])
        assert result.exit_code == 0, result.output
        folders.append(root / name)
    return folders


def _csv(folder, component=None):
    with open(folder / "top_weights.csv", newline="") as f:
        return {(r["param"], r["expert"], r["row"], r["col"]): float(r["score"])
                for r in csv.DictReader(f) if component in (None, r["component"])}


def _spearman(a, b):
    """Spearman by hand for distinct values: Pearson correlation of the ranks."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_compare_prints_and_writes_the_jaccard_matrix(run_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["compare", *map(str, run_dirs)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "comparison"  # the default: ./comparison, outside every run folder
    comparison = json.loads((out / "comparison.json").read_text())
    assert (out / "comparison_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert comparison["labels"] == list(RUNS)

    tops = [_csv(f) for f in run_dirs]
    matrix = np.array(comparison["jaccard_matrix"])
    for i, a in enumerate(tops):
        for j, b in enumerate(tops):
            hand = len(a.keys() & b.keys()) / len(a.keys() | b.keys())
            assert matrix[i, j] == pytest.approx(hand)
    assert 0 < matrix[0, 1] < 1  # two seeds agree on some weights, not all

    pair = comparison["pairs"][0]  # seed 1337 vs seed 123: rank correlation on shared weights
    shared = [w for w in tops[0] if w in tops[1]]
    assert pair["shared"] == len(shared) >= 2
    hand = _spearman([tops[0][w] for w in shared], [tops[1][w] for w in shared])
    assert pair["spearman_shared"] == pytest.approx(hand)

    # the matrix is printed: one row per run, values to three decimals, and its legend
    assert "Jaccard" in result.output
    for i, row in enumerate(matrix, start=1):
        assert f"{i:>7}  " + "  ".join(f"{v:5.3f}" for v in row) in result.output
    assert "consistency across runs" in result.output


def test_runs_of_different_scopes_are_also_compared_on_the_components_both_scored(
        run_dirs, tmp_path):
    # super_weight scores only mlp.down: the others' attention picks can never meet it there
    result = CliRunner().invoke(app, ["compare", str(run_dirs[0]), str(run_dirs[3]),
                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    pair, = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["pairs"]
    assert pair["common_components"] == ["mlp.down"]
    a, b = _csv(run_dirs[0], "mlp.down"), _csv(run_dirs[3], "mlp.down")
    assert len(a) == len(b) > 0
    hand = len(a.keys() & b.keys()) / len(a.keys() | b.keys())
    assert pair["jaccard_common_components"] == pytest.approx(hand)
    everything = _csv(run_dirs[0])
    assert pair["jaccard"] == pytest.approx(len(everything.keys() & b.keys())
                                            / len(everything.keys() | b.keys()))
    assert pair["jaccard"] < pair["jaccard_common_components"]
    assert f"1 vs 2 on the components both scored (mlp.down): {hand:.3f}" in result.output
    # runs of one scope carry no such field
    result = CliRunner().invoke(app, ["compare", str(run_dirs[0]), str(run_dirs[1]),
                                      "--out", str(tmp_path / "same")])
    pair, = json.loads((tmp_path / "same" / "comparison.json").read_text())["pairs"]
    assert "jaccard_common_components" not in pair


def test_compare_refuses_runs_of_different_models(run_dirs, tmp_path):
    other = tmp_path / "other_model"
    shutil.copytree(run_dirs[0], other)
    manifest = json.loads((other / "experiment_manifest.json").read_text())
    manifest["model"]["id"] = "another/model"
    (other / "experiment_manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["compare", str(run_dirs[1]), str(other),
                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2
    assert "different models" in result.output
    assert not (tmp_path / "cmp").exists()


def test_compare_names_a_folder_that_is_not_a_result(run_dirs, tmp_path):
    result = CliRunner().invoke(app, ["compare", str(run_dirs[0]), str(tmp_path),
                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2
    assert "not an ESA result folder" in result.output
