"""Smoke runs of the benchmark scripts, so that they keep working as the code changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_watch_phases_prints_table() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "watch_phases.py"), "--steps", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| gradient norms, one batch at the end of backward |" in result.stdout
    assert "| not covered by the parts (hook calls) |" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith(("| part", "| ---"))]
    assert len(rows) == 7
