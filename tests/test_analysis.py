"""The analysis by value on constructed inputs: significance, bootstrap, separation without
infinities, intervals over evaluation items, robustness, and the statistics that scipy now
computes (kurtosis check, Hill by hand)."""

import math

import numpy as np
import pytest
import torch
from esa_evaluators.perplexity import Perplexity
from scipy import stats as scipy_stats

from esa_core import analysis
from esa_core.api import DIFFERENCE, RELATIVE, Measure
from esa_core.stats import hill_tail_index, sensitivity_stats

PPL, ACC = Perplexity().measures()  # the default evaluator's declarations


def results(super_values, random_values, bottom_values=None, repeats=()):
    def condition(values):
        per_seed = [{"seed": i, "ppl": 10 * (1 + v), "accuracy": 0.5, "ppl_change": v,
                     "accuracy_drop": 0.0, "nonfinite_outputs": False}
                    for i, v in enumerate(values)]
        return analysis.summarise(per_seed, [PPL, ACC])

    out = {"super_weights": condition(super_values), "random_k": condition(random_values)}
    if bottom_values is not None:
        out["bottom_k"] = condition(bottom_values)
    out["random_k_repeats"] = [{"ppl_change": v, "accuracy_drop": 0.0} for v in repeats]
    return out


def test_summary_keeps_the_guides_keys_from_the_declarations():
    s = results([1.0, 3.0], [0.1, 0.2])["super_weights"]
    assert list(s)[:4] == ["ppl_change", "accuracy_drop", "ppl", "accuracy"]
    assert s["ppl_change"] == 2.0 and s["ppl"] == 30.0
    assert s["std"]["ppl_change"] == pytest.approx(math.sqrt(2))


def test_permutation_p_value_is_the_rank_of_the_super_effect_among_the_draws():
    # 2 seeds + 17 repeats = 19 draws; none reaches the super effect: p = 1/20
    r = results([5.0, 5.0], [0.1, 0.2], repeats=[0.01 * i for i in range(17)])
    sig = analysis.significance(r, "ppl_change")
    assert sig["random_draws"] == 19 and sig["p_value"] == pytest.approx(1 / 20)
    assert sig["p_value_floor"] == pytest.approx(1 / 20)
    # two of four draws at least as damaging: p = (1 + 2) / 5
    sig = analysis.significance(results([1.0], [2.0, 0.5], repeats=[1.0, 0.1]), "ppl_change")
    assert sig["p_value"] == pytest.approx(3 / 5)
    # a broken model (+inf) outranks every finite draw
    sig = analysis.significance(results([math.nan], [0.5, 0.7]), "ppl_change")
    assert sig["p_value"] == pytest.approx(1 / 3)


def test_significance_row_pass_fail_and_skip_by_number_of_draws():
    few = analysis.significance(results([5.0], [0.1, 0.2], repeats=[0.1] * 3), "ppl_change")
    row = analysis.significance_row("significance", few)
    assert row["verdict"] == "SKIP" and "--control-repeats 14 or more" in row["note"]
    many = analysis.significance(results([5.0], [0.1], repeats=[0.1 * i for i in range(18)]),
                                 "ppl_change")
    assert analysis.significance_row("significance", many)["verdict"] == "PASS"
    beaten = analysis.significance(results([0.5], [0.1], repeats=[1.0] * 18), "ppl_change")
    row = analysis.significance_row("significance", beaten)
    assert row["verdict"] == "FAIL" and row["value"] == pytest.approx(19 / 20)


def test_bootstrap_interval_brackets_the_statistic_and_is_undefined_when_it_must_be():
    super_values, draws = [2.0, 2.2, 1.9], [0.1, 0.3, 0.2, 0.25]
    ci = analysis.bootstrap_ci([super_values, draws],
                               lambda s, r, axis: np.mean(s, axis=axis) / np.mean(r, axis=axis))
    point = np.mean(super_values) / np.mean(draws)
    assert ci[0] < point < ci[1]
    assert ci[0] >= min(super_values) / max(draws) and ci[1] <= max(super_values) / min(draws)
    assert analysis.bootstrap_ci([[1.0, 1.0]], np.mean) == [1.0, 1.0]
    assert analysis.bootstrap_ci([[1.0]], np.mean) is None
    assert analysis.bootstrap_ci([[1.0, math.inf]], np.mean) is None
    # one super value (a deterministic rule, one seed) is held fixed; the draws are resampled
    sig = analysis.significance(results([2.0], [0.1, 0.3], repeats=[0.2, 0.25]), "ppl_change")
    low, high = sig["ci_separation"]
    assert 2.0 / 0.3 <= low < 2.0 / np.mean(draws) < high <= 2.0 / 0.1


def test_phase3_rows_by_value():
    a = analysis.analyse(results([3.0], [0.5], [0.1]), [PPL, ACC])
    rows = analysis.phase3_criteria(a, [PPL, ACC])
    assert [r["verdict"] for r in rows] == ["PASS", "PASS", "SKIP", "SKIP"]
    assert rows[1]["value"] == pytest.approx(6.0)
    # accuracy moved for neither set (drop 0.0 everywhere): its own row says so
    assert rows[3]["criterion"] == "magnitude: accuracy_drop(super) / accuracy_drop(random)"
    assert "random_k did not move it (mean damage 0 <= 0)" in rows[3]["note"]
    assert "no per-item values for accuracy" in rows[3]["note"]
    accuracy = a["measures"]["accuracy_drop"]
    assert accuracy["separation"]["super_vs_random"] is None  # its own ratio: none exists
    assert accuracy["separation_reasons"]["super_vs_random"].startswith("random_k did not")
    rows = analysis.phase3_criteria(analysis.analyse(results([1.0], [0.5], [0.1]), [PPL, ACC]),
                                    [PPL, ACC])
    assert [r["verdict"] for r in rows[:2]] == ["PASS", "FAIL"]


def test_robustness_holds_only_when_every_type_separates():
    good = analysis.analyse(results([3.0], [0.5], [0.1]), [PPL])
    weak = analysis.analyse(results([1.0], [0.5], [0.1]), [PPL])
    assert analysis.robustness_row({"zero": good}, [PPL])["verdict"] == "SKIP"
    assert analysis.robustness_row({"zero": good, "sign_flip": good}, [PPL])["verdict"] == "PASS"
    row = analysis.robustness_row({"zero": good, "sign_flip": weak}, [PPL])
    assert row["verdict"] == "FAIL" and "sign_flip: fails" in row["note"]
    assert analysis.robustness_row({"zero": good, "sign_flip": None}, [PPL])["verdict"] == "SKIP"


def test_streamed_kurtosis_equals_scipys():
    torch.manual_seed(0)
    a, b = torch.randn(7, 5).exp(), torch.randn(3, 4).exp()
    from esa_core.api import LogicalMatrix

    matrices = [LogicalMatrix("a", 0, "mlp.up"), LogicalMatrix("b", 1, "mlp.up")]
    params = {"a": torch.nn.Parameter(a.clone()), "b": torch.nn.Parameter(b.clone())}
    stats = sensitivity_stats({"a": a, "b": b}, matrices, params, 3)
    every = torch.cat([a.flatten(), b.flatten()]).double().numpy()
    # the streamed moments take float32 powers of centred scores (no float64 copy of a matrix
    # at 7B weights), so they agree with scipy's float64 to float32's precision
    assert stats["global"]["excess_kurtosis"] == pytest.approx(
        scipy_stats.kurtosis(every, fisher=True, bias=True), rel=1e-6)


def test_hill_estimator_against_a_hand_computed_value():
    # x = 8, 4, 2, 1: k = 3, threshold 1; 1/alpha = (ln 8 + ln 4 + ln 2) / 3 = 2 ln 2
    alpha, k = hill_tail_index(torch.tensor([8.0, 4.0, 2.0, 1.0]))
    assert k == 3 and alpha == pytest.approx(1 / (2 * math.log(2)))


@pytest.mark.parametrize("higher_is_better, change, value, baseline, expected", [
    (False, RELATIVE, 30.0, 20.0, 30.0 / 20.0 - 1.0),  # perplexity up by half: +0.5
    (False, DIFFERENCE, 3.5, 3.0, 0.5),  # a loss up by 0.5
    (True, DIFFERENCE, 0.40, 0.62, 0.62 - 0.40),  # accuracy down: positive damage
    (True, RELATIVE, 0.31, 0.62, 1.0 - 0.31 / 0.62),  # halved: 0.5
    (True, DIFFERENCE, 0.70, 0.62, 0.62 - 0.70),  # improved: negative damage
])
def test_a_measure_orients_its_change_so_damage_is_positive(higher_is_better, change, value,
                                                            baseline, expected):
    measure = Measure("m", "m_change", higher_is_better, change)
    assert measure.damage(value, baseline) == pytest.approx(expected)


def test_every_declared_measure_gets_its_own_magnitude_row():
    """A second measure is judged by its own ratio: 0.3 / 0.05 = 6 passes, 0.3 / 0.2 fails."""
    def condition(ppl_change, acc_drop):
        return analysis.summarise([{"seed": 0, "ppl": 10.0, "accuracy": 0.5,
                                    "ppl_change": ppl_change, "accuracy_drop": acc_drop,
                                    "nonfinite_outputs": False}], [PPL, ACC])

    for random_drop, verdict in ((0.05, "PASS"), (0.2, "FAIL")):
        res = {"super_weights": condition(3.0, 0.3), "random_k": condition(0.5, random_drop)}
        row = analysis.phase3_criteria(analysis.analyse(res, [PPL, ACC]), [PPL, ACC])[-1]
        assert row["criterion"] == "magnitude: accuracy_drop(super) / accuracy_drop(random)"
        assert row["value"] == pytest.approx(0.3 / random_drop)
        assert row["verdict"] == verdict


BLOCK_TOKENS = 10
BASE_NLL = [20.0, 25.0, 30.0, 22.0, 27.0, 24.0]  # each held-out block's summed NLL


def per_block(nll: list[float], correct: list[float] | None = None) -> dict:
    """An evaluation as the perplexity evaluator reports it: values and per-block items."""
    counts = [BLOCK_TOKENS] * len(nll)
    correct = correct if correct is not None else [5.0] * len(nll)
    tokens = BLOCK_TOKENS * len(nll)
    return {"ppl": math.exp(sum(nll) / tokens), "accuracy": sum(correct) / tokens,
            "nonfinite_outputs": False,
            "per_item": {"ppl": {"sum": nll, "count": counts},
                         "accuracy": {"sum": correct, "count": counts}}}


def item_results(conditions: dict[str, list[list[float]]]) -> dict:
    """perturbation_results.json's shape from each condition's per-seed block NLLs."""
    baseline = per_block(BASE_NLL)
    out = {"baseline": baseline}
    for name, seeds in conditions.items():
        trials = []
        for seed, nll in enumerate(seeds):
            trial = {"seed": seed, **per_block(nll)}
            trial["ppl_change"] = trial["ppl"] / baseline["ppl"] - 1.0
            trial["accuracy_drop"] = 0.0
            trials.append(trial)
        out[name] = analysis.summarise(trials, [PPL, ACC])
    return out


def scaled(factor: float, noise: tuple[float, ...] = (0.0,) * 6) -> list[float]:
    return [v * factor + n for v, n in zip(BASE_NLL, noise)]


def floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from floats(v)


def test_controls_that_did_not_move_the_measure_give_no_inf_and_no_pass_by_ratio():
    """perplexity x1.0001 against random sets that lowered it: no ratio, no inf anywhere; the
    magnitude row falls back to the absolute test and says so."""
    res = item_results({"super_weights": [scaled(1.0001)], "random_k": [scaled(0.9999)] * 2,
                        "bottom_k": [scaled(0.99995)] * 2})
    a = analysis.analyse(res, [PPL, ACC])
    rows = analysis.phase3_criteria(a, [PPL, ACC])
    robust = analysis.robustness_row({"zero": a, "sign_flip": a}, [PPL, ACC])
    assert not any(math.isinf(v) for v in floats([a, rows, robust]))
    assert a["separation"]["super_vs_random"] is None
    assert "random_k did not move it" in a["measures"]["ppl_change"]["separation_reasons"][
        "super_vs_random"]
    magnitude = rows[1]
    assert magnitude["criterion"].endswith("absolute test") and magnitude["value"] is True
    assert "fell back to the absolute test" in magnitude["note"]
    # every block of the super set is 1e-4 worse, of the random sets 1e-4 better: the
    # intervals over the blocks are the changes of resampled blocks, apart
    low, high = a["intervals"]["super_weights"]
    assert math.exp(1e-4 * min(BASE_NLL) / BLOCK_TOKENS) - 1 <= low < high \
        <= math.exp(1e-4 * max(BASE_NLL) / BLOCK_TOKENS) - 1
    assert a["intervals"]["random_k"][1] < 0
    # a super set within the noise of the blocks does not pass the absolute test
    noisy = item_results({"super_weights": [scaled(1.0, (0.3, -0.3, 0.2, -0.2, 0.25, -0.1))],
                          "random_k": [scaled(0.9999)] * 2, "bottom_k": [scaled(0.99995)] * 2})
    noisy_a = analysis.analyse(noisy, [PPL, ACC])
    row = analysis.phase3_criteria(noisy_a, [PPL, ACC])[1]
    assert row["verdict"] == "FAIL" and row["value"] is False
    row = analysis.robustness_row({"zero": a, "sign_flip": noisy_a}, [PPL, ACC])
    assert row["verdict"] == "FAIL" and "sign_flip: fails" in row["note"]
    # without per-item values there is nothing to fall back to: a SKIP, never a PASS
    bare = analysis.analyse(results([0.0001], [-0.0002], [-0.0003]), [PPL, ACC])
    rows = analysis.phase3_criteria(bare, [PPL, ACC])
    assert rows[1]["verdict"] == "SKIP" and rows[1]["value"] is None
    assert "no intervals for the absolute test" in rows[1]["note"]
    assert not any(math.isinf(v) for v in floats([bare, rows]))
    assert analysis.robustness_row({"zero": bare, "sign_flip": bare},
                                   [PPL])["verdict"] == "SKIP"


def test_a_broken_model_is_no_ratio_either():
    a = analysis.analyse(results([math.nan], [0.5], [0.1]), [PPL])
    assert a["separation"]["super_vs_random"] is None
    assert analysis.phase3_criteria(a, [PPL])[1]["verdict"] != "PASS"


def test_paired_interval_resamples_the_same_items_for_baseline_and_perturbed():
    from esa_core import intervals

    correct = [7.0, 3.0, 9.0, 1.0, 5.0, 8.0]
    baseline = per_block(BASE_NLL, correct)
    # one fewer correct token in every block: a drop of exactly 0.1 whatever blocks are drawn;
    # resampled independently it would spread over roughly +-0.2
    worse = per_block(BASE_NLL, [c - 1 for c in correct])
    assert intervals.paired_interval(ACC, baseline, [worse]) == pytest.approx([0.1, 0.1])
    assert intervals.paired_interval(ACC, {"accuracy": 0.5}, [worse]) is None
    broken = per_block([math.inf, *BASE_NLL[1:]])
    assert intervals.paired_interval(PPL, baseline, [broken]) is None


def test_paired_interval_of_perplexity_against_a_bootstrap_written_here():
    from esa_core import intervals

    perturbed_nll = [21.0, 25.5, 33.0, 22.5, 29.0, 24.0]
    got = intervals.paired_interval(PPL, per_block(BASE_NLL), [per_block(perturbed_nll)])
    base, pert = np.array(BASE_NLL), np.array(perturbed_nll)
    rng = np.random.default_rng(1)
    changes = []
    for _ in range(20000):
        i = rng.integers(0, len(base), len(base))
        tokens = BLOCK_TOKENS * len(i)
        changes.append(math.exp(pert[i].sum() / tokens) / math.exp(base[i].sum() / tokens) - 1)
    want = np.percentile(changes, [2.5, 97.5])
    width = want[1] - want[0]
    assert got[0] == pytest.approx(want[0], abs=0.1 * width)
    assert got[1] == pytest.approx(want[1], abs=0.1 * width)


def test_a_stochastic_super_set_is_compared_with_the_draws_as_two_samples():
    """Super trials that differ by seed: p is the exact permutation p of the difference of
    means, enumerated here over all 56 ways to split the 8 values 3 + 5."""
    from itertools import combinations

    super_values, draws = [1.0, 1.3, 0.8], [0.2, 0.9, 1.1, 0.5, 0.7]
    sig = analysis.significance(results(super_values, draws[:2], repeats=draws[2:]),
                                "ppl_change")
    assert sig["test"].startswith("permutation")
    pooled = super_values + draws
    observed = np.mean(super_values) - np.mean(draws)
    splits = list(combinations(range(8), 3))
    at_least = sum(np.mean([pooled[i] for i in s])
                   - np.mean([pooled[i] for i in range(8) if i not in s]) >= observed - 1e-12
                   for s in splits)
    assert sig["p_value"] == pytest.approx(at_least / len(splits))
    assert sig["p_value_floor"] == pytest.approx(1 / 56)


def test_one_set_of_random_draws_feeds_the_ratio_and_its_interval():
    """Seeds 0.5, 1.0 and a repeat 1.5: the ratio divides by their mean 1.0, not by the seeds'
    0.75, and its interval over the draws holds it."""
    a = analysis.analyse(results([3.0], [0.5, 1.0], [0.1], repeats=[1.5]), [PPL])
    assert a["separation"]["super_vs_random"] == pytest.approx(3.0)
    assert a["spread"]["random_k"]["ppl_change_mean"] == pytest.approx(1.0)
    low, high = a["significance"]["ci_separation"]
    assert low <= 3.0 <= high
