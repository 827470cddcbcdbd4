"""The seeds' running sum: on the host, folded in order, and the mean made in the last seed's
own tensors, so N seeds leave one score set on the scoring device (as one seed does)."""

from __future__ import annotations

import pytest
import torch

from esa_core import pipeline
from esa_core.totals import RunningTotal, running_total_device


def seed_scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(7, 5, generator=g), "b": torch.rand(2, 3, 4, generator=g)}


@pytest.mark.parametrize("accum", [torch.float32, torch.bfloat16])
def test_sum_is_the_seeds_in_order_and_the_last_seed_holds_it(accum):
    seeds = [seed_scores(s) for s in (1, 2, 3)]
    want = {name: ((seeds[0][name].to(accum) + seeds[1][name].to(accum))
                   + seeds[2][name].to(accum)) for name in seeds[0]}
    total = RunningTotal()
    for seed, scores in zip((1, 2), seeds[:2]):
        scores = {k: v.to(accum) for k, v in scores.items()}
        total.add(seed, scores)
        assert scores == {}, "a folded seed's scores are released, not kept beside the sum"
        assert all(v.device == total.host for v in total.sums.values())
    last = {k: v.to(accum) for k, v in seeds[2].items()}
    pointers = {k: v.data_ptr() for k, v in last.items()}
    out = total.finish(3, last)
    assert total.seeds == [1, 2, 3] and total.sums == {}, "the host sum is freed as it is folded"
    for name, value in out.items():
        assert value.data_ptr() == pointers[name], "the mean is made in the last seed's tensors"
        assert torch.equal(value, want[name])


def test_restored_sum_continues_bit_for_bit():
    """A sum saved after seed 1 and restored gives what an uninterrupted sum gives."""
    uninterrupted = RunningTotal()
    uninterrupted.add(1, seed_scores(1))
    saved = {k: v.clone() for k, v in uninterrupted.sums.items()}
    want = uninterrupted.finish(2, seed_scores(2))
    got = RunningTotal(saved, [1]).finish(2, seed_scores(2))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_sum_is_pinned_host_memory_and_the_scores_stay_on_the_gpu():
    total = RunningTotal(host=running_total_device(torch.device("cuda")))
    for seed in (1, 2):
        total.add(seed, {k: v.cuda() for k, v in seed_scores(seed).items()})
        assert all(v.device.type == "cpu" and v.is_pinned() for v in total.sums.values())
    out = total.finish(3, {k: v.cuda() for k, v in seed_scores(3).items()})
    assert all(v.device.type == "cuda" for v in out.values())
    want = {k: seed_scores(1)[k] + seed_scores(2)[k] + seed_scores(3)[k] for k in out}
    assert all(torch.allclose(out[k].cpu(), want[k]) for k in out)


def test_a_runs_mean_is_its_seeds_scores_summed_in_order(tiny_llama_dir, tmp_path,
                                                         monkeypatch):
    """In a real three-seed run, the mean the run selects from equals ((s1 + s2) + s3) / 3 of
    the scores each seed produced, and the folds happened on the host."""
    from esa_core.engine import ScoringRun

    produced, folds, means = [], [], []
    score, add, score_seeds = ScoringRun.score, RunningTotal.add, pipeline._score_seeds

    def recorded(self, *args, **kwargs):
        out = score(self, *args, **kwargs)
        produced.append({k: v.clone() for k, v in out.items()})
        return out

    def watched(self, seed, scores):
        add(self, seed, scores)
        folds.append({v.device for v in self.sums.values()})

    def kept(*args, **kwargs):
        out = score_seeds(*args, **kwargs)
        means.append({k: v.clone() for k, v in out[0].items()})
        return out

    monkeypatch.setattr(ScoringRun, "score", recorded)
    monkeypatch.setattr(RunningTotal, "add", watched)
    monkeypatch.setattr(pipeline, "_score_seeds", kept)
    pipeline.run(model=str(tiny_llama_dir), out_dir=str(tmp_path / "run"), topk=4, seq_len=16,
                 max_samples=2, eval_samples=2, seeds=[1, 2, 3], device="cpu")
    assert len(produced) == 3 and len(means) == 1
    assert folds == [{torch.device("cpu")}] * 2  # seeds 1 and 2; seed 3 becomes the mean
    s1, s2, s3 = produced
    assert means[0].keys() == s1.keys()
    for name, mean in means[0].items():
        assert torch.equal(mean, ((s1[name] + s2[name]) + s3[name]) / 3)
        assert not torch.equal(s1[name], s2[name])  # the seeds really differ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_three_seeds_peak_like_one(tmp_path):
    """The finished seeds' sum waits on the host: three seeds' peak on the device exceeds one
    seed's by less than the largest scored matrix (a whole score set would be far more)."""
    import tiny

    config = tiny.llama_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    folder = tiny.save(config, tmp_path / "model")
    peaks = {}
    for seeds in ([1], [1, 2, 3]):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        pipeline.run(model=str(folder), out_dir=str(tmp_path / f"run{len(seeds)}"), topk=4,
                     seq_len=16, max_samples=2, eval_samples=2, seeds=seeds, device="cuda",
                     dtype="fp32", save_plots=False)
        peaks[len(seeds)] = torch.cuda.max_memory_allocated()
    largest = 4 * 1024 * 256  # an fp32 MLP matrix
    assert peaks[3] - peaks[1] < largest
