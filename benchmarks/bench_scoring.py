"""What ESA's scoring costs, against a plain forward+backward loop over the same tokens.

    python benchmarks/bench_scoring.py                       # config-built Llama + embedded model
    python benchmarks/bench_scoring.py --model config --max-samples 8 --json out.json
    python benchmarks/bench_scoring.py --model path/to/hf-folder --device cuda

For each model it measures, over the same token blocks: a plain forward+backward loop
(plain_fwd_bwd: every parameter requires grad, as in training; gradients set to None after each
batch), the leanest such loop (plain_fwd_bwd_scored: only the scored weights get gradients, each
dropped as soon as it is complete), a plain no-grad forward loop, one evaluation pass (no-grad
forward + cross-entropy over the eval blocks), the scoring of every installed metric (the
registry's, so new metric plugins are picked up) and grad_x_weight with gradient checkpointing.
With the config model it also times grad_x_weight over 4 --max-samples sizes (R^2 of a linear
fit) and builds two more depths (3 model sizes).

All runs of one model happen in one fresh worker process, in --repeats rounds, so that a change
of the machine's load hits every run alike. Time: each run's fastest round, after a warm-up
batch; wall seconds and the process's CPU seconds (one torch thread by default: idle OpenMP
threads spin on a busy machine and would inflate CPU time).
Peak memory (CPU): the kernel's peak resident set size (VmHWM) of the worker during the measured
loop, minus its resident size just before it (freed heap is first returned to the OS with
malloc_trim, then the peak is reset through /proc/self/clear_refs). It counts every byte the loop
touched, torch's and Python's, including memory the C allocator kept after a free. On CUDA:
torch's peak allocated bytes during the loop minus those before it. Memory above plain is in
units of the scored parameters' fp32 bytes (one fp32 accumulator per scored weight).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

BASELINES = ("plain_fwd_bwd", "plain_fwd_bwd_scored", "plain_fwd", "eval_pass",
             "perturb_apply_restore")
CONFIG = dict(vocab_size=49152, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
DEFAULT_LAYERS = 8
SIZE_LAYERS = (4, 8, 16)


# ------------------------------------------------------------------ worker (one measurement)


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


class PeakMemory:
    """Peak bytes above the level at `start()`: CUDA allocator peak, or the process's VmHWM."""

    def __init__(self, device) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _status_kb("VmRSS") * 1024

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def _load(spec: dict):
    """Model (eval mode), adapter, calibration blocks and eval blocks for one worker."""
    import torch

    from esa_core import data, loading
    from esa_core.plugins import registry

    device = torch.device(spec["device"])
    if spec["model"] == "config":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(**CONFIG, num_hidden_layers=spec["layers"])
        model = AutoModelForCausalLM.from_config(config).to(device).eval()
        adapter = registry().adapter_for(config.model_type)()
        generator = torch.Generator().manual_seed(0)
        shape = (spec["blocks"] + spec["eval_blocks"], spec["seq_len"])
        tokens = torch.randint(config.vocab_size, shape, generator=generator)
        return model, adapter, tokens[: spec["blocks"]], tokens[spec["blocks"]:]
    source = loading.resolve(None if spec["model"] == "default" else spec["model"])
    model_type = loading.load_config(source).model_type
    adapter = registry().adapter_for(model_type)()
    model, tokenizer = adapter.load(source, loading.pick_dtype("auto", device), device)
    tokens = data.tokenize(data.read_texts(data.BUNDLED), tokenizer, spec["seq_len"],
                           spec["eval_blocks"])
    return model, adapter, tokens.draw(0, spec["blocks"]), tokens.eval_blocks


def _loops(spec: dict, model, adapter, metrics: list[str]) -> dict:
    """name -> (loop over blocks, number of scored weights, probes) for every measured run."""
    import torch

    from esa_core.engine import ScoringRun, batch_loss, only_scored_require_grad
    from esa_core.perturbation import perturbed
    from esa_core.plugins import registry
    from esa_core.selection import select

    size = spec["batch_size"]
    device = next(model.parameters()).device

    def plain_fwd_bwd(blocks):
        for batch in blocks.split(size):
            batch_loss(model, batch.to(device, non_blocking=True)).backward()
            model.zero_grad(set_to_none=True)

    def plain_fwd_bwd_scored(blocks):
        """The least a gradient metric must hold: only scored weights get a gradient, and each
        gradient is dropped as soon as it is complete."""
        def drop(param):
            param.grad = None

        with only_scored_require_grad(model, default_scored):
            hooks = [s.param.register_post_accumulate_grad_hook(drop) for s in default_scored]
            plain_fwd_bwd(blocks)
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def plain_fwd(blocks):
        for batch in blocks.split(size):
            model(input_ids=batch.to(device, non_blocking=True), use_cache=False)

    @torch.no_grad()
    def eval_pass(blocks):
        for batch in blocks.split(size):
            batch_loss(model, batch.to(device, non_blocking=True))

    def perturb_apply_restore(_blocks):
        """One perturbation condition: sign_flip of the per_layer top-100 (by |w|), applied in
        place and restored with its checksum check, as the evaluation stage does per condition."""
        with perturbed(condition, params, sign_flip, torch.Generator().manual_seed(0), 1.0, 0.0,
                       pristine):
            pass

    def scoring(name: str, checkpointing: bool = False):
        metric = registry().get("metric", name)()
        scored = adapter.scored_params(model, getattr(metric, "components", None) or ())
        run = ScoringRun(model, adapter, scored, metric, torch.float32, size, progress=False,
                         gradient_checkpointing=checkpointing)
        return (lambda blocks: run.score(blocks, seed=0),
                sum(s.param.numel() for s in scored), getattr(metric, "probes", 1))

    default_scored = adapter.scored_params(model)
    n = sum(s.param.numel() for s in default_scored)
    params = {s.name: s.param for s in default_scored}
    condition = select({k: p.detach().abs() for k, p in params.items()},
                       [m for s in default_scored for m in s.matrices], 100, "per_layer")
    sign_flip = registry().get("perturbation", "sign_flip")()
    pristine: dict[int, int] = {}  # a study's checksum cache: filled by the warm-up round
    loops = {"plain_fwd_bwd": (plain_fwd_bwd, n, 1),
             "plain_fwd_bwd_scored": (plain_fwd_bwd_scored, n, 1),
             "plain_fwd": (plain_fwd, n, 1),
             "eval_pass": (eval_pass, n, 1),
             "perturb_apply_restore": (perturb_apply_restore, len(condition), 1)}
    for name in metrics:
        loops[name] = scoring(name)
    if spec.get("checkpointing"):
        loops["grad_x_weight+checkpointing"] = scoring("grad_x_weight", checkpointing=True)
    return loops


def _trim() -> None:
    """Give freed heap memory back to the OS, so the next run's peak starts from live memory."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then be understated, not overstated
        pass


def worker(spec: dict) -> dict:
    """Every run of one model, in rounds (so a change of machine load hits all runs alike);
    each run's fastest round and its largest peak."""
    import torch

    torch.set_num_threads(spec["threads"])
    model, adapter, blocks, eval_blocks = _load(spec)
    loops = _loops(spec, model, adapter, spec["metrics"])
    device = next(model.parameters()).device
    runs = [(name, n) for name in loops for n in
            ([spec["blocks"]] if name != "grad_x_weight" else spec["sample_sizes"])]
    memory = PeakMemory(device)
    results: dict[str, dict] = {}
    for name, _ in runs:
        loops[name][0]((eval_blocks if name == "eval_pass" else blocks)[: spec["batch_size"]])
    for _ in range(spec["repeats"]):
        for name, n in runs:
            loop, n_scored, probes = loops[name]
            data = eval_blocks if name == "eval_pass" else blocks[:n]
            _trim()
            memory.start()
            wall, cpu = time.perf_counter(), time.process_time()
            loop(data)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            peak = memory.peak()
            key = name if n == spec["blocks"] else f"{name}@{n}"
            old = results.get(key)
            results[key] = {
                "wall_s": min(wall, old["wall_s"]) if old else wall,
                "cpu_s": min(cpu, old["cpu_s"]) if old else cpu,
                "peak_bytes": max(peak, old["peak_bytes"]) if old else peak,
                "n_scored": n_scored, "probes": probes, "blocks": len(data),
                "tokens": int(data.numel()),
            }
    return {"n_params": sum(p.numel() for p in model.parameters()), "runs": results}


# ------------------------------------------------------------------ driver


def measure(spec: dict, log) -> dict:
    """Run one model's measurements in a fresh Python process (a clean memory high-water mark)."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed for {spec['model']}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log(json.dumps(result))
    return result


def machine() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = a + b x and its R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": a, "slope_s_per_block": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def ratios(rows: dict) -> dict:
    """Each scoring against the plain loop its work is made of (see the module docstring)."""
    from esa_core.api import ACTIVATIONS, GRAD, HVP
    from esa_core.plugins import registry

    fb, fwd, lean = rows["plain_fwd_bwd"], rows["plain_fwd"], rows["plain_fwd_bwd_scored"]
    out = {}
    for name, row in rows.items():
        if name in BASELINES or "@" in name:
            continue
        needs = registry().get("metric", name.split("+")[0]).needs
        if HVP in needs:
            against, unit, label = fb, row["probes"], "fwd+bwd per probe"
        elif GRAD in needs:
            against, unit, label = fb, 1, "fwd+bwd"
        else:
            against, unit, label = fwd, 1, "fwd" if ACTIVATIONS in needs else "fwd (no data)"
        out[name] = {
            "against": label,
            "wall_ratio": row["wall_s"] / (unit * against["wall_s"]),
            "cpu_ratio": row["cpu_s"] / (unit * against["cpu_s"]),
            "peak_above_plain_fwd_bwd_in_scored_fp32": (row["peak_bytes"] - fb["peak_bytes"])
            / (4 * row["n_scored"]),
            "peak_above_plain_fwd_bwd_scored_in_scored_fp32":
                (row["peak_bytes"] - lean["peak_bytes"]) / (4 * row["n_scored"]),
        }
    return out


def bench(args, log) -> dict:
    from esa_core.plugins import registry

    base = {"blocks": args.max_samples, "eval_blocks": args.eval_samples,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "repeats": args.repeats,
            "device": args.device, "threads": args.threads, "layers": DEFAULT_LAYERS,
            "metrics": args.metric or sorted(registry().metrics), "checkpointing": True}
    n = args.max_samples
    sizes = sorted({max(1, n * f // 4) for f in (1, 2, 3, 4)})
    results = {"machine": machine(), "settings": base, "models": {}}
    for model in args.model or ["config", "default"]:
        log(f"{model} ...")
        scale = model == "config" and not args.no_scaling
        got = measure({**base, "model": model,
                       "sample_sizes": sizes if scale else [n]}, log)
        runs = got["runs"]
        results["models"][model] = {
            **got, "ratios": ratios(runs),
            "perturb_apply_restore_vs_eval_pass": runs["perturb_apply_restore"]["wall_s"]
            / runs["eval_pass"]["wall_s"]}
        if scale:
            runs = got["runs"]
            points = [(m, runs["grad_x_weight" if m == n else f"grad_x_weight@{m}"])
                      for m in sizes]
            results["max_samples_scaling"] = {
                "points": [{"max_samples": m, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
                           for m, r in points],
                **{f"fit_{k}": linear_fit([m for m, _ in points], [r[k] for _, r in points])
                   for k in ("wall_s", "cpu_s")},
            }
    if not args.no_scaling:
        sizes_out = []
        for layers in SIZE_LAYERS:
            got = (results["models"]["config"] if layers == DEFAULT_LAYERS
                   and "config" in results["models"] else
                   measure({**base, "model": "config", "layers": layers, "sample_sizes": [n],
                            "metrics": ["grad_x_weight"], "checkpointing": False}, log))
            plain, scoring = got["runs"]["plain_fwd_bwd"], got["runs"]["grad_x_weight"]
            sizes_out.append({"layers": layers, "n_params": got["n_params"],
                              "n_scored": scoring["n_scored"],
                              "plain_fwd_bwd_wall_s": plain["wall_s"],
                              "grad_x_weight_wall_s": scoring["wall_s"],
                              "wall_ratio": scoring["wall_s"] / plain["wall_s"],
                              "cpu_ratio": scoring["cpu_s"] / plain["cpu_s"]})
        results["model_size_scaling"] = sizes_out
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    return results


def table(results: dict) -> str:
    lines = []
    for model, result in results["models"].items():
        lines.append(f"\n## {model} ({result['n_params'] / 1e6:.1f}M parameters)\n")
        lines.append("| run | wall s | CPU s | peak MB | ratio wall / CPU | against "
                     "| peak above plain fwd+bwd / above plain_fwd_bwd_scored (x scored fp32) |")
        lines.append("|---|---:|---:|---:|---|---|---:|")
        for name, row in result["runs"].items():
            if "@" in name:
                continue
            r = result["ratios"].get(name)
            ratio = f"{r['wall_ratio']:.3f} / {r['cpu_ratio']:.3f}" if r else ""
            above = (f"{r['peak_above_plain_fwd_bwd_in_scored_fp32']:+.3f} / "
                     f"{r['peak_above_plain_fwd_bwd_scored_in_scored_fp32']:+.3f}" if r else "")
            lines.append(f"| {name} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | "
                         f"{row['peak_bytes'] / 2**20:.0f} | {ratio} | "
                         f"{r['against'] if r else ''} | {above} |")
        lines.append(f"\napply + restore of one perturbation condition / one evaluation pass: "
                     f"{result['perturb_apply_restore_vs_eval_pass']:.4f}")
    sc = results.get("max_samples_scaling")
    if sc:
        lines.append("\n## grad_x_weight time against --max-samples (config model)\n")
        lines.append("| max-samples | wall s | CPU s |")
        lines.append("|---:|---:|---:|")
        for r in sc["points"]:
            lines.append(f"| {r['max_samples']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |")
        for key in ("wall_s", "cpu_s"):
            fit = sc[f"fit_{key}"]
            lines.append(f"\nlinear fit of {key}: {fit['slope_s_per_block']:.3f} s/block + "
                         f"{fit['intercept_s']:.3f} s, R^2 = {fit['r2']:.4f}")
    if results.get("model_size_scaling"):
        lines.append("\n## model size (config Llama, depth varied)\n")
        lines.append("| layers | params | scored | plain fwd+bwd wall s | grad_x_weight wall s | "
                     "ratio wall / CPU |")
        lines.append("|---:|---:|---:|---:|---:|---|")
        for r in results["model_size_scaling"]:
            lines.append(f"| {r['layers']} | {r['n_params'] / 1e6:.1f}M | "
                         f"{r['n_scored'] / 1e6:.1f}M | {r['plain_fwd_bwd_wall_s']:.2f} | "
                         f"{r['grad_x_weight_wall_s']:.2f} | "
                         f"{r['wall_ratio']:.3f} / {r['cpu_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append",
                        help="config (a Llama built from a config), default (the embedded "
                        "SmolLM2), or a model folder/hub id; repeatable. Default: config, default.")
    parser.add_argument("--max-samples", type=int, default=8, help="calibration blocks")
    parser.add_argument("--eval-samples", type=int, default=8, help="evaluation blocks")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default because on a busy machine idle OpenMP "
                        "threads spin and inflate CPU time")
    parser.add_argument("--metric", action="append", help="metrics to run (default: all)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling runs")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = bench(args, log)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
