"""`esa study`: a grid of real runs on tiny models, and its answer checked against the cells'
own files by hand (Jaccard, Spearman, domain overlap, depth profile, Gini)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
from scipy import stats
from typer.testing import CliRunner

from esa_core import loading
from esa_core.cli import app
from esa_core.plugins import registry as load_registry
from esa_core.study import execute, spec

SMALL = {"topk": 8, "seq_len": 16, "max_samples": 4, "eval_samples": 2}
METRICS = ["grad_x_weight", "grad_squared", "act_mag"]


def toml_value(value):
    return json.dumps(value)  # TOML's strings, numbers and arrays read like JSON's


def write_study(path: Path, grid: dict, run: dict | None = None, name: str = "tiny") -> Path:
    lines = [f"name = {toml_value(name)}", "[run]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in {**SMALL, **(run or {})}.items()]
    lines += ["[grid]"] + [f"{k} = {toml_value(v)}" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(tiny.wikitext_sample(), encoding="utf-8")
    return str(path)


def top_csv(folder: Path) -> dict:
    with open(folder / "top_weights.csv", newline="") as f:
        return {(r["param"], r["expert"], r["row"], r["col"]): float(r["score"])
                for r in csv.DictReader(f)}


def hand_jaccard(a: dict, b: dict) -> float:
    return len(a.keys() & b.keys()) / len(a.keys() | b.keys())


def hand_spearman(a: dict, b: dict) -> float:
    """Pearson of average ranks over the union; a weight missing from a top-k ranks below
    all of it, tied with the other missing ones."""
    union = sorted(a.keys() | b.keys())

    def ranks(scores):
        values = [scores.get(w) for w in union]
        present = sorted(v for v in values if v is not None)
        missing = sum(v is None for v in values)
        out = []
        for v in values:
            if v is None:
                out.append((missing + 1) / 2)
            else:  # average rank of ties, counted after the missing ones
                below = sum(p < v for p in present)
                same = sum(p == v for p in present)
                out.append(missing + below + (same + 1) / 2)
        return np.array(out)

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_union_spearman_and_gini_against_hand_computations():
    from esa_core.study.answer import gini, union_spearman

    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = [("p", "", str(i), "0") for i in range(30)]
        a = {ids[i]: float(rng.integers(0, 5)) for i in rng.permutation(30)[:12]}
        b = {ids[i]: float(rng.integers(0, 5)) for i in rng.permutation(30)[:12]}
        assert union_spearman(a, b) == pytest.approx(hand_spearman(a, b), abs=1e-12)
        x = rng.exponential(size=int(rng.integers(1, 9))).tolist() + [0.0] * (trial % 3)
        assert gini(x) == pytest.approx(hand_gini(x), abs=1e-12)
    assert gini([0.0, 0.0, 5.0]) == pytest.approx(2 / 3) and gini([1.0, 1.0]) == 0.0


@pytest.fixture(scope="module")
def grid_study(tiny_llama_dir, text_file, tmp_path_factory):
    """3 metrics x 2 datasets on one tiny model, in this process (counting model loads)."""
    root = tmp_path_factory.mktemp("grid")
    file = write_study(root / "study.toml", {"model": [str(tiny_llama_dir)], "metric": METRICS,
                                             "dataset": [text_file, "code"]})
    loads = []
    original = loading._read_pretrained

    def counted(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    loading._read_pretrained = counted
    try:
        result = CliRunner().invoke(app, ["study", str(file), "--out", str(root / "out")])
    finally:
        loading._read_pretrained = original
    assert result.exit_code == 0, result.output
    return root / "out", result.output, loads


@pytest.mark.slow
def test_cells_are_ordinary_runs_and_progress_counts_them(grid_study):
    folder, output, loads = grid_study
    cells = sorted(p.name for p in (folder / "cells").iterdir())
    assert len(cells) == 6 and "tiny-llama0__act_mag__code" in [
        c.replace(c.split("__")[0], "tiny-llama0") for c in cells]
    for i in range(1, 7):
        assert f"cell {i}/6 " in output and "starting" in output
    assert output.count(": done, ") == 6
    for cell in (folder / "cells").iterdir():
        manifest = json.loads((cell / "experiment_manifest.json").read_text())
        assert manifest["status"] == "complete" and (cell / "report.html").is_file()
    result = CliRunner().invoke(app, ["report", str(folder / "cells" / cells[0])])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # six cells of one model in one process: loaded once


@pytest.mark.slow
def test_consistency_equals_jaccard_and_spearman_by_hand(grid_study):
    folder, _, _ = grid_study
    found = json.loads((folder / "study.json").read_text())
    groups = found["consistency"]["groups"]
    assert len(groups) == 2  # one per dataset
    for group in groups:
        cells = {c["metric"]: folder / c["folder"] for c in found["cells"]
                 if c["values"]["dataset"] == group["fixed"]["dataset"]}
        tops = [top_csv(cells[m]) for m in group["metrics"]]
        for i, a in enumerate(tops):
            for j, b in enumerate(tops):
                assert group["jaccard"][i][j] == pytest.approx(hand_jaccard(a, b), abs=1e-12)
                if i != j:
                    assert group["spearman"][i][j] == pytest.approx(hand_spearman(a, b),
                                                                    abs=1e-9)
        assert group["gradient_based"] == ["grad_x_weight", "grad_squared"]
        expected = hand_jaccard(tops[0], tops[1])
        row = group["criterion"]
        assert row["value"] == pytest.approx(expected)
        assert row["verdict"] == ("PASS" if expected > 0.3 else "FAIL")
        assert row["threshold"] == "> 0.3"


@pytest.mark.slow
def test_domain_dependence_by_hand(grid_study):
    folder, _, _ = grid_study
    found = json.loads((folder / "study.json").read_text())
    for group in found["domains"]["groups"]:
        cells = [folder / c["folder"] for c in found["cells"]
                 if c["values"]["metric"] == group["fixed"]["metric"]]
        a, b = (set(top_csv(c)) for c in cells)
        assert group["jaccard"][0][1] == pytest.approx(len(a & b) / len(a | b))
        assert group["domain_general"] == len(a & b)
        assert list(group["only_in_one"].values()) == [len(a - b), len(b - a)]


@pytest.mark.slow
def test_depth_profile_and_component_share_by_hand(grid_study):
    folder, _, _ = grid_study
    found = json.loads((folder / "study.json").read_text())
    row, cell = found["scaling"]["rows"][0], found["cells"][0]
    with open(folder / cell["folder"] / "top_weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    total = sum(float(r["score"]) for r in rows)
    for layer in range(2):  # the tiny model has two blocks
        mass = sum(float(r["score"]) for r in rows if r["layer"] == str(layer))
        assert row["depth_profile"]["share"][layer] == pytest.approx(mass / total)
    assert row["depth_profile"]["depth"] == [0.0, 0.5]
    mlp_down = sum(float(r["score"]) for r in rows if r["component"] == "mlp.down")
    assert row["component_share"]["mlp.down"] == pytest.approx(mlp_down / total)
    assert found["architecture"]["rows"][0]["architecture"] == "dense"


@pytest.mark.slow
def test_page_is_self_contained_with_the_summary_first(grid_study):
    folder, _, _ = grid_study
    html = (folder / "study.html").read_text()
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Consistency across metrics</h2>")
    assert "data:image/png;base64," in html and "src='http" not in html
    assert (folder / "figures" / "consistency_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "figures" / "depth_profile.png").is_file()


@pytest.mark.slow
def test_rerun_skips_complete_cells_and_refuses_changed_settings(grid_study, tmp_path):
    folder, _, _ = grid_study
    file = folder.parent / "study.toml"
    before = (folder / "study.json").read_bytes()
    result = CliRunner().invoke(app, ["study", str(file), "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.count("complete already, skipped") == 6
    assert (folder / "study.json").read_bytes() == before
    changed = file.read_text().replace("topk = 8", "topk = 6")
    (tmp_path / "changed.toml").write_text(changed)
    result = CliRunner().invoke(app, ["study", str(tmp_path / "changed.toml"), "--out",
                                      str(folder)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "topk 8 -> 6" in lines[0] and "--overwrite" in lines[0]


@pytest.mark.parametrize("body, says", [
    ('name = "x"\n[run]\ntopk = 8\n[grid]\n', "the [grid] is empty"),
    ('name = "x"\n[run]\ntop_k = 8\n[grid]\nmetric = ["act_mag"]\n', "unknown option 'top_k'"),
    ('name = "x"\n[grid]\nmetric = ["act_mag", "nope"]\n', "unknown metric 'nope'"),
    ('name = "x"\n[grid]\nmetric = []\n', "non-empty list"),
    ('name = "x"\n[run]\ntopk = "many"\n[grid]\nmetric = ["act_mag"]\n', "wrong type"),
    ('name = "x"\n[grid]\nmodel = ["embedded"]\nmetric = ["act_mag"]\nmode = ["both"]\n',
     "unknown mode 'both'"),
    ('name = "x"\n[extra]\n', "unknown key 'extra'"),
    ('name = "x\n', "not valid TOML"),
])
def test_bad_study_file_is_one_line_before_anything_runs(tmp_path, body, says):
    (tmp_path / "s.toml").write_text(body)
    result = CliRunner().invoke(app, ["study", str(tmp_path / "s.toml"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert says in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_slurm_without_submitit_names_the_extra(tmp_path, monkeypatch, text_file,
                                                tiny_llama_dir):
    from esa_core.study import slurm

    monkeypatch.setattr(slurm, "submitit", None)
    file = write_study(tmp_path / "s.toml", {"model": [str(tiny_llama_dir)],
                                             "metric": ["act_mag"]})
    result = CliRunner().invoke(app, ["study", str(file), "--executor", "slurm", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "esa-toolkit[cluster]" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- resuming, executors

@pytest.fixture(scope="module")
def small_study(tiny_llama_dir, text_file, tmp_path_factory):
    """2 metrics x 2 datasets, uninterrupted, in this process: the reference study.json."""
    root = tmp_path_factory.mktemp("small")
    file = write_study(root / "study.toml", {"metric": ["grad_x_weight", "act_mag"],
                                             "dataset": [text_file, "code"]},
                       run={"model": str(tiny_llama_dir), "max_samples": 24,
                            "seeds": [1, 2, 3]})
    registry = load_registry()
    found = execute.run_study(spec.load(file, registry), root / "whole", registry=registry)
    return file, found


def _manifests(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((folder / "cells").glob("*/experiment_manifest.json"))}


@pytest.mark.slow
def test_killed_study_reruns_only_unfinished_cells(small_study, tmp_path):
    file, whole = small_study
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "esa_core.cli", "study", str(file), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill while the second cell runs
        states = {n: m.get("status") for n, m in _manifests(out).items()} if out.exists() else {}
        if list(states.values()).count("complete") == 1 and "running" in states.values():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _manifests(out)
    assert [m["status"] for m in before.values()].count("complete") == 1
    killed_at = time.time()
    time.sleep(1.1)  # manifests' times are in whole seconds

    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    after = _manifests(out)
    for name, m in after.items():
        assert m["status"] == "complete"
        if before.get(name, {}).get("status") == "complete":  # kept, not run again
            assert m["started_at"] == before[name]["started_at"]
            assert m["finished_at"] == before[name]["finished_at"]
            assert f"{name}: complete already, skipped" in result.stderr
        elif name in before:  # the killed cell: resumed, its first start kept
            assert m["started_at"] == before[name]["started_at"]
            assert m["resumed"][0]["previous_status"] == "running"
        else:  # not reached before the kill: started by the rerun
            assert time.mktime(time.strptime(m["started_at"][:19], "%Y-%m-%dT%H:%M:%S")) \
                - time.timezone >= killed_at - 1
    assert result.stderr.count("starting") + result.stderr.count("resuming") == 3
    assert json.loads((out / "study.json").read_text()) == whole


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_study(small_study, tmp_path):
    submitit = pytest.importorskip("submitit")
    file, whole = small_study
    registry = load_registry()
    cluster = submitit.LocalExecutor(folder=tmp_path / "jobs")
    cluster.update_parameters(timeout_min=10)
    found = execute.run_study(spec.load(file, registry), tmp_path / "array", executor="slurm",
                              registry=registry, cluster=cluster)
    assert found == whole
    assert len(list((tmp_path / "jobs").glob("*_log.out"))) == 4  # one task per cell


# --------------------------------------------------------------------------- scaling, MoE

def hand_gini(x: list[float]) -> float:
    """Mean absolute difference over twice the mean, by brute force."""
    n, mean = len(x), sum(x) / len(x)
    return sum(abs(a - b) for a in x for b in x) / (2 * n * n * mean)


@pytest.mark.slow
def test_scaling_study_of_three_sizes_and_a_mixtral(tmp_path, text_file):
    from esa_core.study import page

    sizes = {"llama-s": {}, "llama-m": dict(hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=3),
             "llama-l": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4)}
    models = [str(tiny.save(tiny.llama_config(**o), tmp_path / n)) for n, o in sizes.items()]
    models.append(str(tiny.save(tiny.family_config("mixtral"), tmp_path / "mixtral")))
    file = write_study(tmp_path / "s.toml", {"model": models},
                       run={"metric": "grad_x_weight", "dataset": text_file, "ablate_top": 3},
                       name="scaling")
    result = CliRunner().invoke(app, ["study", str(file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "out" / "study.json").read_text())
    rows = found["scaling"]["rows"]
    assert [r["n_layers"] for r in rows] == [2, 3, 4, 2]
    assert rows[0]["n_params"] < rows[1]["n_params"] < rows[2]["n_params"]
    assert all(len(r["depth_profile"]["share"]) == r["n_layers"] for r in rows)
    assert all("critical_weights" in r for r in rows)
    assert any(line.startswith("Scaling") for line in found["summary"])
    assert (tmp_path / "out" / "figures" / "depth_profile.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "figures" / "scaling.png").is_file()
    figure = page.depth_profile(found)
    assert len(figure.axes[0].get_lines()) == 4  # one line per model, in one panel

    dense, moe = found["architecture"]["rows"][0], found["architecture"]["rows"][3]
    assert dense["architecture"] == "dense" and dense["expert_share"] == 0
    assert moe["architecture"] == "moe"
    cell = tmp_path / "out" / found["cells"][3]["folder"]
    load = json.loads((cell / "sensitivity_stats.json").read_text())["router_load"]["per_layer"]
    with open(cell / "top_weights.csv", newline="") as f:
        top = list(csv.DictReader(f))
    masses, tokens = [], []
    for layer in range(2):
        for expert, count in enumerate(load[f"layers.{layer}"]):
            masses.append(sum(float(r["score"]) for r in top
                              if r["layer"] == str(layer) and r["expert"] == str(expert)))
            tokens.append(count)
    assert moe["n_experts_total"] == 8
    assert moe["expert_gini"] == pytest.approx(hand_gini(masses))
    assert moe["spearman_mass_vs_router_load"] == pytest.approx(
        stats.spearmanr(masses, tokens).statistic)
    in_experts = sum(float(r["score"]) for r in top if r["expert"])
    assert moe["expert_share"] == pytest.approx(in_experts / sum(float(r["score"]) for r in top))


def test_a_metrics_findings_reach_the_study_without_the_core_naming_the_metric():
    """A findings table in a cell's sensitivity_stats.json (any metric's) is carried to the
    scaling row with its marked rows only, each with layer / n_layers, and drawn on the page."""
    from types import SimpleNamespace

    from esa_core.study import answer, page

    table = {"title": "Steepest weights", "note": "", "mark": "agrees", "facts": {},
             "columns": [{"name": c, "help": ""} for c in ("param", "layer", "value", "agrees")],
             "rows": [{"param": "a", "layer": 1, "value": 2.5, "agrees": True},
                      {"param": "b", "layer": 3, "value": 9.0, "agrees": False},
                      {"param": "c", "layer": None, "value": 1.0, "agrees": True}]}
    stats = {"global": {}, "per_layer": {"x": {"layer": 0}, "y": {"layer": 3}},
             "findings": {"steepest": table}}
    run = SimpleNamespace(stats=stats, top=[], manifest={}, config={"metric": "abs_grad"})
    row = answer._scaling_row({}, run)
    assert row["findings"] == {"steepest": {
        "title": "Steepest weights", "columns": ["param", "layer", "value"],
        "rows": [{"param": "a", "layer": 1, "value": 2.5, "depth": 0.25},
                 {"param": "c", "layer": None, "value": 1.0, "depth": None}]}}
    html = page._scaling({"rows": [{**row, "model": "m", "n_params": 1, "metric": "abs_grad",
                                    "dataset": "d", "hill_tail_index": None,
                                    "excess_kurtosis": None}]}, {})
    assert "<h3>Steepest weights</h3>" in html and "0.25" in html and ">b<" not in html
