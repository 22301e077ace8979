"""The README screenshot script, run against real sweeps with headless Chromium.

Skipped where Debian's `chromium` is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from stabiliscope.experiments.sweep import SweepConfig, run_sweep
from stabiliscope.sinks.tensorboard import TensorBoardSink
from stabiliscope.watch.records import StepRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "docs" / "screenshot_dashboard.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian's chromium package is not installed"),
]


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--chromium", CHROMIUM, *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_screenshot_shows_depth_profiles(tmp_path: Path) -> None:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = SweepConfig(
        norms=["pre", "post", "hybrid"],
        depths=[4],
        width=16,
        heads=2,
        steps=6,
        batch_size=2,
        seq_len=16,
        lr=3e-3,
        warmup=1,
        out=tmp_path / "sweep",
    )
    try:
        run_sweep(config)
    finally:
        torch.set_num_threads(previous_threads)

    result = _run_script("--sweep", str(tmp_path / "sweep"), "--out", str(tmp_path / "dashboard.png"))

    # Lines that lie on top of each other show as one colour, so 2 of 3 is enough.
    colours = int(re.search(r"line pixels in (\d+) colours", result.stdout).group(1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert colours >= 2
    assert Image.open(tmp_path / "dashboard.png").size == (1400, 900)


def test_screenshot_fails_without_profiles(tmp_path: Path) -> None:
    # A run without per-block metrics has no depth profiles, so no chart can render.
    sink = TensorBoardSink(tmp_path / "sweep" / "tb" / "run")
    sink.write([StepRecord(step, {"loss": 1.0}) for step in range(3)], [])
    sink.close()

    result = _run_script("--sweep", str(tmp_path / "sweep"), "--out", str(tmp_path / "dashboard.png"), "--timeout", "15")

    assert result.returncode == 1
    assert "no depth-profile chart drew a line within 15 s" in result.stderr


def test_screenshot_rejects_missing_chromium(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--chromium", str(tmp_path / "chromium"), "--sweep", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Chromium not found at" in result.stderr
