"""The `esa` command line: `esa run`, `esa study`, `esa compare`, `esa report`,
`esa list-plugins`.

Flags of `esa run` match the original guide.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

from esa_core.config import LIST, OPTIONS, PAIRS, SEEDS, RunOption
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
    # a library's warnings (matplotlib, transformers, torch) go to the log: shown with --verbose
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.INFO if verbose else logging.ERROR)
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


def run_command(**values: Any) -> None:
    """Profile weight sensitivity, select the top-k, and write a result folder."""
    _setup_logging(values["verbose"], values["quiet"])
    from esa_core import distributed, pipeline, progress
    from esa_core.config import RunConfig
    from esa_core.guards import terminate_as_interrupt

    try:
        with (_guard(values["verbose"]), terminate_as_interrupt(),
              progress.shown(not values["quiet"])):
            result = pipeline.run(RunConfig(**values), argv=["esa", *sys.argv[1:]])
    except KeyboardInterrupt as exc:
        typer.echo("Interrupted: the result folder's manifest says which stage completed; "
                   f"run the same command with --resume to continue.{_last_words(exc)}",
                   err=True)
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None
    if distributed.is_main():
        if not values["quiet"]:
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


def _cli_parameter(opt: RunOption) -> inspect.Parameter:
    """One `esa run` flag, as Typer reads it from a signature, from the option's declaration."""
    cli_type: Any = {LIST: str, SEEDS: str, PAIRS: list[str]}.get(opt.written, opt.type)
    default = opt.default
    if opt.written in (LIST, SEEDS) and default is not None:
        default = ",".join(map(str, default)) or None
    if opt.written == PAIRS or opt.by_device:
        default = None
    names = [opt.spelling, *([opt.short] if opt.short else [])]  # a switch has no --no-x
    text = opt.help + (f" Default: {opt.describe_default()}." if opt.by_device else "")
    text = text.replace("[", "\\[")  # rich would read `[tasks]` as markup
    shown = default is not None and default is not False
    return inspect.Parameter(
        opt.name, inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(default, *names, help=text, show_default=shown),
        annotation=cli_type if default is not None else cli_type | None)


run_command.__signature__ = inspect.Signature([_cli_parameter(o) for o in OPTIONS])
app.command("run")(run_command)


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


@app.command("study")
def study_command(
    study_file: Path = typer.Argument(..., help="The study: name, [run] options shared by every "
                                      "cell, [grid] lists whose product is the cells."),
    out: Path | None = typer.Option(None, help="Study folder (cells/, study.json, study.html). "
                                    "Default: outputs/esa/studies/<name>."),
    executor: str = typer.Option("local", help="local: cells on this machine; slurm: one "
                                 "Slurm array job through submitit (esa-toolkit[cluster])."),
    jobs: int = typer.Option(1, help="local: run N cells at once, each in its own process."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run again the complete cells "
                                   "whose settings the study file changed."),
    slurm_partition: str | None = typer.Option(None, help="slurm: the partition."),
    slurm_gpus_per_node: int | None = typer.Option(None, help="slurm: GPUs per array task."),
    slurm_time: int | None = typer.Option(None, help="slurm: time limit per task, minutes."),
    slurm_array_parallelism: int | None = typer.Option(
        None, help="slurm: at most N array tasks at once."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each cell's progress."),
) -> None:
    """Run a grid of analyses (models x metrics x datasets ...) and compare them: study.html."""
    _setup_logging(verbose)
    from esa_core.guards import terminate_as_interrupt
    from esa_core.plugins import registry
    from esa_core.study import execute, spec

    try:
        with _guard(verbose), terminate_as_interrupt():
            plugins = registry()
            study = spec.load(study_file, plugins)
            folder = out or Path("outputs") / "esa" / "studies" / study.name
            slurm = {"partition": slurm_partition, "gpus_per_node": slurm_gpus_per_node,
                     "time_min": slurm_time, "array_parallelism": slurm_array_parallelism}
            found = execute.run_study(study, folder, executor=executor, jobs=jobs,
                                      overwrite=overwrite, verbose=verbose, slurm=slurm,
                                      registry=plugins)
    except KeyboardInterrupt as exc:
        typer.echo("Interrupted: run the same command again; complete cells are kept and the "
                   "interrupted ones resume.", err=True)
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None
    for line in found["summary"]:
        typer.echo(line)
    typer.echo(f"Study written to {folder / execute.STUDY_JSON}; the page is "
               f"{folder / 'study.html'}")


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
