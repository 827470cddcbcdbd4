"""The benchmark scripts, at tiny shapes on the CPU: every step runs and is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_gpu_guide_runs_every_step_at_a_tiny_shape(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_guide_8b

    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    args = ["--shape", "tiny", "--layers", "1", "--device", "cpu", "--max-samples", "2",
            "--seq-len", "16", "--eval-samples", "2", "--batch-size", "1",
            "--work", str(tmp_path / "work")]
    rows = gpu_guide_8b.main([*args, "--results", str(results)])
    steps = [r["step"] for r in rows]
    assert steps[0] == "build + save model" and steps[1].startswith("plain fwd+bwd")
    assert [s.split(":")[0] for s in steps[2:]] == ["Phase 1", "Phase 3"]
    config = gpu_guide_8b.llama_config(type("A", (), {"shape": "tiny", "layers": 1,
                                                      "hidden": None})())
    embeddings = 2 * config.vocab_size * config.hidden_size  # embed + lm_head, not tied
    assert rows[0]["written_bytes"] >= 4 * embeddings  # the fp32 model folder was written
    phase1, phase3 = rows[2]["stages"], rows[3]["stages"]
    assert list(phase1) == ["load", "data", "scoring", "selection", "stability", "plots"]
    assert "evaluation" in phase3 and "evaluation" not in phase1
    assert all(r["total_s"] > 0 for r in rows)
    assert all(r["pinned_peak_bytes"] == 0 for r in rows)  # no CUDA, no pinned memory
    text = results.read_text()
    assert text.startswith("# earlier results\n")  # appended, never rewritten
    assert text.count("| tiny layers=1 |") == 4
    assert not (tmp_path / "work").exists()


def test_a_step_records_the_peak_of_memory_it_freed_again(monkeypatch):
    """Step's peak is the high-water mark, not what is left: 256 MB held and freed inside it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_guide_8b
    import torch

    size = 256 * 2**20
    with gpu_guide_8b.Step("cpu") as step:
        held = torch.ones(size, dtype=torch.uint8)
        del held
    # what is left would be ~0; the kernel may drop a few file-backed pages of the base meanwhile
    assert step.peak - step.memory.base >= size - 16 * 2**20
    assert step.pinned == 0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_step_records_the_peak_pinned_host_memory(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_guide_8b
    import torch

    torch.cuda.init()
    size = 64 * 2**20
    with gpu_guide_8b.Step("cuda") as step:
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        del pinned
    assert step.pinned >= size


def test_bench_stages_measures_every_stage_after_scoring(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_stages

    out = bench_stages.main(["--layers", "1", "--hidden", "64", "--topk", "5"])
    # q, k, v, o, gate, up, down of one block: 64x64 x2, 16x64 x2, 224x64 x3
    assert out["n_scored"] == 2 * 64 * 64 + 2 * 16 * 64 + 3 * 224 * 64
    assert {"select global", "sensitivity_stats (with |w| histogram)",
            "controls global (random, bottom, magnitude)"} <= set(out["stages"])
    assert all(stage["wall_s"] >= 0 for stage in out["stages"].values())
