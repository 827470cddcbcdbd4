"""report.html and `esa report`: rebuilt from a result folder alone, readable in a real browser."""

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from esa_core import loading, pipeline, report
from esa_core.cli import app
from esa_core.layout import FIGURES, read_json

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to find or load a model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("esa report must not load a model")

    for name in ("resolve", "load_config"):
        monkeypatch.setattr(loading, name, refuse)


def test_esa_report_rebuilds_plots_and_page_without_a_model(full_result, tmp_path, no_model):
    folder = shutil.copytree(full_result, tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (folder / "plots").iterdir()) == sorted(FIGURES)
    page = (folder / "report.html").read_text(encoding="utf-8")
    manifest = read_json(folder / "experiment_manifest.json")
    assert page.count("src='data:image/png;base64,") == len(FIGURES)
    assert shlex.join(manifest["argv"]) in page
    assert "<td class='PASS'>PASS</td>" in page and "<td class='FAIL'>FAIL</td>" in page
    assert "plots_s" in page and manifest["model"]["id"] in page
    top = page[page.index("<h2>Top 20 weights"):page.index("<h2>Figures")]
    assert top.count("<tr>") == 1 + 20
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing fetched from a network


def test_esa_report_on_a_folder_that_is_not_a_result_folder(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path} is not an ESA result folder (it has no experiment_manifest.json)."]


def test_a_run_writes_report_always_and_figures_with_save_plots(tiny_llama_dir, tmp_path):
    settings = dict(model=str(tiny_llama_dir), topk=5, max_samples=2, seq_len=16,
                    eval_samples=2)
    plotted = pipeline.run(out_dir=str(tmp_path / "plotted"), save_plots=True, **settings)
    assert plotted.manifest["timings"]["plots_s"] >= 0
    assert sorted(p.name for p in (plotted.out_dir / "plots").iterdir()) == [
        "sensitivity_heatmap.png", "weight_distribution.png"]
    page = (plotted.out_dir / "report.html").read_text(encoding="utf-8")
    assert "stability_summary.json is missing" in page
    # `esa report` draws the very same figures from the folder as the run's plots stage did
    drawn = {p.name: p.read_bytes() for p in (plotted.out_dir / "plots").iterdir()}
    assert CliRunner().invoke(app, ["report", str(plotted.out_dir)]).exit_code == 0
    assert {p.name: p.read_bytes() for p in (plotted.out_dir / "plots").iterdir()} == drawn

    plain = pipeline.run(out_dir=str(tmp_path / "plain"), **settings)
    assert not (plain.out_dir / "plots").exists()
    assert (plain.out_dir / "report.html").is_file()


@pytest.mark.skipif(BROWSER is None, reason="no chromium installed (Debian: apt-get install "
                    "chromium); the report's browser rendering is not checked")
def test_report_renders_in_headless_chromium(full_result, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    page = report.build(shutil.copytree(full_result, tmp_path / "run"), save_plots=False)
    done = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    # the page's console (blocked fetches, script or CSP errors) logs as ":CONSOLE" lines
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2000, 1280)
    assert image[..., :3].std() > 0.05  # text and tables, not a blank page


def test_the_layout_reads_a_result_folder_without_torch():
    """Plots, report and compare read folders through esa_core.layout, which needs no torch."""
    code = ("import sys, esa_core.layout as layout; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _table(n_rows: int, marked: set[int]) -> dict:
    from esa_core.api import Column, Findings

    rows = [{"name": f"m{i}", "value": i / 3, "empty": None, "hot": i in marked}
            for i in range(n_rows)]
    return Findings("hot_spots", "Hot spots", (Column("name"), Column("value"), Column("empty"),
                                               Column("hot", "above the line")),
                    rows, note="the rule", mark="hot", facts={"line": 0.5}).stored("m")


def test_findings_tables_print_their_marked_rows_under_their_columns():
    stats = {"findings": {"hot_spots": _table(30, set(range(2, 27)))}}
    lines = report.findings({}, stats)
    assert lines[0] == "Hot spots (line 0.5): 25 of 30 row(s) with hot"
    assert lines[1].split() == ["name", "value", "empty"]
    assert lines[2].split() == ["m2", f"{2 / 3:.4g}", "-"]
    assert len(lines) == 2 + report.TERMINAL_ROWS + 1
    assert lines[-1] == "  ... 5 more in sensitivity_stats.json"
    unmarked = {"findings": {"hot_spots": _table(3, set())}}
    assert report.findings({}, unmarked) == ["Hot spots (line 0.5): 0 of 3 row(s) with hot"]


def test_a_findings_row_off_its_declared_columns_is_one_line_naming_the_metric():
    from esa_core.api import Column, Findings
    from esa_core.errors import PluginFailure

    table = Findings("t", "T", (Column("a"),), [{"a": 1, "b": 2}])
    with pytest.raises(PluginFailure, match=r"metric 'mine': a row of findings 't' holds "
                                            r"\['a', 'b'\], not the declared columns \['a'\]"):
        table.stored("mine")
    with pytest.raises(PluginFailure, match="marks rows by 'x'"):
        Findings("t", "T", (Column("a"),), [{"a": 1}], mark="x").stored("mine")
    with pytest.raises(PluginFailure, match="one number, string or null each"):
        Findings("t", "T", (Column("a"),), [{"a": [1]}]).stored("mine")
