"""The `esa` command line: `esa run`, `esa compare`, `esa report`, `esa list-plugins`.

Flags of `esa run` match the original guide.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path

import typer

from esa_core.errors import EsaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="ESA: find the few weights of a language model that matter most, and prove it.",
    pretty_exceptions_enable=False,
)
log = logging.getLogger("esa_core")
EXIT_USAGE = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _fail(message: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


@app.command("run")
def run_command(
    model: str | None = typer.Option(
        None, help="Hugging Face hub id, local model folder or .gguf file. "
        "Default: the embedded SmolLM2-135M-Instruct."),
    metric: str = typer.Option("grad_x_weight",
                               help="Sensitivity metric (see `esa list-plugins`)."),
    mode: str = typer.Option("per_layer", help="per_layer: top-k in every weight matrix; "
                             "global: top-k over the whole model."),
    topk: int = typer.Option(100, help="Number of critical weights (per matrix in per_layer)."),
    max_samples: int | None = typer.Option(
        None, help="Calibration blocks per seed. Default: 200 on a GPU, 16 on a CPU."),
    seeds: str = typer.Option("1337", help="Comma-separated data seeds, e.g. 1337,123,999."),
    stability_check: bool = typer.Option(False, "--stability-check",
                                         help="Compare the seeds' top-k sets (Jaccard)."),
    dtype: str = typer.Option("auto", help="bf16, fp16, fp32 or auto (bf16 on GPU, fp32 on CPU)."),
    save_plots: bool = typer.Option(False, "--save-plots", help="Write figures to plots/."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and tracebacks."),
    out_dir: str | None = typer.Option(
        None, help="Result folder. Default: outputs/esa/<model>/<metric>_<mode>_k<topk>."),
    perturb: str | None = typer.Option(None, help="Perturb the top-k: sign_flip, "
                                          "gauss_noise, bit_flip, zero, ..."),
    perturb_scale: float | None = typer.Option(
        None, help="The perturbation's `scale` option. sign_flip: w <- -scale*w (default 1); "
        "gauss_noise: sigma = scale x std of the weight's own matrix (default 1)."),
    perturb_prob: float | None = typer.Option(
        None, help="The perturbation's `prob` option: bit_flip's per-bit flip probability "
        "(default 0.05)."),
    perturb_arg: list[str] | None = typer.Option(
        None, help="Perturbation option key=value (repeatable; see `esa list-plugins`)."),
    eval_task: str | None = typer.Option(
        None, help="lm_eval evaluator: harness tasks, e.g. arc_easy,hellaswag, or a local "
        "task's YAML file (needs esa-toolkit[tasks])."),
    eval_limit: int | None = typer.Option(
        None, help="lm_eval evaluator: at most N items per task, for a quick run."),
    controls: str | None = typer.Option(None, help="Control sets: random_k,bottom_k,magnitude_k."),
    control_repeats: int = typer.Option(0, help="Extra random_k draws for the significance test "
                                        "(p-value resolution 1/(seeds+N+1))."),
    dataset: str = typer.Option("wikitext2", help="wikitext2 (bundled), a .txt file, a folder "
                                "of .txt files, or a Hugging Face dataset name."),
    seq_len: int | None = typer.Option(None, help="Tokens per block. Default: 512 on a GPU, "
                                          "128 on a CPU."),
    batch_size: int = typer.Option(1, help="Blocks per forward/backward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    device_map: str | None = typer.Option(
        None, help="Spread the model over the GPUs (and CPU) with accelerate: auto, balanced, "
        "balanced_low_0 or sequential; --device is then ignored for placement."),
    eval_samples: int | None = typer.Option(
        None, help="Held-out evaluation blocks. Default: 64 on a GPU, 16 on a CPU."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing result folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out-dir "
                                "(same flags); finished seeds are not repeated."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow a model's own Python code to run."),
    adapter: str | None = typer.Option(None, help="Model adapter (default: by model_type)."),
    include: str | None = typer.Option(None, help="Components to score, e.g. mlp.down,moe.down "
                                          "or embed,lm_head (added to the default set)."),
    exclude: str | None = typer.Option(None, help="Components not to score (globs allowed)."),
    metric_arg: list[str] | None = typer.Option(None, help="Metric option key=value "
                                                   "(repeatable)."),
    accum_dtype: str = typer.Option("fp32", help="Score accumulator dtype: fp32 or bf16."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing",
        help="Recompute activations in the backward pass: less memory for long --seq-len."),
) -> None:
    """Profile weight sensitivity, select the top-k, and write a result folder."""
    _setup_logging(verbose)
    from esa_core import distributed, pipeline
    from esa_core.config import RunConfig, parse_list, parse_metric_args
    from esa_core.guards import terminate_as_interrupt

    try:
        config = RunConfig(
            model=model, metric=metric, mode=mode, topk=topk, max_samples=max_samples,
            seeds=seeds, stability_check=stability_check, dtype=dtype, save_plots=save_plots,
            verbose=verbose, out_dir=out_dir, perturb=perturb, perturb_scale=perturb_scale,
            perturb_prob=perturb_prob, perturb_args=parse_metric_args(perturb_arg,
                                                                      "--perturb-arg"),
            eval_tasks=parse_list(eval_task), eval_limit=eval_limit,
            controls=parse_list(controls),
            control_repeats=control_repeats, dataset=dataset,
            seq_len=seq_len, batch_size=batch_size, device=device, device_map=device_map,
            eval_samples=eval_samples, overwrite=overwrite, resume=resume,
            trust_remote_code=trust_remote_code, adapter=adapter,
            include=parse_list(include), exclude=parse_list(exclude),
            metric_args=parse_metric_args(metric_arg), accum_dtype=accum_dtype,
            gradient_checkpointing=gradient_checkpointing,
        )
        with terminate_as_interrupt():
            result = pipeline.run(config, argv=["esa", *sys.argv[1:]])
    except EsaError as exc:
        _fail(str(exc), verbose)
    except KeyboardInterrupt as exc:
        typer.echo("Interrupted: the result folder's manifest says which stage completed; "
                   "run the same command with --resume to continue.", err=True)
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None
    if distributed.is_main():
        from esa_core.criteria import table

        typer.echo(table(result.manifest["success_criteria"]))
        typer.echo(f"Results written to {result.out_dir}")


@app.command("report")
def report_command(
    run_dir: str = typer.Argument(..., help="A result folder written by `esa run`."),
    save_plots: bool = typer.Option(True, "--save-plots/--no-save-plots",
                                    help="Also (re)write the figures to plots/."),
) -> None:
    """Redraw the figures and report.html of a result folder, without loading the model."""
    _setup_logging(False)
    from esa_core import report

    try:
        path = report.build(run_dir, save_plots=save_plots)
    except EsaError as exc:
        _fail(str(exc), False)
    typer.echo(f"Report written to {path}")


@app.command("compare")
def compare_command(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more result folders of one model."),
    out: Path = typer.Option(Path("comparison"), help="Folder for comparison.json and "
                             "comparison_heatmap.png (default: ./comparison)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing comparison."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and tracebacks."),
) -> None:
    """Compare the top-k sets of several runs: pairwise Jaccard, rank correlation, heatmap."""
    _setup_logging(verbose)
    from esa_core.compare import matrix_text, write_comparison
    from esa_core.criteria import table

    try:
        result = write_comparison(run_dirs, out, overwrite)
    except EsaError as exc:
        _fail(str(exc), verbose)
    typer.echo(matrix_text(result))
    typer.echo(table(result["success_criteria"]))
    typer.echo(f"Comparison written to {out}")


@app.command("list-plugins")
def list_plugins(
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Show every metric, perturbation, evaluator and model adapter, and where it came from."""
    _setup_logging(False)
    from esa_core.plugins import registry

    rows = [
        {"kind": e.kind, "name": e.name, "description": e.description,
         "distribution": e.distribution, "version": e.version,
         **({"error": e.error} if e.error else {}),
         **_extra(e.cls)}
        for e in registry().entries
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    headers = ("kind", "name", "description", "distribution", "version")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h) for h in headers]
    widths[2] = min(widths[2], 70)
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        cells = [str(r[h]) for h in headers]
        cells[2] = cells[2] if len(cells[2]) <= 70 else cells[2][:67] + "..."
        typer.echo("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        extras = [f"{k}: {v}" for k, v in r.items() if k not in (*headers, "error")]
        for line in extras:
            typer.echo(f"    {line}")


def _extra(cls) -> dict:
    """What else a user needs to know to use a plugin: its options, its model types."""
    from esa_core.api import Metric

    if cls is None:
        return {}
    extra = {}
    if getattr(cls, "options", ()):
        extra["options"] = ", ".join(
            f"{o.name}={o.default!r} ({o.type.__name__}){': ' + o.help if o.help else ''}"
            for o in cls.options)
    if issubclass(cls, Metric) and cls.components:
        extra["scores only"] = ", ".join(cls.components)
    if getattr(cls, "needs", None):
        extra["needs"] = ", ".join(sorted(cls.needs))
    if getattr(cls, "model_types", None):
        extra["model_types"] = ", ".join(cls.model_types)
    return extra


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="esa")


if __name__ == "__main__":
    main()
