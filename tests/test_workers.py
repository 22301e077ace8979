"""`--workers N`: runs trained in parallel processes that share one run store.

The worker sweeps spawn real processes, which each import torch, so the
tests share one parallel and one serial sweep of the same grid where they can.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stabiliscope import cli
from stabiliscope.errors import ConfigError
from stabiliscope.experiments.sweep import RunOutcome, SweepConfig, SweepReporter, run_sweep
from stabiliscope.sinks.store import RunStore
from sweep_processes import child_pids, integrity

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GRID = {
    "norms": ["pre", "post"],
    "depths": [2, 3],
    "width": 16,
    "heads": 2,
    "steps": 4,
    "batch_size": 2,
    "seq_len": 16,
    "lr": 3e-3,
    "warmup": 1,
    "grad_clip": 1.0,  # the CLI's default, so CLI and library sweeps train the same runs
}
RUN_IDS = ["pre-L02-s0", "post-L02-s0", "pre-L03-s0", "post-L03-s0"]
CLI_GRID = [
    "--norms",
    "pre,post",
    "--depths",
    "2,3",
    "--width",
    "16",
    "--heads",
    "2",
    "--steps",
    "4",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--warmup",
    "1",
]


class RecordingReporter(SweepReporter):
    def __init__(self) -> None:
        self.started: list[str] = []
        self.steps: dict[str, list[int]] = {}
        self.finished: list[RunOutcome] = []

    def run_started(self, run_id: str, steps: int) -> None:
        self.started.append(run_id)

    def run_progress(self, run_id: str, step: int, loss: float) -> None:
        self.steps.setdefault(run_id, []).append(step)

    def run_finished(self, outcome: RunOutcome) -> None:
        self.finished.append(outcome)


def _all_metrics(store_path: Path) -> list[tuple]:
    with sqlite3.connect(store_path) as connection:
        return connection.execute(
            "SELECT run_id, metric, step, block, value FROM metrics ORDER BY run_id, metric, step, block"
        ).fetchall()


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("workers") / "parallel"
    result = CliRunner().invoke(cli.main, ["sweep", *CLI_GRID, "--workers", "2", "--out", str(out)])
    return out, result


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RunOutcome]]:
    out = tmp_path_factory.mktemp("workers") / "serial"
    outcomes = run_sweep(SweepConfig(**GRID, out=out), workers=1, threads_per_worker=1)
    return out, outcomes


def test_workers_cli_exit_code(parallel_sweep) -> None:
    _, result = parallel_sweep
    assert result.exit_code == 0, result.output


def test_workers_cli_prints_every_run(parallel_sweep) -> None:
    _, result = parallel_sweep
    for run_id in RUN_IDS:
        assert f"{run_id} completed" in result.stdout


def test_workers_share_one_store(parallel_sweep) -> None:
    out, _ = parallel_sweep
    assert sorted(path.name for path in out.glob("store*.sqlite")) == ["store.sqlite"]
    with RunStore(out / "store.sqlite", read_only=True) as store:
        assert {run.run_id: run.status for run in store.list_runs()} == dict.fromkeys(RUN_IDS, "completed")


def test_workers_store_integrity(parallel_sweep) -> None:
    out, _ = parallel_sweep
    assert integrity(out / "store.sqlite") == "ok"


def test_workers_tensorboard_folder_per_run(parallel_sweep) -> None:
    out, _ = parallel_sweep
    assert sorted(path.name for path in (out / "tb").iterdir()) == sorted(RUN_IDS)


def test_workers_match_serial_metrics(parallel_sweep, serial_sweep) -> None:
    parallel_out, _ = parallel_sweep
    serial_out, _ = serial_sweep
    parallel = _all_metrics(parallel_out / "store.sqlite")
    assert len(parallel) > 0
    assert parallel == _all_metrics(serial_out / "store.sqlite")


def test_workers_match_serial_losses(parallel_sweep, serial_sweep) -> None:
    parallel_out, _ = parallel_sweep
    serial_out, _ = serial_sweep
    with RunStore(parallel_out / "store.sqlite", read_only=True) as parallel, RunStore(
        serial_out / "store.sqlite", read_only=True
    ) as serial:
        for run_id in RUN_IDS:
            assert parallel.get_run(run_id).final_val_loss == serial.get_run(run_id).final_val_loss


def test_workers_rerun_skips_finished(parallel_sweep) -> None:
    out, _ = parallel_sweep
    reporter = RecordingReporter()
    outcomes = run_sweep(SweepConfig(**GRID, out=out), reporter, workers=2)
    assert [outcome.run_id for outcome in outcomes] == RUN_IDS
    assert all(outcome.skipped for outcome in outcomes)
    assert reporter.started == []


@pytest.mark.parametrize(
    ("workers", "threads", "message"),
    [
        (0, None, "workers (--workers) must be a positive integer, got 0"),
        (-1, None, "workers (--workers) must be a positive integer, got -1"),
        (2, 0, "threads_per_worker (--threads-per-worker) must be a positive integer, got 0"),
    ],
)
def test_invalid_worker_counts_rejected(tmp_path: Path, workers: int, threads: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_sweep(SweepConfig(**GRID, out=tmp_path / "sweep"), workers=workers, threads_per_worker=threads)
    assert not (tmp_path / "sweep").exists()


class WorkerPids(logging.Handler):
    """Collects which worker process trains which run, from the sweep's debug log."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.pid_of: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = re.fullmatch(r"worker \d+ \(pid (\d+)\) started run (\S+)", record.getMessage())
        if match:
            self.pid_of[match[2]] = int(match[1])


class KillingReporter(RecordingReporter):
    """Kills, with SIGKILL, the worker that trains `target` once the run reports step 1."""

    def __init__(self, pids: WorkerPids, target: str) -> None:
        super().__init__()
        self.pids = pids
        self.target = target
        self.killed_pid: int | None = None

    def run_progress(self, run_id: str, step: int, loss: float) -> None:
        super().run_progress(run_id, step, loss)
        if run_id == self.target and step == 1 and self.killed_pid is None:
            self.killed_pid = self.pids.pid_of[run_id]
            assert self.killed_pid in child_pids(os.getpid())
            os.kill(self.killed_pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="lists child processes through /proc")
def test_killed_worker_fails_its_run_only(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    config = SweepConfig(**{**GRID, "steps": 60}, out=out)
    pids = WorkerPids()
    workers_logger = logging.getLogger("stabiliscope.experiments.workers")
    previous_level = workers_logger.level
    workers_logger.addHandler(pids)
    workers_logger.setLevel(logging.DEBUG)
    reporter = KillingReporter(pids, target="post-L02-s0")
    try:
        outcomes = run_sweep(config, reporter, workers=2)
    finally:
        workers_logger.removeHandler(pids)
        workers_logger.setLevel(previous_level)

    assert reporter.killed_pid is not None
    statuses = {outcome.run_id: outcome.status for outcome in outcomes}
    assert statuses == {"pre-L02-s0": "completed", "post-L02-s0": "failed", "pre-L03-s0": "completed", "post-L03-s0": "completed"}
    failed = next(outcome for outcome in outcomes if outcome.status == "failed")
    assert f"(pid {reporter.killed_pid}) exited with status -9 during the run" in failed.error
    for outcome in outcomes:
        if outcome.status == "completed":
            assert reporter.steps[outcome.run_id] == list(range(60))

    rerun = run_sweep(config, workers=2)
    assert [outcome.status for outcome in rerun] == ["completed"] * 4
    assert [outcome.skipped for outcome in rerun] == [True, False, True, True]
