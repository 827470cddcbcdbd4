"""The `esa` command line: `esa run`, `esa compare`, `esa report`, `esa list-plugins`.

Flags of `esa run` match the original guide.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from esa_core.errors import EsaError, write_failure

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="ESA: find the few weights of a language model that matter most, and prove it.",
    pretty_exceptions_enable=False,
)
log = logging.getLogger("esa_core")
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # transformers' GGUF dequantiser draws a bare tqdm bar that its logging switch misses;
        # tqdm reads this when first imported (ESA's own bars ask for themselves explicitly)
        os.environ.setdefault("TQDM_DISABLE", "1")


def _last_words(exc: BaseException) -> str:
    """The notes a stopped run attached (e.g. how much disk its checkpoints hold), as a suffix."""
    return "".join(f" {note}" for note in getattr(exc, "__notes__", ()))


def _fail(message: str, verbose: bool, code: int = EXIT_USAGE) -> NoReturn:
    if verbose:
        traceback.print_exc()
    typer.echo(f"Error: {message}{_last_words(sys.exc_info()[1])}", err=True)
    raise typer.Exit(code)


@contextmanager
def _guard(verbose: bool) -> Iterator[None]:
    """Every failure is one line: the user's to fix (EsaError, a full or read-only disk) exits 2;
    anything else exits 1, naming the stage, the plugin that raised and error.log, which holds
    the traceback."""
    try:
        yield
    except EsaError as exc:
        _fail(str(exc), verbose)
    except Exception as exc:
        known = write_failure(exc)
        if known is not None:
            _fail(str(known), verbose)
        from esa_core import pipeline, unexpected

        modules = {e.cls.__module__: f"{e.kind} '{e.name}'"
                   for e in pipeline.default_registry().entries if e.cls is not None}
        line = unexpected.one_line(exc, unexpected.write_log(exc),
                                   unexpected.plugin_of(exc, modules))
        _fail(line, verbose, EXIT_FAILURE)


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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final line (and "
                               "errors): no progress, criteria or top weights."),
    out_dir: str | None = typer.Option(
        None, help="Result folder. Default: outputs/esa/<model>/<metric>_<mode>_k<topk>."),
    perturb: str | None = typer.Option(None, help="Perturb the top-k: sign_flip, "
                                          "gauss_noise, bit_flip, zero, ...; several, "
                                          "comma-separated, are each tested (robustness)."),
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
    batch_size: int | None = typer.Option(None, help="Blocks per forward/backward pass. "
                                          "Default: 4 on a GPU, 1 on a CPU."),
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
    checkpoint: str = typer.Option(
        "auto", help="Save the seeds' running score sum for --resume: always, never, or auto "
        "(only when writing it is quick next to scoring a seed)."),
    evaluator: str = typer.Option("perplexity", help="Evaluators measuring each perturbed "
                                  "model, comma-separated; the first one's first measure is "
                                  "judged by the criteria."),
    ablate_top: int = typer.Option(0, help="Zero each of the N top-ranked weights alone, "
                                   "measure, restore: ablation.csv."),
    critical_ratio: float = typer.Option(2.0, help="A weight is critical when removing it "
                                         "alone multiplies perplexity (the primary measure) "
                                         "by at least this."),
    ablate_eval_samples: int | None = typer.Option(
        None, help="Held-out blocks per ablation. Default: 8 on a CPU, 64 on a GPU."),
) -> None:
    """Profile weight sensitivity, select the top-k, and write a result folder."""
    _setup_logging(verbose, quiet)
    from esa_core import distributed, pipeline, progress
    from esa_core.config import RunConfig, parse_list, parse_metric_args
    from esa_core.guards import terminate_as_interrupt

    try:
        with _guard(verbose), terminate_as_interrupt(), progress.shown(not quiet):
            config = RunConfig(
                model=model, metric=metric, mode=mode, topk=topk, max_samples=max_samples,
                seeds=seeds, stability_check=stability_check, dtype=dtype, save_plots=save_plots,
                verbose=verbose, out_dir=out_dir, perturb=perturb, perturb_scale=perturb_scale,
                perturb_prob=perturb_prob,
                perturb_args=parse_metric_args(perturb_arg, "--perturb-arg"),
                eval_tasks=parse_list(eval_task), eval_limit=eval_limit,
                controls=parse_list(controls),
                control_repeats=control_repeats, dataset=dataset,
                seq_len=seq_len, batch_size=batch_size, device=device, device_map=device_map,
                eval_samples=eval_samples, overwrite=overwrite, resume=resume,
                trust_remote_code=trust_remote_code, adapter=adapter,
                include=parse_list(include), exclude=parse_list(exclude),
                metric_args=parse_metric_args(metric_arg), accum_dtype=accum_dtype,
                gradient_checkpointing=gradient_checkpointing, checkpoint=checkpoint,
                evaluator=parse_list(evaluator), ablate_top=ablate_top,
                critical_ratio=critical_ratio, ablate_eval_samples=ablate_eval_samples,
            )
            result = pipeline.run(config, argv=["esa", *sys.argv[1:]])
    except KeyboardInterrupt as exc:
        typer.echo("Interrupted: the result folder's manifest says which stage completed; "
                   f"run the same command with --resume to continue.{_last_words(exc)}",
                   err=True)
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None
    if distributed.is_main():
        if not quiet:
            from esa_core.criteria import table
            from esa_core.layout import CONTROL_ANALYSIS, read_json
            from esa_core.report import change_lines, findings

            typer.echo(table(result.manifest["success_criteria"]))
            control = result.out_dir / CONTROL_ANALYSIS
            for line in change_lines(read_json(control) if control.is_file() else None):
                typer.echo(line)
            for line in findings(result.manifest, result.stats):
                typer.echo(line)
            typer.echo(top_weights_text(result.out_dir / "top_weights.csv"))
        typer.echo(f"Results written to {result.out_dir}; the report is "
                   f"{result.out_dir / 'report.html'}")


def top_weights_text(csv_path: Path, count: int = 5) -> str:
    """The answer at a glance: the first rows of top_weights.csv as a small table."""
    import csv

    with csv_path.open(encoding="utf-8") as f:
        rows = [row for _, row in zip(range(count), csv.DictReader(f))]
    cells = [("rank", "param", "row", "col", "score", "weight")] + [
        (r["rank"], r["param"] + (f"[expert {r['expert']}]" if r["expert"] else ""),
         r["row"], r["col"], f"{float(r['score']):.4g}", f"{float(r['weight']):.4g}")
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return f"\nTop {len(rows)} weights (all in {csv_path.name}):\n" + "\n".join(lines)


@app.command("report")
def report_command(
    run_dir: str = typer.Argument(..., help="A result folder written by `esa run`."),
    save_plots: bool = typer.Option(True, "--save-plots/--no-save-plots",
                                    help="Also (re)write the figures to plots/."),
) -> None:
    """Redraw the figures and report.html of a result folder, without loading the model."""
    _setup_logging(False)
    from esa_core import report

    with _guard(False):
        path = report.build(run_dir, save_plots=save_plots)
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

    with _guard(verbose):
        result = write_comparison(run_dirs, out, overwrite)
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
