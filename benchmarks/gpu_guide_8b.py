"""The guide's Llama-3.1-8B commands at full shape on one GPU: what each stage costs.

    python benchmarks/gpu_guide_8b.py                               # 8B shape, on cuda
    python benchmarks/gpu_guide_8b.py --shape tiny --device cpu \\
        --max-samples 4 --seq-len 32 --eval-samples 4              # the same steps in seconds

The model is built from a LlamaConfig with Llama-3.1-8B's shape (`--shape 8b`; `--layers` and
`--hidden` shrink it) and random weights: time, memory and bytes do not depend on the values, and
no download is needed. It is saved as a model folder with the embedded SmolLM2 tokenizer (its
49,152 ids all lie inside Llama's 128,256-token vocabulary). Then, in this process:

1. a plain forward+backward loop over one seed's tokens (the floor any gradient metric costs);
2. the guide's Phase-1 command (grad_x_weight, per_layer, top-100, three seeds, stability check,
   plots) through `esa_core.run`, as `esa run` calls it;
3. the guide's Phase-3 command (the same plus sign_flip against random_k and bottom_k).

`--mode global` runs both with a global top-100 instead of per_layer.

Each step appends a row to benchmarks/RESULTS.md: wall seconds per stage (the manifest's
timings), peak memory (CUDA: torch's peak allocated bytes; CPU: the process's peak resident set),
on CUDA the peak pinned host memory (torch's pinned-memory allocator: the seeds' running sum
lives there), and bytes the process wrote (/proc/self/io wchar: result files, checkpoints, the
model folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import PeakMemory, machine  # noqa: E402

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
SHAPES = {"8b": LLAMA_31_8B,
          "tiny": {**LLAMA_31_8B, "vocab_size": 49152, "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2}}
SEEDS = "1337,123,999"
PHASE_1 = dict(metric="grad_x_weight", mode="per_layer", topk=100, seeds=SEEDS,
               stability_check=True, save_plots=True, verbose=True)
PHASE_3 = dict(PHASE_1, perturb="sign_flip", perturb_scale=1.0, controls=["random_k", "bottom_k"])
GUIDE_RUNS = {"phase1": ("Phase 1: grad_x_weight {mode} top-100, 3 seeds, stability, plots",
                         PHASE_1),
              "phase3": ("Phase 3: Phase 1 + sign_flip against random_k, bottom_k", PHASE_3)}
HEADER = ("| date | device | shape | step | wall s per stage | total s | peak memory GB | "
          "peak pinned host GB | written MB |")


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (Linux; 0 elsewhere)."""
    io = Path("/proc/self/io")
    if not io.exists():
        return 0
    return int(next(line.split()[1] for line in io.read_text().splitlines()
                    if line.startswith("wchar:")))


def llama_config(args):
    from transformers import LlamaConfig

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.hidden:  # Llama-3.1-8B's MLP is 3.5 x its hidden size
        shape.update(hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2)
    return LlamaConfig(**shape)


def build(args, folder: Path):
    """Random-init the model on the device, in bf16 on a GPU, and save it with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esa_core import loading

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(llama_config(args), dtype=dtype).eval()
    model.save_pretrained(folder)
    gguf = loading.default_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return model


def plain_loop(model, args) -> float:
    """Wall seconds of forward+backward over one seed's worth of random tokens."""
    import torch

    from esa_core.engine import batch_loss

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(49152, (args.max_samples, args.seq_len), generator=generator)
    batches = tokens.split(args.batch_size)
    batch_loss(model, batches[0].to(args.device)).backward()  # warm-up: kernels, allocator
    model.zero_grad(set_to_none=True)
    sync(args.device)
    start = time.perf_counter()
    for batch in batches:
        batch_loss(model, batch.to(args.device)).backward()
        model.zero_grad(set_to_none=True)
    sync(args.device)
    return time.perf_counter() - start


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pinned_peak(reset: bool = False) -> int:
    """Peak bytes of CUDA's pinned host allocator (0 where CUDA is not in use); `reset` starts
    a new peak."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    if reset:
        torch.cuda.memory.reset_peak_host_memory_stats()
        return 0
    return int(torch.cuda.memory.host_memory_stats().get("allocated_bytes.peak", 0))


class Step:
    """Peak memory, peak pinned host memory and bytes written around one step."""

    def __init__(self, device: str) -> None:
        import torch

        self.memory = PeakMemory(torch.device(device))

    def __enter__(self) -> Step:
        gc.collect()
        self.memory.start()
        pinned_peak(reset=True)
        self.written = written_bytes()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.peak = self.memory.peak() + self.memory.base  # what the device held at most
        self.pinned = pinned_peak()
        self.written = written_bytes() - self.written


def guide_run(name: str, settings: dict, folder: Path, args) -> tuple[dict, Step]:
    import esa_core

    out_dir = Path(args.work) / name
    with Step(args.device) as step:
        result = esa_core.run(model=str(folder), out_dir=str(out_dir), overwrite=True,
                              device=args.device, max_samples=args.max_samples,
                              seq_len=args.seq_len, eval_samples=args.eval_samples,
                              batch_size=args.batch_size, dtype=args.dtype,
                              **{**settings, "mode": args.mode})
    return result.manifest, step


def row(args, step_name: str, stages: dict, step: Step) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": args.device_name,
            "shape": args.shape_label, "step": step_name,
            "stages": {k.removesuffix("_s"): v for k, v in stages.items() if k != "total_s"},
            "total_s": round(step.wall, 2), "peak_bytes": step.peak,
            "pinned_peak_bytes": step.pinned, "written_bytes": step.written}


def markdown(r: dict) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
    return (f"| {r['date']} | {r['device']} | {r['shape']} | {r['step']} | {stages} | "
            f"{r['total_s']:.1f} | {r['peak_bytes'] / 1e9:.2f} | "
            f"{r['pinned_peak_bytes'] / 1e9:.2f} | {r['written_bytes'] / 1e6:.1f} |")


def append(results: Path, rows: list[dict], command: str) -> None:
    text = results.read_text() if results.exists() else ""
    if "## GPU guide runs" not in text:
        text += ("\n## GPU guide runs (benchmarks/gpu_guide_8b.py)\n\nOne block per "
                 "invocation; rows appended by the script.\n")
    lines = [f"\n`{command}`\n", HEADER, "|---|---|---|---|---|---:|---:|---:|---:|",
             *map(markdown, rows)]
    results.write_text(text + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, help="override the shape's number of blocks")
    parser.add_argument("--hidden", type=int, help="override the hidden size (MLP 3.5x)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-samples", type=int, default=200, help="the guide's 200")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mode", choices=("per_layer", "global"), default="per_layer",
                        help="the guide's per_layer, or global top-k")
    parser.add_argument("--steps", default="plain,phase1,phase3",
                        help="which steps to run, comma-separated")
    parser.add_argument("--work", default="outputs/gpu_guide_8b",
                        help="model folder and result folders (deleted at the end)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    args.device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                        else f"CPU ({machine()['cpu']})")
    args.shape_label = args.shape + "".join(
        f" {k}={v}" for k, v in (("layers", args.layers), ("hidden", args.hidden)) if v)
    steps = args.steps.split(",")
    folder = Path(args.work) / "model"
    rows = []
    try:
        with Step(args.device) as step:
            model = build(args, folder)
        rows.append(row(args, "build + save model", {}, step))
        if "plain" in steps:
            with Step(args.device) as step:
                loop_s = plain_loop(model, args)
            rows.append(row(args, "plain fwd+bwd, one seed's tokens", {"loop": loop_s}, step))
        del model
        gc.collect()
        for name, (label, settings) in GUIDE_RUNS.items():
            if name in steps:
                manifest, step = guide_run(name, settings, folder, args)
                label = label.format(mode=args.mode)
                if args.mode != "per_layer":
                    label = label.replace("Phase 1 +", f"Phase 1 ({args.mode}) +")
                rows.append(row(args, label, manifest["timings"], step))
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    append(Path(args.results), rows, "python benchmarks/gpu_guide_8b.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        print(markdown(r))
    return rows


if __name__ == "__main__":
    main()
