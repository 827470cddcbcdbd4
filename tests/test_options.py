"""Every `esa run` option is declared once (config.RunConfig); what reads the declarations
(the command line, the README table, the --resume comparison) follows them, and every mistake
a declaration lets the core see is refused in seconds, before the model loads."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import tiny
from typer.testing import CliRunner

from esa_core import loading, pipeline
from esa_core.api import Evaluator, Measure
from esa_core.cli import app
from esa_core.config import OPTIONS, RunConfig
from esa_core.errors import EsaError
from esa_core.plugins import PluginInfo, Registry
from esa_core.resume import resumable_manifest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import option_table  # noqa: E402

FAST = ["--dataset", "small.txt", "--seq-len", "16", "--device", "cpu", "--max-samples", "2",
        "--eval-samples", "2", "--topk", "3"]


def test_the_readme_table_is_the_declarations():
    """`python scripts/option_table.py --write` refreshes it; this fails when they drift."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = option_table.section(readme)
    assert table == option_table.option_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(OPTIONS)
    assert "`--perturb-scale X`" in table and "`--eval-arg KEY=VALUE`" in table
    assert "| `--max-samples N` | 16 on a CPU, 200 on a GPU |" in table


def test_the_readme_check_notices_a_drift():
    """The check above is not vacuous: a table with one help text edited differs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    drifted = readme.replace("Number of critical weights", "Number of weights", 1)
    assert option_table.section(drifted) != option_table.option_table()
    assert option_table.section(option_table.refreshed(drifted)) == option_table.option_table()


def test_every_declared_option_is_a_flag_of_esa_run():
    from typer.main import get_command

    command = get_command(app).commands["run"]
    flags = {name for p in command.params for name in p.opts}
    for opt in OPTIONS:
        assert opt.spelling in flags, opt.name
    assert {p.name for p in command.params} == {o.name for o in OPTIONS}
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).output
    assert "Default: 16 on a CPU, 200 on a GPU." in help_text
    assert "esa-toolkit[tasks]" in help_text  # not eaten as markup


def test_the_guide_spellings_set_plugin_options(registry):
    config = RunConfig(perturb="sign_flip,bit_flip", perturb_scale=0.5, perturb_prob=0.2)
    built = config.build(registry)
    assert [p.settings for p in built.perturbations] == [{"scale": 0.5}, {"prob": 0.2}]
    # --perturb-arg overrides the guide's spelling, as it did
    config = RunConfig(perturb="sign_flip", perturb_scale=0.5, perturb_args=["scale=2"])
    assert config.build(registry).perturbations[0].settings == {"scale": 2.0}


def test_a_device_default_is_filled_per_device():
    cpu, gpu = RunConfig().resolved("cpu"), RunConfig().resolved("cuda")
    fields = ("seq_len", "max_samples", "eval_samples", "batch_size", "ablate_eval_samples")
    assert [getattr(cpu, f) for f in fields] == [128, 16, 16, 1, 8]
    assert [getattr(gpu, f) for f in fields] == [512, 200, 64, 4, 64]
    assert RunConfig(seq_len=64).resolved("cuda").seq_len == 64
    assert RunConfig(eval_samples=4).resolved("cpu").ablate_eval_samples == 4  # a subset


def test_resume_accepts_a_setting_that_changes_no_result(tmp_path):
    """`--resume --save-plots` (or --quiet, --checkpoint) continues; --topk does not."""
    settings = dict(model="m", dataset="small.txt", seq_len=16, device="cpu", topk=7)
    before = RunConfig(**settings).resolved("cpu").to_dict()
    (tmp_path / "experiment_manifest.json").write_text(json.dumps(
        {"status": "interrupted", "config": before}))
    for changed in ({"save_plots": True}, {"quiet": True}, {"checkpoint": "always"},
                    {"verbose": True}):
        now = RunConfig(**settings, **changed).resolved("cpu").to_dict()
        assert resumable_manifest(tmp_path, now)["status"] == "interrupted"
    with pytest.raises(EsaError, match=r"topk 7 -> 8"):
        resumable_manifest(tmp_path, RunConfig(**{**settings, "topk": 8}).resolved("cpu")
                           .to_dict())
    # a manifest from before --eval-arg existed lacks it: its default is what that run used
    del before["eval_args"]
    (tmp_path / "experiment_manifest.json").write_text(json.dumps(
        {"status": "interrupted", "config": before}))
    assert resumable_manifest(tmp_path, RunConfig(**settings).resolved("cpu").to_dict())


# --------------------------------------------------------------------------- refused up front


class Duplicate(Evaluator):
    """Declares perplexity's own measure name (a third party's collision)."""

    name = "test_duplicate"

    def measures(self):
        return (Measure("ppl", "ppl_change", higher_is_better=False),)


Refusal = namedtuple("Refusal", "result seconds loads")


@pytest.fixture
def refused(tiny_llama_dir, tmp_path, monkeypatch):
    """Run `esa run` with extra flags; the loader records a call instead of loading."""
    installed = pipeline.default_registry()
    extra = PluginInfo("evaluator", Duplicate.name, "", "tests", "0", Duplicate)
    monkeypatch.setattr(pipeline, "default_registry",
                        lambda: Registry([*installed.entries, extra]))
    loads = []

    def loader(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_pretrained", loader)
    (tmp_path / "small.txt").write_text(tiny.wikitext_sample(3000))
    monkeypatch.chdir(tmp_path)

    def run(*flags: str) -> Refusal:
        start = time.perf_counter()
        result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), *FAST,
                                          "--out-dir", "out", *flags])
        return Refusal(result, time.perf_counter() - start, loads)

    return run


def assert_refused(refusal: Refusal, *words: str) -> None:
    result = refusal.result
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and all(w in line for w in words), line
    assert refusal.loads == [], "the model was loaded before the refusal"
    assert refusal.seconds < 5, refusal.seconds
    assert not Path("out").exists()


needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm_eval extra not installed")


@needs_lm_eval
def test_lm_eval_without_a_task(refused):
    assert_refused(refused("--perturb", "zero", "--evaluator", "lm_eval"),
                   "the lm_eval evaluator needs tasks: --eval-task")


@pytest.fixture(scope="module")
def task_index(registry):
    """lm_eval's index of task names, built once per installation (about half a minute on 2
    busy cores when cold) and cached: what a refused run then consults."""
    registry.get("evaluator", "lm_eval")(tasks="arc_easy").check()


@pytest.mark.slow  # only while the task index is cold
@needs_lm_eval
def test_an_unknown_lm_eval_task(task_index, refused):
    assert_refused(refused("--perturb", "zero", "--evaluator", "perplexity,lm_eval",
                           "--eval-task", "arc_easyy"),
                   "lm_eval knows no task 'arc_easyy'", "did you mean 'arc_easy'?")


def test_an_eval_arg_no_evaluator_declares(refused):
    assert_refused(refused("--perturb", "zero", "--eval-arg", "shots=5"),
                   "perplexity has no option 'shots'. Valid options: none")


def test_eval_task_for_an_evaluator_without_tasks(refused):
    assert_refused(refused("--perturb", "zero", "--eval-task", "arc_easy"),
                   "perplexity has no option 'tasks' (from --eval-task)")


def test_two_evaluators_declaring_the_same_measure(refused):
    assert_refused(refused("--perturb", "zero", "--evaluator", "perplexity,test_duplicate"),
                   "evaluators 'perplexity' and 'test_duplicate' both declare the measure "
                   "'ppl'")


def test_a_perturbation_option_without_a_perturbation(refused):
    assert_refused(refused("--perturb-scale", "2"),
                   "--perturb-scale sets a perturbation option, but the run uses no "
                   "perturbation: choose one with --perturb")


def full_disk(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage(".")
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage._replace(free=free))


def test_a_disk_too_small_for_the_planned_score_checkpoint(refused, monkeypatch):
    """--checkpoint always will save the score sum: refused before loading; the tiny model's
    fp32 sum (about 0.1 MB) does not fit beside the results' 32 MB and the 64 MB margin."""
    full_disk(monkeypatch, 40 << 20)
    assert_refused(refused("--checkpoint", "always"),
                   "the score sum that --checkpoint always saves for --resume needs",
                   "--checkpoint auto or never")


def test_a_disk_too_small_for_the_results(refused, monkeypatch):
    full_disk(monkeypatch, 1 << 20)
    assert_refused(refused("--checkpoint", "never"), "the result files need about")


def test_checkpoint_auto_warns_and_goes_on(refused, monkeypatch, caplog):
    full_disk(monkeypatch, 40 << 20)
    refusal = refused("--checkpoint", "auto")
    assert refusal.loads, refusal.result.output  # it went on to load the model
    assert "it will not save the score sum" in caplog.text


def test_the_score_sum_size_is_the_scored_weights_times_the_accumulator(tiny_llama_dir,
                                                                       registry):
    """The planned checkpoint is sized from the model's shapes alone (no weights read): the
    same count as the loaded model's scored weights, written out here from the config."""
    config = loading.load_config(loading.resolve(str(tiny_llama_dir)))
    empty = loading.empty_model(config)
    assert all(p.is_meta for p in empty.parameters())
    scored = registry.adapter_for(config.model_type)().scored_params(empty)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_block = h * h * 2 + h * kv * 2 + h * i * 3  # q, o; k, v; gate, up, down
    assert sum(s.param.numel() for s in scored) == layers * per_block
