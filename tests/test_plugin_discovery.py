"""A separately installed distribution adds a metric, a perturbation and an evaluator through the
`esa` entry-point group."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent / "plugin_example"
ESA = [sys.executable, "-m", "esa_core.cli"]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example plugin installed into its own folder, as pip would for a user."""
    target = tmp_path_factory.mktemp("example-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(EXAMPLE)],
        check=True, capture_output=True,
    )
    assert list(target.glob("esa_plugin_example-*.dist-info"))
    return target


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}


def test_installed_plugin_is_listed_with_its_distribution(example_site):
    out = subprocess.run([*ESA, "list-plugins", "--json"], env=_env(example_site),
                         capture_output=True, text=True, check=True).stdout
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    row = rows[("metric", "abs_grad")]
    assert row["distribution"] == "esa-plugin-example"
    assert row["version"] == "0.0.1"
    # the built-ins come through the very same path
    assert rows[("metric", "grad_x_weight")]["distribution"] == "esa-toolkit"
    scale_by = rows[("perturbation", "scale_by")]
    assert scale_by["distribution"] == "esa-plugin-example"
    assert scale_by["options"].startswith("factor=0.0 (float)")
    assert rows[("evaluator", "top5")]["description"] == \
        "Top-5 next-token accuracy on the held-out blocks."
    assert rows[("evaluator", "top5")]["options"].startswith("k=5 (int)")
    assert rows[("perturbation", "bit_flip")]["options"].startswith("prob=0.05 (float)")


TOP5 = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import tiny
from esa_core.api import EvalData
from esa_core.plugins import registry
model = tiny.build(tiny.llama_config())
data = EvalData(tiny.blocks(4, seq_len=32), tiny.tokenizer(), batch_size=2)
top5 = registry().get("evaluator", "top5")()
[measure] = top5.measures()
value = top5.evaluate(model, data)[measure.name]
top1 = registry().get("evaluator", "perplexity")().evaluate(model, data)["accuracy"]
print(measure.change_name, value, top1)
"""


@pytest.mark.slow  # a fresh interpreter builds a tiny model and its tokenizer: about 11 s
def test_installed_evaluator_measures_a_model(example_site):
    out = subprocess.run([sys.executable, "-c", TOP5, str(Path(__file__).parent)],
                         env=_env(example_site), capture_output=True, text=True, check=True)
    name, top5, top1 = out.stdout.split()
    assert name == "top5_accuracy_drop"
    assert float(top1) <= float(top5) <= 1.0  # the right token in the top 5 if it is first


def test_installed_metric_and_perturbation_work_in_a_run(example_site, tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [*ESA, "run", "--model", str(tiny_llama_dir), "--metric", "abs_grad", "--topk", "3",
         "--max-samples", "2", "--seq-len", "16", "--eval-samples", "2", "--out-dir",
         str(out_dir), "--perturb", "scale_by", "--perturb-arg", "factor=0.5",
         "--evaluator", "perplexity,top5", "--eval-arg", "k=10"],
        env=_env(example_site), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out_dir / "experiment_manifest.json").read_text())
    assert {"kind": "metric", "name": "abs_grad", "distribution": "esa-plugin-example",
            "version": "0.0.1"} in manifest["plugins"]
    assert {"kind": "perturbation", "name": "scale_by", "distribution": "esa-plugin-example",
            "version": "0.0.1"} in manifest["plugins"]
    assert manifest["perturbation"] == {"name": "scale_by", "options": {"factor": 0.5}}
    results = json.loads((out_dir / "perturbation_results.json").read_text())
    assert results["perturbation"] == {"name": "scale_by", "factor": 0.5}
    assert results["super_weights"]["ppl"] != results["baseline"]["ppl"]
    # --eval-arg reached the third party's evaluator: its measure is named by its option
    assert [m["name"] for m in results["measures"]] == ["ppl", "accuracy", "top10_accuracy"]
    assert results["baseline"]["accuracy"] <= results["baseline"]["top10_accuracy"] <= 1.0

    # the metric's findings table, stored, rendered and printed by a core that never names it
    table = json.loads((out_dir / "sensitivity_stats.json").read_text())["findings"][
        "steepest_weights"]
    assert [c["name"] for c in table["columns"]] == ["param", "row", "col", "seeds_agreeing"]
    with open(out_dir / "top_weights.csv", newline="") as f:  # one seed: each matrix's top 1
        top1 = {}
        for w in csv.DictReader(f):
            top1.setdefault(w["param"], (int(w["row"]), int(w["col"])))
    assert {d["param"]: (d["row"], d["col"]) for d in table["rows"]} == top1
    assert all(d["seeds_agreeing"] for d in table["rows"])
    assert (f"Steepest weight of each matrix (seeds 1): {len(top1)} of {len(top1)} row(s) with "
            "seeds_agreeing") in result.stdout
    report = (out_dir / "report.html").read_text()
    assert "<h2>Steepest weight of each matrix</h2>" in report
    assert "argmax of summed |gradient| per matrix and seed" in report
    assert "<code>seeds_agreeing</code>: every seed&#x27;s steepest weight is this one" in report


def test_without_the_plugin_the_metric_is_unknown(tiny_llama_dir, tmp_path):
    result = subprocess.run(
        [*ESA, "run", "--model", str(tiny_llama_dir), "--metric", "abs_grad",
         "--out-dir", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "unknown metric 'abs_grad'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_broken_plugin_is_reported_not_fatal(tmp_path):
    """A plugin whose import fails shows up as a row; the CLI keeps working."""
    dist = tmp_path / "esa_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: esa-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[esa]\nbroken = esa_broken_module\n")
    (tmp_path / "esa_broken_module.py").write_text("raise ImportError('missing dependency xyz')\n")
    result = subprocess.run([*ESA, "list-plugins", "--json"], env=_env(tmp_path),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    broken = [r for r in rows if r["kind"] == "broken plugin"]
    assert broken and broken[0]["distribution"] == "esa-broken"
    assert "missing dependency xyz" in broken[0]["description"]
    assert any(r["name"] == "grad_x_weight" for r in rows)
    assert "failed to load" in result.stderr


REFUSED = '''
from esa_core import hookimpl
from esa_core.api import GRAD, HVP, Metric, Perturbation


class Both(Metric):
    """Needs both: on_grad would never run."""
    name = "both"
    needs = frozenset({GRAD, HVP})


class Fine(Perturbation):
    """A valid rule beside the refused ones."""
    name = "fine"


@hookimpl
def register_metrics(register):
    register(Both)
    register(Fine)  # a perturbation offered as a metric


@hookimpl
def register_perturbations(register):
    register(Fine)
'''


def test_a_refused_class_is_a_broken_row_and_its_siblings_still_register(tmp_path):
    dist = tmp_path / "esa_refused-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: esa-refused\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[esa]\nrefused = esa_refused_module\n")
    (tmp_path / "esa_refused_module.py").write_text(REFUSED)
    result = subprocess.run([*ESA, "list-plugins", "--json"], env=_env(tmp_path),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    broken = {r["name"]: r["description"] for r in rows if r["kind"] == "broken plugin"}
    assert "needs both grad and hvp" in broken["Both"]
    assert "not a subclass of esa_core.api.Metric" in broken["Fine"]
    assert ("perturbation", "fine") in {(r["kind"], r["name"]) for r in rows}
    assert "refused" in result.stderr


@pytest.mark.parametrize("kind, body, message", [
    ("metric", "class X(Metric):\n    needs = frozenset({'grad'})", "metric X has no `name`"),
    ("metric", "class X(Metric):\n    name = 'x'\n    needs = frozenset({'gradient'})",
     "needs unknown 'gradient'; known: activations, grad, hvp"),
    ("evaluator", "class X(Metric):\n    name = 'x'",
     "registered as kind .evaluator. but is not a subclass of esa_core.api.Evaluator"),
])
def test_registration_checks_the_class(kind, body, message):
    from esa_core import api
    from esa_core.errors import EsaError
    from esa_core.plugins import check_plugin_class

    scope = {"Metric": api.Metric}
    exec(body, scope)
    with pytest.raises(EsaError, match=message):
        check_plugin_class(kind, scope["X"])
