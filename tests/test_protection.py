"""--protect: the whole-matrix change and its exact restore, a planted model on which keeping one
weight is everything, the stage's files, and how it composes with the other stages."""

from collections import Counter

import pytest
import tiny
import torch
from test_evaluation import run_tiny, strict_json

from esa_core.api import LogicalMatrix, Perturbation
from esa_core.errors import PluginFailure
from esa_core.rewrite import Originals, keep_mask, rewritten
from esa_core.selection import Picks, Selection, select

R, R_EMBED, DECOY = 5, 3, 20.0  # the carrying weight is o_proj[R, 0] of layer 0


def planted_model():
    """A tiny Llama that is a unigram model of the text only through one weight.

    Every token embeds to e_3; layer 0's v_proj copies it to value channel 0 (attention over a
    constant is that constant), and o_proj[5, 0] = 1 writes it to residual channel 5, which the
    output head reads as the text's log unigram frequencies. Every other scored matrix is zero
    except o_proj's decoys: 20 beside the carrying weight and 30 in other rows, in columns that
    attention never fills (keeping the 20 would shrink the row's range and save the 1 too).
    Round-to-nearest at 3 bits on the row [1, 0, 0, 0, 20, ...] rounds the 1 to 0 (step 20/7)
    and the model forgets the text, unless the 1 is kept.
    """
    config = tiny.llama_config(num_key_value_heads=4)
    model = tiny.build(config)
    ids = tiny.tokenizer()(tiny.wikitext_sample(), add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(ids), minlength=tiny.VOCAB).double() + 0.5
    log_p = (counts / counts.sum()).log()
    hidden = config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                p.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, R_EMBED] = 1.0
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[0, R_EMBED] = hidden ** -0.5  # value channel 0 = 1 after the norm
        attention.o_proj.weight[R, 0] = 1.0
        attention.o_proj.weight[R, 4] = DECOY
        for row in (10, 11, 12, 13):
            attention.o_proj.weight[row, 6] = 30.0  # the largest: magnitude_k keeps these
        model.lm_head.weight.zero_()
        # the final norm sees e_3 + e_5: both become 4 (sqrt(32 / 2)); logits = log p
        model.lm_head.weight[:, R] = (log_p / 4.0).float()
    return model


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    planted_model().save_pretrained(folder)
    tiny.tokenizer().save_pretrained(folder)
    return folder


def planted_run(planted_dir, text, out, **settings):
    from esa_core import pipeline
    from esa_core.config import RunConfig

    config = RunConfig(**{
        "model": str(planted_dir), "dataset": str(text), "out_dir": str(out), "seq_len": 24,
        "max_samples": 4, "eval_samples": 6, "batch_size": 3, "metric": "grad_squared",
        "topk": 2, "seeds": [1], "protect": "rtn", "protect_args": {"bits": "3"},
        "controls": ["random_k", "magnitude_k"], **settings})
    return pipeline.run(config, argv=["esa", "run"])


def test_keeping_the_planted_weight_recovers_what_quantizing_took(planted_dir, small_text,
                                                                  tmp_path):
    result = planted_run(planted_dir, small_text, tmp_path / "out")
    p = strict_json(result.out_dir / "protection_results.json")
    vocab_ppl = float(tiny.VOCAB)
    assert p["baseline"]["ppl"] < 0.5 * vocab_ppl  # the unigram model knows the text
    # nothing kept: the carrying weight rounds to 0 and every logit to 0, a uniform guess
    assert p["nothing_kept"]["ppl"] == pytest.approx(vocab_ppl, rel=1e-4)
    top, random_k, magnitude_k = (p[name][0] for name in ("super_weights", "random_k",
                                                           "magnitude_k"))
    assert top["n_kept"] == 2 * p["matrices"]
    assert top["recovered"]["ppl_change"] > 0.99
    assert random_k["recovered"]["ppl_change"] < 0.01
    assert magnitude_k["recovered"]["ppl_change"] < 0.01
    rows = {r["criterion"]: r for r in p["success_criteria"]}
    for name in ("random_k", "magnitude_k"):
        row = rows[f"protection: top-k recovers more than {name}"]
        assert row["verdict"] == "PASS" and row["value"] > 1.0
        assert row == next(r for r in result.manifest["success_criteria"]
                           if r["criterion"] == row["criterion"])


def test_a_shuffled_ranking_protects_nothing(planted_dir, small_text, tmp_path, monkeypatch):
    from esa_core import pipeline

    def shuffled(scores, matrices, k, mode):
        gen = torch.Generator().manual_seed(0)
        mixed = {name: s.flatten()[torch.randperm(s.numel(), generator=gen)].view(s.shape)
                 for name, s in scores.items()}
        return select(mixed, matrices, k, mode)

    monkeypatch.setattr(pipeline, "select", shuffled)
    p = strict_json(planted_run(planted_dir, small_text, tmp_path / "out").out_dir
                    / "protection_results.json")
    assert p["super_weights"][0]["recovered"]["ppl_change"] < 0.01
    rows = {r["criterion"]: r for r in p["success_criteria"]}
    assert rows["protection: top-k recovers more than random_k"]["verdict"] == "FAIL"


# ----------------------------------------------------------------------------- change, restore


def local_keep(matrix: LogicalMatrix, shape, picks: Picks | None) -> torch.Tensor:
    """The kept mask of one matrix's view, built weight by weight from the picks."""
    rows = list(range(shape[-2])) if matrix.rows is None else matrix.rows.tolist()
    keep = torch.zeros(len(rows), shape[-1], dtype=torch.bool)
    if picks is not None:
        for r, c in zip(picks.rows.tolist(), picks.cols.tolist()):
            keep[rows.index(r), c] = True
    return keep


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_every_matrix_is_rewritten_but_its_kept_weights_and_restored_bit_exactly(
        registry, family, tmp_path):
    """Plain, fused-row (Phi-3 qkv) and 3-D expert (Mixtral) matrices: each is rtn's output on
    its own original values (by the hand loop), the kept weights exact; afterwards the model
    is bit-identical and the originals were kept one file per matrix."""
    from test_rtn import hand_rtn

    model = tiny.build(tiny.family_config(family))
    scored = registry.get("model adapter", family)().scored_params(model)
    params = {s.name: s.param for s in scored}
    matrices = [m for s in scored for m in s.matrices]
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
              for i, (n, p) in enumerate(params.items())}
    kept = select(scores, matrices, 5, "per_layer")
    picks = {id(p.matrix): p for p in kept.picks}
    before = {n: p.detach().clone() for n, p in params.items()}
    originals = Originals(tmp_path / "originals", matrices, params)
    originals.save()
    assert len(list((tmp_path / "originals").iterdir())) == len(matrices)
    rtn = registry.get("perturbation", "rtn")(bits=2, group_size=8)
    pristine: dict[int, int] = {}
    kinds = Counter()
    with rewritten(originals, rtn, kept, torch.Generator(), pristine) as facts:
        assert facts == {}
        for m in matrices:
            kind = "fused" if m.rows is not None else "expert" if m.expert is not None else "plain"
            if kinds[kind] >= 2:  # the hand loop is slow: two of each kind
                continue
            kinds[kind] += 1
            param = params[m.param]
            keep = local_keep(m, param.shape, picks.get(id(m)))
            assert torch.equal(keep, keep_mask(m, param.detach(), picks.get(id(m))))
            original = m.view(before[m.param])
            assert torch.equal(m.view(param.detach()), hand_rtn(original, keep, 2, 8))
            assert int(keep.sum()) == 5
    assert kinds["plain"] == 2 and (family == "llama" or kinds["fused"] + kinds["expert"] > 0)
    for n, p in params.items():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32))
    assert set(pristine) == {id(p) for p in params.values()}


def test_a_rule_that_changes_a_kept_weight_is_refused_and_the_model_restored(registry, tmp_path):
    model = tiny.build(tiny.llama_config())
    scored = registry.get("model adapter", "llama")().scored_params(model)
    params = {s.name: s.param for s in scored}
    matrices = [m for s in scored for m in s.matrices]
    before = {n: p.detach().clone() for n, p in params.items()}

    class Careless(Perturbation):
        name = "careless"

        def perturb_matrix(self, matrix, keep, generator):
            return torch.zeros_like(matrix), {}

    kept = select({n: p.detach().abs() for n, p in params.items()}, matrices, 1, "global")
    originals = Originals(tmp_path / "o", matrices, params)
    originals.save()
    with pytest.raises(PluginFailure, match="changed kept weights"):
        with rewritten(originals, Careless(), kept, torch.Generator(), {}):
            pass
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n])
    # with nothing kept the same rule is allowed, and every weight is undone afterwards
    with rewritten(originals, Careless(), Selection([]), torch.Generator(), {}):
        assert all(not p.detach().any() for p in params.values())
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n])


def test_a_selected_weight_rule_changes_every_weight_not_kept(registry):
    """The default perturb_matrix: sign_flip over a whole matrix, the kept weights exact."""
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(4, 6, dtype=torch.bool)
    keep[0, 1] = keep[3, 5] = True
    new, _ = registry.get("perturbation", "sign_flip")().perturb_matrix(w, keep,
                                                                         torch.Generator())
    assert torch.equal(new[keep], w[keep]) and torch.equal(new[~keep], -w[~keep])


def test_prefixes_are_the_first_k_of_the_ranking(registry):
    model = tiny.build(tiny.llama_config())
    scored = registry.get("model adapter", "llama")().scored_params(model)
    params = {s.name: s.param for s in scored}
    matrices = [m for s in scored for m in s.matrices]
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
              for i, (n, p) in enumerate(params.items())}
    for mode in ("per_layer", "global"):
        top = select(scores, matrices, 9, mode)
        for k in (1, 4, 9):
            keys = {(p.matrix.param, int(i)) for p in top.prefix(k, mode).picks
                    for i in p.flat(params[p.matrix.param].shape)}
            want = {(p.matrix.param, int(i)) for p in select(scores, matrices, k, mode).picks
                    for i in p.flat(params[p.matrix.param].shape)}
            assert keys == want


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("settings,message", [
    ({"perturb": "rtn"}, "rtn changes whole matrices"),
    ({"protect": "rtn", "protect_k": [7]}, "--protect-k 7 is larger than --topk 6"),
    ({"protect_args": {"bits": "3"}}, "need --protect RULE"),
    ({"protect": "rtn", "protect_args": {"bits": "9"}}, "must lie in"),
    ({"protect": "rtn", "protect_args": {"bit": "3"}}, "has no option 'bit'"),
    ({"protect": "nope"}, "unknown perturbation 'nope'"),
    ({"protect": "rtn", "protect_k": "5,0"}, "distinct positive integers"),
])
def test_protection_mistakes_are_refused_before_the_model_loads(registry, settings, message):
    from esa_core.config import RunConfig
    from esa_core.errors import EsaError

    with pytest.raises(EsaError, match=message):
        RunConfig(topk=6, **settings).validate(registry)


def test_protect_k_defaults_to_topk_and_controls_may_come_with_protect_alone(registry):
    from esa_core.config import RunConfig

    config = RunConfig(topk=6, protect="rtn", controls=["random_k"]).validate(registry)
    assert config.protect_k == [6]
    assert RunConfig(topk=6, protect="rtn", protect_k="4,2").validate(registry).protect_k == [2, 4]


# ----------------------------------------------------------------------------- in a run


def test_protect_composes_with_perturb_ablate_and_seeds(tiny_llama_dir, small_text, tmp_path):
    """One run with every evaluation stage: each writes what it writes alone (the perturbation
    results equal a run without --protect), the stages share one baseline, random_k is drawn
    anew per seed, and every file and figure of --protect is there."""
    from safetensors import safe_open

    from esa_core.layout import read_top_weights

    common = dict(perturb="zero", controls=["random_k", "bottom_k"])  # seeds 1 and 2
    alone = run_tiny(tiny_llama_dir, small_text, tmp_path / "alone", **common)
    both = run_tiny(tiny_llama_dir, small_text, tmp_path / "both", **common, ablate_top=2,
                    protect="rtn", protect_args={"bits": "2", "group_size": "16"},
                    protect_k=[2, 6], save_plots=True)
    out = both.out_dir
    assert strict_json(out / "perturbation_results.json") == strict_json(
        alone.out_dir / "perturbation_results.json")
    p = strict_json(out / "protection_results.json")
    assert p["baseline"] == strict_json(out / "perturbation_results.json")["baseline"]
    assert p["rule"] == {"name": "rtn", "bits": 2, "group_size": 16} and p["sizes"] == [2, 6]
    assert [c["k"] for c in p["super_weights"]] == [2, 6]
    for name in ("super_weights", "random_k", "bottom_k"):
        for c, k in zip(p[name], (2, 6)):
            assert c["n_kept"] == k * p["matrices"]
            assert [t["seed"] for t in c["per_seed"]] == [1, 2]
            for t in c["per_seed"]:
                assert t["ppl_change"] == pytest.approx(t["ppl"] / p["baseline"]["ppl"] - 1)
            share = c["recovered"]["ppl_change"]
            nothing = p["nothing_kept"]["ppl_change"]
            if nothing > 0:
                assert share == pytest.approx(1 - c["ppl_change"] / nothing)
            else:
                assert share is None
    random = p["random_k"][1]["per_seed"]
    assert all(t["overlap_with_super"] == 0 for t in random)
    assert random[0]["ppl"] != random[1]["ppl"]  # a new random set per seed
    bottom = p["bottom_k"][1]["per_seed"]
    assert bottom[0]["ppl"] == bottom[1]["ppl"]  # the same set and rule: the same model
    assert (out / "ablation.csv").is_file() and "protection_s" in both.manifest["timings"]
    assert both.manifest["protection"]["file"] == "protection_results.json"
    rows = [r for r in both.manifest["success_criteria"] if r["criterion"].startswith("protect")]
    assert [r["criterion"].rsplit(" ", 1)[1] for r in rows] == ["random_k", "magnitude_k",
                                                                "bottom_k"]
    assert rows[1]["verdict"] == "SKIP" and "--controls magnitude_k" in rows[1]["note"]
    with safe_open(str(out / "protected_weights.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == {"mode": "per_layer", "k": "6", "weights": str(6 * p["matrices"])}
    top = {(r["param"], r["row"], r["col"]): r["weight"] for r in read_top_weights(out)}
    got = {}
    for key, indices in exported.items():
        if key.endswith(".indices"):
            param = key.removesuffix(".indices")
            cols = tiny.llama_config().hidden_size if "down_proj" not in param else 64
            values = exported[f"{param}.values"]
            got.update({(param, int(i) // cols, int(i) % cols): float(v)
                        for i, v in zip(indices, values)})
    assert got == pytest.approx(top)
    page = (out / "report.html").read_text()
    assert "Protection: rtn (bits=2, group_size=16)" in page
    assert (out / "plots" / "protection.png").stat().st_size > 10_000
    assert not (out / "checkpoints").exists()


def test_protect_resumes_without_redoing_a_finished_condition(tiny_llama_dir, small_text,
                                                              tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from esa_core import protection

    settings = dict(protect="rtn", protect_args={"bits": "3"}, protect_k=[2, 6],
                    controls=["random_k"], checkpoint="always")
    reference = run_tiny(tiny_llama_dir, small_text, tmp_path / "reference", **settings)
    real, calls = protection.rewritten, []

    def stop_after_three(*args):
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(protection, "rewritten", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tiny_llama_dir, small_text, tmp_path / "run", **settings)
    assert not (tmp_path / "run" / "checkpoints" / protection.ORIGINALS).exists()
    calls.clear()
    monkeypatch.setattr(protection, "rewritten", lambda *a: calls.append(a) or real(*a))
    resumed = run_tiny(tiny_llama_dir, small_text, tmp_path / "run", resume=True, **settings)
    # nothing kept, then top-k and random_k at two sizes, over two seeds: 10 conditions
    assert len(calls) == 10 - 3
    assert strict_json(resumed.out_dir / "protection_results.json") == strict_json(
        reference.out_dir / "protection_results.json")
    got, want = (load_file(d / "protected_weights.safetensors")
                 for d in (resumed.out_dir, reference.out_dir))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_the_cli_takes_the_protect_options_and_refuses_a_mistake_in_one_line(tiny_llama_dir,
                                                                              tmp_path):
    from typer.testing import CliRunner

    from esa_core.cli import app

    base = ["run", "--model", str(tiny_llama_dir), "--topk", "4", "--out-dir", str(tmp_path)]
    refused = CliRunner().invoke(app, [*base, "--protect", "rtn", "--protect-arg", "bits=12"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "Error: rtn option 'bits' must lie in [2, 8]; got 12."]
    refused = CliRunner().invoke(app, [*base, "--protect", "rtn", "--protect-k", "2,8"])
    assert refused.exit_code == 2 and "--protect-k 8 is larger than --topk 4" in refused.output
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _trial(nll_per_block, change):
    """A condition's one trial: 4 blocks of 10 tokens, the given summed NLL per block."""
    import math
    return {"ppl": math.exp(sum(nll_per_block) / 40), "ppl_change": change,
            "per_item": {"ppl": {"sum": list(nll_per_block), "count": [10] * 4}}}


def test_protection_row_fails_when_the_paired_interval_holds_zero():
    """Means favour the top-k (control's ppl_change larger), but block by block the control is
    better on half the blocks: the paired interval of its change against the top-k-kept model
    straddles 0, so the row FAILs although the difference of means is positive; with every
    block worse under the control it PASSes."""
    import math

    from esa_core.api import Measure
    from esa_core.protection import criteria_rows
    ppl = Measure("ppl", "ppl_change", higher_is_better=False, from_items="exp_mean")
    base = [10.0] * 4
    top = [20.0, 20.0, 20.0, 20.0]

    def results(control):
        def cond(nll):
            t = _trial(nll, math.exp(sum(nll) / 40) / math.exp(sum(base) / 40) - 1)
            return {"k": 1, "n_kept": 1, "ppl_change": t["ppl_change"], "per_seed": [t],
                    "recovered": {"ppl_change": None}}
        return {"rule": {"name": "rtn"}, "mode": "per_layer", "seeds": [0],
                "baseline": _trial(base, 0.0), "nothing_kept": {"ppl_change": 9.0},
                "super_weights": [cond(top)], "random_k": [cond(control)]}

    mixed = results([12.0, 12.0, 40.0, 40.0])  # mean NLL 26 > 20, yet two blocks are better
    row = criteria_rows(mixed, [ppl])[0]
    assert row["value"] > 0 and row["verdict"] == "FAIL" and "paired interval" in row["note"]
    worse = results([24.0, 24.0, 24.0, 24.0])
    row = criteria_rows(worse, [ppl])[0]
    assert row["value"] == pytest.approx(math.exp(2.4) / math.exp(1) - math.exp(2) / math.exp(1))
    assert row["verdict"] == "PASS"
