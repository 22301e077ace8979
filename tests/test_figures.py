"""Tests for `stabiliscope report --plot` and the figures it draws from a real run store."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from stabiliscope import cli
from stabiliscope.experiments.sweep import SweepConfig, run_sweep
from stabiliscope.figures import run_heatmap, write_sweep_figure
from stabiliscope.sinks.store import RunStore
from stabiliscope.watch.records import StepRecord

REPO_ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("figures") / "sweep"
    config = SweepConfig(
        norms=["pre", "post"],
        depths=[2, 3],
        width=16,
        heads=2,
        steps=4,
        batch_size=2,
        seq_len=16,
        lr=3e-3,
        warmup=1,
        out=out,
    )
    try:
        run_sweep(config)
    finally:
        torch.set_num_threads(previous_threads)
    return out


# The figure


def test_figure_png(sweep_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "figure.png"
    with RunStore.open(sweep_folder) as store:
        write_sweep_figure(store, path)
    image = Image.open(path)
    # 11 inches wide at 150 dpi; two profile rows and the heatmaps below.
    assert image.format == "PNG"
    assert image.width == 1650
    assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 50


def test_figure_pdf(sweep_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "figure.PDF"
    with RunStore.open(sweep_folder) as store:
        write_sweep_figure(store, path)
    assert path.read_bytes()[:5] == b"%PDF-"


def test_run_heatmap_reads_store(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.begin_run("pre-L02-s0", {}, strategy="pre", depth=2, width=8, seed=0)
        records = [
            StepRecord(step, {"loss": 1.0}, {"grad/mlp.out": [0.5 * (step + 1), math.nan if step == 2 else 2.0]})
            for step in range(3)
        ]
        store.write_records("pre-L02-s0", records)
        data = run_heatmap(store, "pre-L02-s0", "grad/mlp.out", depth=2)
    assert data.starts.tolist() == [0, 1, 2]
    assert data.values[:, 0].tolist() == [0.5, 1.0, 1.5]
    assert data.nonfinite[:, 1].tolist() == [False, False, True]


def test_run_heatmap_bins_long_runs(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.begin_run("pre-L01-s0", {}, strategy="pre", depth=1, width=8, seed=0)
        store.write_records("pre-L01-s0", [StepRecord(step, {}, {"grad/mlp.out": [float(step)]}) for step in range(10)])
        data = run_heatmap(store, "pre-L01-s0", "grad/mlp.out", depth=1, max_columns=4)
    # 10 steps in at most 4 bins: bins of 4 steps, each holding its max.
    assert data.bin_steps == 4
    assert data.values[:, 0].tolist() == [3.0, 7.0, 9.0]


# The command


def test_report_plot_writes_png(sweep_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "sweep.png"
    result = _invoke("report", str(sweep_folder), "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert Image.open(path).format == "PNG"
    assert f"Figures: {path}" in result.stderr


def test_report_plot_keeps_json_clean(sweep_folder: Path, tmp_path: Path) -> None:
    import json

    result = _invoke("report", str(sweep_folder), "--format", "json", "--plot", str(tmp_path / "sweep.pdf"))
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("figure.svg", "has an unsupported extension; expected one of: .png, .pdf"),
        ("figure", "has an unsupported extension; expected one of: .png, .pdf"),
        ("missing/figure.png", "does not exist; create it first"),
    ],
)
def test_report_plot_bad_path(sweep_folder: Path, tmp_path: Path, name: str, message: str) -> None:
    result = _invoke("report", str(sweep_folder), "--plot", str(tmp_path / name))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2
    assert len(lines) == 1
    assert message in lines[0]


def test_report_plot_folder_rejected(sweep_folder: Path, tmp_path: Path) -> None:
    result = _invoke("report", str(sweep_folder), "--plot", str(tmp_path))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_report_plot_empty_store(tmp_path: Path) -> None:
    RunStore.open(tmp_path).close()
    result = _invoke("report", str(tmp_path), "--plot", str(tmp_path / "figure.png"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2
    assert lines == [f"Error: '{tmp_path / 'store.sqlite'}' has no finished run with a grad/mlp.out depth profile to plot"]


def test_report_plot_without_matplotlib(sweep_folder: Path, tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from stabiliscope.cli import main; "
        f"main(['report', {str(sweep_folder)!r}, '--plot', {str(tmp_path / 'figure.png')!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --plot needs matplotlib, which is not installed; install it with: pip install 'matplotlib>=3.7'"
    ]
    assert not (tmp_path / "figure.png").exists()
