"""The README's main command: the default sweep on the built-in corpus, end to end."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "stabiliscope", *args], capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "sweep"
    result = run_cli("sweep", "--out", str(out))
    return out, result


def test_default_sweep_exit_code(default_sweep):
    _, result = default_sweep
    assert result.returncode == 0, result.stderr


def test_default_sweep_summary_rows(default_sweep):
    out, _ = default_sweep
    report = run_cli("report", str(out), "--format", "json")
    rows = json.loads(report.stdout)
    assert sorted((row["strategy"], row["depth"]) for row in rows) == sorted(
        (norm, depth) for norm in ("pre", "post", "hybrid") for depth in (2, 4, 8, 16)
    )


def test_default_sweep_profiles_have_one_value_per_layer(default_sweep):
    out, _ = default_sweep
    rows = json.loads(run_cli("report", str(out), "--format", "json").stdout)
    for row in rows:
        assert len(row["init_profile"]) == row["depth"], row["strategy"]
        assert len(row["final_profile"]) == row["depth"], row["strategy"]


def test_default_sweep_rerun_trains_nothing(default_sweep):
    out, _ = default_sweep
    rerun = run_cli("sweep", "--out", str(out))
    assert rerun.returncode == 0
    assert "12 of 12 runs finished in an earlier invocation" in rerun.stdout + rerun.stderr
