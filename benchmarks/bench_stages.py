"""What the stages after scoring cost at scale: selection, statistics, stability, controls.

    python benchmarks/bench_stages.py                  # ~110M scored weights (8 Llama blocks)
    python benchmarks/bench_stages.py --layers 2 --hidden 256

A Llama built from a config (random weights) stands in for the model, and heavy-tailed random
scores (|N(0,1)|^3) for a seed's scores: these stages cost the same whatever the values. Each
stage runs once on the scores where they live (--device), and reports wall seconds and the peak
memory it added (CUDA: torch's peak allocated bytes; CPU: the process's peak resident set above
its level before the stage), in units of one score set (4 bytes per scored weight): a stage that
streams matrix by matrix stays far below 1. On the CPU the script runs itself with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so freed matrix-sized buffers go back to the OS
and the resident peak counts live tensors, not the allocator's leftovers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import PeakMemory, _trim  # noqa: E402


def setup(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from esa_core.plugins import registry

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 7 // 2, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=4)
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    scored = registry().adapter_for("llama")().scored_params(model)
    generator = torch.Generator(device=device).manual_seed(1)
    scores = {s.name: torch.randn(s.param.shape, generator=generator, device=device).abs_()
              .pow_(3) for s in scored}
    return model, scored, scores


def stages(args, scored, scores) -> dict:
    """name -> a call that runs one stage as the pipeline does."""
    import torch

    from esa_core import stability
    from esa_core.controls import WeightIndex, control_set
    from esa_core.pipeline import csv_rows
    from esa_core.selection import param_offsets, select
    from esa_core.stats import sensitivity_stats

    matrices = [m for s in scored for m in s.matrices]
    params = {s.name: s.param for s in scored}
    offsets = param_offsets(params)
    index = WeightIndex(matrices, params)
    k = args.topk
    chosen = {mode: select(scores, matrices, k, mode) for mode in ("per_layer", "global")}

    def controls(mode: str):
        for name in ("random_k", "bottom_k", "magnitude_k"):
            control_set(name, chosen[mode], index, scores, k, mode,
                        torch.Generator().manual_seed(0))

    return {
        "select per_layer": lambda: select(scores, matrices, k, "per_layer"),
        "select global": lambda: select(scores, matrices, k, "global"),
        "top_weights.csv rows (per_layer)": lambda: csv_rows(chosen["per_layer"], params),
        "sensitivity_stats (with |w| histogram)":
            lambda: sensitivity_stats(scores, matrices, params, k),
        "stability capture per_layer": lambda: stability.capture(scores, matrices, offsets, k,
                                                                 "per_layer"),
        "stability capture global": lambda: stability.capture(scores, matrices, offsets, k,
                                                              "global"),
        "controls per_layer (random, bottom, magnitude)": lambda: controls("per_layer"),
        "controls global (random, bottom, magnitude)": lambda: controls("global"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import torch

    torch.set_num_threads(args.threads)
    model, scored, scores = setup(args)
    n_scored = sum(s.param.numel() for s in scored)
    memory = PeakMemory(torch.device(args.device))
    out = {"n_scored": n_scored, "device": args.device, "torch_threads": torch.get_num_threads(),
           "stages": {}}
    print(f"{n_scored / 1e6:.1f}M scored weights on {args.device}")
    for name, call in stages(args, scored, scores).items():
        _trim()
        memory.start()
        start = time.perf_counter()
        call()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        peak = memory.peak() / (4 * n_scored)
        out["stages"][name] = {"wall_s": round(wall, 3), "peak_in_score_sets": round(peak, 3)}
        print(f"| {name} | {wall:.2f} | {peak:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
