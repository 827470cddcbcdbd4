"""The analysis by value on constructed inputs: significance, bootstrap, hierarchy, robustness,
and the statistics that scipy now computes (kurtosis check, Hill by hand)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from esa_core import analysis
from esa_core.api import DIFFERENCE, RELATIVE, Measure
from esa_core.stats import hill_tail_index, sensitivity_stats

PPL = Measure("ppl", "ppl_change", higher_is_better=False, change=RELATIVE)
ACC = Measure("accuracy", "accuracy_drop", higher_is_better=True, change=DIFFERENCE)


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
    assert "no damage to accuracy_drop" in rows[3]["note"]
    assert a["measures"]["accuracy_drop"]["separation"]["super_vs_random"] != 6.0  # own ratios
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


def test_hierarchy_share_by_value():
    def row(param, score, layer=0, component="mlp.down"):
        return {"param": param, "expert": None, "layer": layer, "component": component,
                "score": repr(score)}

    # 18 matrices hold top-k weights; the busiest 2 (10%) hold 8 + 6 of a total 30 -> 14/30
    rows = [row("a", 5.0), row("a", 3.0), row("b", 6.0, 1, "attn.q"),
            *[row(f"m{i}", 1.0, 2) for i in range(16)]]
    h = analysis.hierarchy(rows, 40)
    assert h["busiest_matrices"] == 2 and h["top_share"] == pytest.approx(14 / 30)
    assert h["hierarchical"] is False
    assert analysis.hierarchy_row(h)["verdict"] == "FAIL"
    # 4 matrices: the busiest one (ceil 0.4) holds 8 of 16
    h = analysis.hierarchy(rows[:5], 40)
    assert h["busiest_matrices"] == 1 and h["top_share"] == pytest.approx(8 / 16)
    assert h["hierarchical"] is True
    assert h["component_shares"]["mlp.down"] == pytest.approx(10 / 16)
    assert h["layer_shares"]["2"] == pytest.approx(2 / 16)
    assert analysis.hierarchy_row(h)["verdict"] == "PASS"
    flat = analysis.hierarchy([row(f"m{i}", 1.0) for i in range(20)], 20)
    assert flat["top_share"] == pytest.approx(0.1)
    assert analysis.hierarchy_row(flat)["verdict"] == "FAIL"


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
