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


def test_the_sum_lives_on_the_host_whatever_scores():
    for scoring in ("cpu", "cuda", "cuda:1", "mps"):
        assert running_total_device(torch.device(scoring)) == torch.device("cpu")


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


def test_a_run_keeps_its_sum_where_running_total_device_says(tiny_llama_dir, tmp_path,
                                                              monkeypatch):
    """The pipeline asks for the sum's place with the scoring device, and every fold lands
    there (a GPU run would name cuda and get the host)."""
    asked, folds = [], []
    monkeypatch.setattr(pipeline, "running_total_device",
                        lambda device: asked.append(device) or torch.device("cpu"))
    add = RunningTotal.add

    def watched(self, seed, scores):
        add(self, seed, scores)
        folds.append({v.device for v in self.sums.values()})

    monkeypatch.setattr(RunningTotal, "add", watched)
    pipeline.run(model=str(tiny_llama_dir), out_dir=str(tmp_path / "run"), topk=4, seq_len=16,
                 max_samples=2, eval_samples=2, seeds=[1, 2, 3], device="cpu")
    assert asked == [torch.device("cpu")]
    assert folds == [{torch.device("cpu")}] * 2  # seeds 1 and 2; seed 3 becomes the mean
