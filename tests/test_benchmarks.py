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


def test_overhead_quick_run_has_every_row() -> None:
    result = subprocess.run(
        [
            sys.executable, str(BENCHMARKS / "overhead.py"),
            "--quick", "--only", "reference", "--rounds", "3", "--steps-per-round", "1", "--warmup", "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row[0].removeprefix("| ") for row in rows[1:]]
    assert names[:5] == [
        "bare",
        "bare, second copy",
        "stabiliscope every=1",
        "stabiliscope every=1, update_every=10",
        "stabiliscope every=10",
    ]
    assert "hand-written hooks" in names
    assert rows[0][4] == "95 % interval of the median"
    bare = rows[1]
    assert bare[3] == "1.000"
    assert bare[4] == "1.000-1.000"
    assert "3 rounds of 1 timed step per variant, after 0 untimed warm-up steps" in result.stdout
    assert "with fewer than 6 rounds the 95 % interval cannot be formed" in result.stdout
    assert "--quick measures tiny models for a smoke run" in result.stdout


def test_median_interval_order_statistics() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from overhead import median_interval
    finally:
        sys.path.remove(str(BENCHMARKS))
    # For 20 values, P(Binomial(20, 1/2) <= 5) = 0.0207 and P(<= 6) = 0.0577,
    # so the 95 % interval runs from the 6th smallest to the 6th largest.
    assert median_interval([float(v) for v in range(20, 0, -1)]) == (6.0, 15.0)
    # For 9 values, P(<= 1) = 0.0195 and P(<= 2) = 0.0898, so it runs from the 2nd smallest to the 2nd largest.
    assert median_interval([float(v) for v in range(1, 10)]) == (2.0, 8.0)
    assert median_interval([3.0, 1.0]) == (1.0, 3.0)
