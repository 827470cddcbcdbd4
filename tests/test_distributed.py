"""torchrun: two ranks on gloo give the single-process top-k, and only rank 0 writes."""

import csv
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

from esa_core import distributed, pipeline
from esa_core.api import RunningMax
from esa_core.layout import read_json

ARGS = ["--save-plots", "--max-samples", "5", "--seq-len", "32", "--topk", "8", "--mode", "global",
        "--device", "cpu", "--eval-samples", "2"]


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "top_weights.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_torchrun_two_ranks_equal_one_process(tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(tiny.wikitext_sample(40_000), encoding="utf-8")
    args = ["--model", str(tiny_llama_dir), "--dataset", str(text), *ARGS]
    # `torchrun` is torch.distributed.run's console script; -m finds it in any environment.
    esa = shutil.which("esa", path=str(Path(sys.executable).parent))
    assert esa, "the esa console script must be installed beside this Python"
    multi = tmp_path / "two-ranks"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
         esa, "run", *args, "--out-dir", str(multi)],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Results written to") == 1  # rank 1 neither writes nor prints
    assert list((multi / "plots").glob("*.png"))  # rank 0 draws from the files it wrote

    single = tmp_path / "one-process"
    config = pipeline.RunConfig(model=str(tiny_llama_dir), dataset=str(text), max_samples=5,
                                seq_len=32, topk=8, mode="global", device="cpu", eval_samples=2,
                                out_dir=str(single))
    pipeline.run(config)

    assert read_json(multi / "experiment_manifest.json")["environment"]["world_size"] == 2
    assert read_json(single / "experiment_manifest.json")["environment"]["world_size"] == 1
    one, two = _rows(single), _rows(multi)
    assert len(one) == 8
    key = ("rank", "param", "row", "col", "weight")
    assert [[r[k] for k in key] for r in two] == [[r[k] for k in key] for r in one]
    torch.testing.assert_close(torch.tensor([float(r["score"]) for r in two]),
                               torch.tensor([float(r["score"]) for r in one]),
                               rtol=1e-5, atol=0)


@pytest.mark.slow  # two torchrun ranks and one process score a tiny model: about 40 s
def test_torchrun_detection_table_equals_one_process(tiny_llama_dir, tmp_path):
    """Each rank sees every other block; the channel peaks gathered with their positions give
    the single process's super_weight detection table, position for position."""
    text = tmp_path / "text.txt"
    text.write_text(tiny.wikitext_sample(40_000), encoding="utf-8")
    args = ["run", "--model", str(tiny_llama_dir), "--dataset", str(text), "--metric",
            "super_weight", "--max-samples", "6", "--seq-len", "32", "--topk", "4",
            "--device", "cpu", "--eval-samples", "2"]
    esa = shutil.which("esa", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for ranks, folder in (("2", "two-ranks"), ("1", "one-process")):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks,
             "--no-python", esa, *args, "--out-dir", str(tmp_path / folder)],
            capture_output=True, text=True, timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_json(tmp_path / folder / "sensitivity_stats.json")["findings"][
        "super_weight_detection"]["rows"] for folder in ("one-process", "two-ranks"))
    assert one and two == one
    assert {d["output_token"] for d in one} | {d["input_token"] for d in one} != {0}


def _reduce_on_rank(rank: int, store_file: str, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        sums = {"a": torch.tensor([1.0, 2.0]) * (rank + 1),
                "b": (torch.tensor([rank], dtype=torch.bfloat16), {"c": torch.ones(2, 2)})}
        extremes = {"m": torch.tensor([float(rank), -float(rank)])}
        distributed.all_reduce(sums)
        distributed.all_reduce(extremes, "max")
        results.put((rank, distributed.shard(list(range(5))), sums["a"].tolist(),
                     float(sums["b"][0]), sums["b"][1]["c"].tolist(), extremes["m"].tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_sums_or_takes_extremes_and_shard_splits_round_robin(tmp_path):
    context = multiprocessing.get_context("fork")  # the children reuse this process's torch
    results = context.Queue()
    ranks = [context.Process(target=_reduce_on_rank, args=(r, str(tmp_path / "store"), results))
             for r in range(2)]
    for p in ranks:
        p.start()
    got = sorted(results.get(timeout=60) for _ in ranks)
    for p in ranks:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [g[1] for g in got] == [[0, 2, 4], [1, 3]]
    for _, _, a, b, c, m in got:
        assert a == [3.0, 6.0]  # 1*(1, 2) + 2*(1, 2)
        assert b == 1.0  # 0 + 1, in bf16
        assert c == [[2.0, 2.0], [2.0, 2.0]]
        assert m == [1.0, 0.0]  # max(0, 1), max(-0, -1)


def test_single_process_is_the_identity():
    states = {"a": torch.tensor([1.0, 2.0])}
    distributed.all_reduce(states, "max")
    assert states["a"].tolist() == [1.0, 2.0]
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.is_main()


def test_unknown_reduction_and_non_tensor_state_are_refused():
    from esa_core.errors import EsaError

    with pytest.raises(EsaError, match="unknown cross-rank reduction 'mean'"):
        distributed.all_reduce({}, "mean")
    with pytest.raises(EsaError, match="cannot reduce a int"):
        distributed._parts([torch.zeros(1), 3])


# each rank's channel maxima and the block positions where it saw them
PEAKS = {0: ([5.0, 1.0, 7.0, 2.0], [3, 9, 0, 4]),
         1: ([4.0, 6.0, 7.0, 2.5], [8, 1, 6, 2])}


def _peaks_on_rank(rank: int, store_file: str, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        values, at = PEAKS[rank]
        peaks = RunningMax(torch.tensor(values), torch.tensor(at))
        distributed.all_reduce({"m": (peaks, torch.tensor([float(rank)]))}, "max")
        results.put((rank, peaks.values.tolist(), peaks.at.tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_running_maxima_keep_the_position_of_their_own_value_across_ranks(tmp_path):
    """Per channel, the larger value and where that rank saw it (rank 0's on a tie), never the
    larger of the two positions."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_peaks_on_rank, args=(r, str(tmp_path / "store"), results))
             for r in range(2)]
    for p in ranks:
        p.start()
    got = [results.get(timeout=60) for _ in ranks]
    for p in ranks:
        p.join(timeout=30)
        assert p.exitcode == 0
    expected_values, expected_at = [], []
    for channel in range(4):  # by hand: the winner's value and position
        (v0, a0), (v1, a1) = ((PEAKS[r][0][channel], PEAKS[r][1][channel]) for r in (0, 1))
        expected_values.append(max(v0, v1))
        expected_at.append(a0 if v0 >= v1 else a1)
    assert expected_at == [3, 1, 0, 2]  # the max of positions would be [8, 9, 6, 4]
    for _, values, at in got:
        assert values == expected_values and at == expected_at
