"""The lm_eval evaluator, offline, on a multiple-choice task this test writes itself.

Its accuracy is checked against a loglikelihood comparison done here directly with torch: each
choice scored by the summed log-probability of its tokens after the question, the highest wins.
"""

import importlib.util
import json
import textwrap

import pytest
import tiny
import torch

from esa_core.api import EvalData
from esa_core.config import RunConfig
from esa_core.errors import EsaError

pytest.importorskip("lm_eval")

ITEMS = [
    ("The capital of France is", ["Paris", "London", "Rome"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("On a clear day the sky is", ["green", "red", "blue"], 2),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin"], 0),
    ("The opposite of hot is", ["cold", "warm", "loud"], 0),
    ("A week has seven", ["days", "apples", "rivers"], 0),
    ("The first month of the year is", ["March", "January"], 1),
    ("Cats are often kept as", ["pets", "engines", "clouds"], 0),
]


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in ITEMS]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "esa_tiny_mc.yaml"
    path.write_text(textwrap.dedent(f"""\
        task: esa_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "items.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def hand_accuracy(model, tokenizer, items) -> float:
    correct = hand_correctness(model, tokenizer, items)
    return sum(correct) / len(correct)


@torch.no_grad()
def hand_correctness(model, tokenizer, items) -> list[float]:
    """Zero-shot multiple choice: is the choice with the highest summed log-prob after ' '
    the answer? One 1.0 or 0.0 per item."""
    right = []
    for question, choices, answer in items:
        context = tokenizer(question)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(question + " " + choice)["input_ids"]
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1)
            scores.append(sum(float(logprobs[i - 1, whole[i]])
                              for i in range(len(context), len(whole))))
        right.append(float(max(range(len(choices)), key=lambda i: (scores[i], -i)) == answer))
    return right


def evaluator(registry, **options):
    return registry.get("evaluator", "lm_eval")(**options)


@pytest.mark.slow  # the harness indexes its thousands of task files: about 10 s
def test_accuracy_equals_the_hand_computed_comparison_and_follows_the_model_in_place(
        registry, task_yaml):
    model, tokenizer = tiny.build(tiny.llama_config()), tiny.tokenizer()
    lm_eval = evaluator(registry, tasks=str(task_yaml), limit=6)
    assert [(m.name, m.change_name, m.higher_is_better) for m in lm_eval.measures()] == \
        [("esa_tiny_mc_acc", "esa_tiny_mc_acc_drop", True)]
    data = EvalData(blocks=torch.zeros(1, 2, dtype=torch.long), tokenizer=tokenizer)
    lm_eval.prepare(model, data)
    result = lm_eval.evaluate(model, data)
    before = hand_correctness(model, tokenizer, ITEMS[:6])
    assert result["esa_tiny_mc_acc"] == sum(before) / 6
    assert result["items"] == {"esa_tiny_mc": 6}
    assert result["per_item"]["esa_tiny_mc_acc"] == {"sum": before, "count": [1.0] * 6}
    # perturbed in place, no reload: a perturbation that changes answers (x100 on one
    # matrix: 2 of 6 right before, 4 after, by the hand comparison), and the harness sees it
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(100.0)
    after = hand_correctness(model, tokenizer, ITEMS[:6])
    assert after != before and sum(after) != sum(before)
    perturbed = lm_eval.evaluate(model, data)
    assert perturbed["esa_tiny_mc_acc"] == sum(after) / 6
    assert perturbed["per_item"]["esa_tiny_mc_acc"]["sum"] == after
    first = lm_eval.measures()[0]
    assert first.damage(perturbed["esa_tiny_mc_acc"], result["esa_tiny_mc_acc"]) == \
        pytest.approx((sum(before) - sum(after)) / 6)


@pytest.mark.slow
def test_embedded_model_accuracy_equals_the_hand_computed_comparison(registry, task_yaml):
    from esa_core import loading

    adapter = registry.get("model adapter", "llama")()
    model, tokenizer = adapter.load(loading.resolve(None), torch.float32, torch.device("cpu"))
    lm_eval = evaluator(registry, tasks=str(task_yaml))
    data = EvalData(blocks=torch.zeros(1, 2, dtype=torch.long), tokenizer=tokenizer,
                    batch_size=4)
    lm_eval.prepare(model, data)
    accuracy = lm_eval.evaluate(model, data)["esa_tiny_mc_acc"]
    assert accuracy == hand_accuracy(model, tokenizer, ITEMS)
    assert accuracy >= 0.5  # a real model knows most of these


def test_eval_task_and_limit_map_onto_the_options(registry, task_yaml):
    cls = registry.get("evaluator", "lm_eval")
    config = RunConfig(eval_tasks=[str(task_yaml), "arc_easy"], eval_limit=5)
    assert config.options_for("evaluator", cls) == {"tasks": f"{task_yaml},arc_easy", "limit": 5}
    assert config.options_for("evaluator", registry.get("evaluator", "perplexity")) == {}


@pytest.mark.parametrize("options, message", [
    ({}, "the lm_eval evaluator needs tasks: --eval-task"),
    ({"tasks": "missing.yaml"}, "lm_eval task file not found: missing.yaml"),
])
def test_bad_tasks_are_one_line(registry, options, message):
    with pytest.raises(EsaError, match=message):
        evaluator(registry, **options)


def test_without_the_extra_it_names_the_install(registry, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(EsaError, match=r"needs lm-evaluation-harness: pip install "
                                       r"'esa-toolkit\[tasks\]'"):
        evaluator(registry, tasks="arc_easy")


@pytest.mark.slow
def test_offline_without_cached_data_or_an_unknown_task_is_one_line(registry):
    model, data = tiny.build(tiny.llama_config()), EvalData(torch.zeros(1, 2), tiny.tokenizer())
    with pytest.raises(EsaError, match="could not load the data of task 'arc_easy'.*offline"):
        evaluator(registry, tasks="arc_easy").prepare(model, data)
    with pytest.raises(EsaError, match="lm_eval knows no task 'no_such_task'"):
        evaluator(registry, tasks="no_such_task").prepare(model, data)


@pytest.mark.slow
def test_a_run_carries_every_declared_measure_to_every_output(tiny_llama_dir, task_yaml,
                                                              tmp_path):
    """`--evaluator perplexity,lm_eval`: the task's accuracy flows through the study to the JSON
    files, the criteria, the figure and the report, beside perplexity's measures."""
    from typer.testing import CliRunner

    from esa_core.cli import app
    from esa_core.layout import RunFiles

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_llama_dir), "--topk", "3", "--max-samples", "2",
        "--eval-samples", "2", "--seq-len", "32", "--seeds", "1,2", "--perturb", "zero",
        "--controls", "random_k", "--evaluator", "perplexity,lm_eval",
        "--eval-task", str(task_yaml), "--save-plots", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    run = RunFiles.read(out)
    declared = [m["name"] for m in run.perturbation["measures"]]
    assert declared == ["ppl", "accuracy", "esa_tiny_mc_acc"]
    baseline = run.perturbation["baseline"]["esa_tiny_mc_acc"]
    assert baseline * len(ITEMS) == pytest.approx(round(baseline * len(ITEMS)))  # a count of items
    for condition in ("super_weights", "random_k"):
        section = run.perturbation[condition]
        for trial in section["per_seed"]:
            assert trial["esa_tiny_mc_acc_drop"] == pytest.approx(
                baseline - trial["esa_tiny_mc_acc"])
    task = run.control["measures"]["esa_tiny_mc_acc_drop"]
    assert task["changes"] == {name: pytest.approx(run.perturbation[name]["esa_tiny_mc_acc_drop"])
                               for name in ("super_weights", "random_k")}
    assert task["spread"]["random_k"]["draws"] == 2
    # the primary measure (the first evaluator's first) gets the guide's rows; every other
    # declared measure its own >= 3x row, from its own ratio
    assert run.control["primary_measure"] == "ppl_change"
    rows = {r["criterion"]: r for r in run.control["success_criteria"]}
    assert rows == {r["criterion"]: r for r in run.manifest["success_criteria"]
                    if r["criterion"] in rows}
    # the task's own row, recomputed here: a ratio where the random sets moved the task beyond
    # the items' noise, else the absolute test of the intervals over the task's items
    magnitude = "magnitude: esa_tiny_mc_acc_drop(super) / esa_tiny_mc_acc_drop(random)"
    drop, ci = task["changes"], task["intervals"]
    assert len(run.perturbation["baseline"]["per_item"]["esa_tiny_mc_acc"]["sum"]) == len(ITEMS)
    if drop["random_k"] > 0 and ci["random_k"][0] > 0:
        row = rows[magnitude]
        assert row["value"] == pytest.approx(drop["super_weights"] / drop["random_k"])
    else:
        row = rows[f"{magnitude}, absolute test"]
        assert row["value"] is (ci["super_weights"][0] > ci["random_k"][1])
        assert task["separation"]["super_vs_random"] is None
    assert (out / "plots" / "perturbation_effects.png").stat().st_size > 10_000
    assert "esa_tiny_mc_acc" in (out / "report.html").read_text()
