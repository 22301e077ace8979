"""Crash safety: real sweeps killed with SIGKILL or stopped with Ctrl-C, then rerun.

Each test starts `python -m stabiliscope sweep` as a subprocess on a grid of
4 tiny runs, stops it at a chosen point (observed by polling its store),
and reruns the same command. After the rerun every run must be finished
exactly once: runs finished before the kill keep their rows and their
TensorBoard files byte for byte, and the store passes PRAGMA integrity_check.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from stabiliscope.errors import ConfigError
from stabiliscope.experiments.locking import StoreLock
from stabiliscope.sinks.store import EventRow, RunStore
from sweep_processes import (
    TINY_GRID,
    TINY_RUN_IDS,
    child_pids,
    finished_runs,
    integrity,
    kill_group,
    process_alive,
    query,
    read_log,
    run_cli,
    run_states,
    start_cli,
    steps_recorded,
    tb_files,
    wait_until,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sends POSIX signals")

STEPS = 40


def _sweep_args(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["sweep", *TINY_GRID, "--steps", str(steps), "--out", str(out), *extra]


def _finished_snapshot(out: Path) -> dict[str, tuple]:
    """Rows and TensorBoard files of the finished runs, to compare after a rerun."""
    states = run_states(out / "store.sqlite")
    return {
        run_id: (states[run_id], tb_files(out, run_id))
        for run_id in finished_runs(out / "store.sqlite")
    }


def _assert_complete(out: Path, finished_before: dict[str, tuple]) -> None:
    store = out / "store.sqlite"
    states = run_states(store)
    assert sorted(states) == TINY_RUN_IDS
    assert {status for status, _, _ in states.values()} == {"completed"}
    assert integrity(store) == "ok"
    for run_id in TINY_RUN_IDS:
        steps = query(store, "SELECT step FROM metrics WHERE run_id = ? AND metric = 'loss' ORDER BY step", (run_id,))
        assert [step for (step,) in steps] == list(range(STEPS)), run_id
    for run_id, (state, files) in finished_before.items():
        assert states[run_id] == state, f"{run_id} was trained again"
        assert tb_files(out, run_id) == files, f"the TensorBoard files of {run_id} changed"


@pytest.fixture
def start_sweep(tmp_path: Path):
    """Start `stabiliscope` subprocesses whose process groups are killed at teardown."""
    started = []

    def start(args: list[str], name: str):
        process = start_cli(args, tmp_path, name)
        started.append(process)
        return process

    yield start
    for process in started:
        try:
            kill_group(process)
        except ProcessLookupError:
            pass
        process.wait()


def _kill_when(process, condition) -> None:
    wait_until(condition, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def _mid_run(out: Path, min_steps: int = 5):
    return lambda: any(count >= min_steps for count in steps_recorded(out / "store.sqlite").values())


# Store transactions


def test_finish_run_is_one_transaction(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        store.begin_run("pre-L02-s0", {"lr": 0.003}, strategy="pre", depth=2, width=16, seed=0)
        unserializable = EventRow(3, "diverged", detail={"bad": object()})
        with pytest.raises(TypeError):
            store.finish_run(
                "pre-L02-s0",
                status="diverged",
                diverged_step=3,
                final_train_loss=9.0,
                final_val_loss=None,
                spike_count=0,
                wall_time_s=1.0,
                tokens_per_s=1.0,
                events=[EventRow(3, "diverged", metric="loss"), unserializable],
            )
        run = store.get_run("pre-L02-s0")
        events = store.events("pre-L02-s0")
    assert run.status == "running"
    assert events == []


def test_lock_rejects_second_sweep(sweep_dir: Path) -> None:
    store_path = sweep_dir / "store.sqlite"
    with StoreLock(store_path):
        with pytest.raises(ConfigError, match="is in use by another sweep"):
            StoreLock(store_path, wait_s=0.2).acquire()


def test_lock_released_by_killed_holder(sweep_dir: Path, tmp_path: Path) -> None:
    import subprocess

    store_path = sweep_dir / "store.sqlite"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; "
            f"fd = os.open({str(store_path) + '.lock'!r}, os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); "
            f"open({str(ready)!r}, 'w').close(); time.sleep(600)",
        ]
    )
    try:
        wait_until(ready.exists, holder, timeout_s=30)
        with pytest.raises(ConfigError, match="in use"):
            StoreLock(store_path, wait_s=0.2).acquire()
    finally:
        holder.kill()
        holder.wait()
    with StoreLock(store_path, wait_s=5):
        pass


# Killed sweeps


def test_sigkill_mid_run_then_rerun_completes(tmp_path: Path, start_sweep) -> None:
    out = tmp_path / "sweep"
    process = start_sweep(_sweep_args(out), "killed")
    _kill_when(process, _mid_run(out))

    assert integrity(out / "store.sqlite") == "ok"
    finished_before = _finished_snapshot(out)
    assert len(finished_before) < len(TINY_RUN_IDS)

    rerun = run_cli(_sweep_args(out))

    assert rerun.returncode == 0, rerun.stderr
    _assert_complete(out, finished_before)


@pytest.mark.slow
def test_sigkill_at_several_points(tmp_path: Path, start_sweep) -> None:
    out = tmp_path / "sweep"
    store = out / "store.sqlite"
    kill_points = [
        ("mid-run of the first run", _mid_run(out)),
        ("after 1 finished run", lambda: len(finished_runs(store)) >= 1),
        ("after 2 finished runs", lambda: len(finished_runs(store)) >= 2),
        ("mid-run after 2 finished runs", lambda: len(finished_runs(store)) >= 2 and _mid_run(out, 20)()),
    ]
    finished_before: dict[str, tuple] = {}
    for index, (label, condition) in enumerate(kill_points):
        process = start_sweep(_sweep_args(out), f"attempt-{index}")
        _kill_when(process, condition)
        assert integrity(store) == "ok", label
        snapshot = _finished_snapshot(out)
        for run_id, value in finished_before.items():
            assert snapshot[run_id] == value, f"{run_id} changed by the attempt killed {label}"
        finished_before = snapshot

    rerun = run_cli(_sweep_args(out))

    assert rerun.returncode == 0, rerun.stderr
    _assert_complete(out, finished_before)
    report = run_cli(["report", str(out), "--format", "json"])
    assert [row["seeds"] for row in json.loads(report.stdout)] == [[0]] * 4


@pytest.mark.slow
def test_sigkill_stops_workers(tmp_path: Path, start_sweep) -> None:
    out = tmp_path / "sweep"
    process = start_sweep(_sweep_args(out, "--workers", "2"), "killed")
    wait_until(_mid_run(out), process)
    workers = child_pids(process.pid)
    assert len(workers) >= 2

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    wait_until(lambda: not any(process_alive(pid) for pid in workers), timeout_s=30)
    finished_before = _finished_snapshot(out)
    rerun = run_cli(_sweep_args(out, "--workers", "2"))
    assert rerun.returncode == 0, rerun.stderr
    _assert_complete(out, finished_before)


# Ctrl-C


# Worker processes each import torch, which makes the parallel case slow.
@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_ctrl_c_keeps_finished_runs(tmp_path: Path, start_sweep, workers: str) -> None:
    out = tmp_path / "sweep"
    store = out / "store.sqlite"
    process = start_sweep(_sweep_args(out, "--workers", workers, steps=100), "interrupted")
    wait_until(lambda: len(finished_runs(store)) >= 1 and _mid_run(out)(), process)
    workers_before = child_pids(process.pid)

    # A terminal sends SIGINT to the whole foreground process group.
    kill_group(process, signal.SIGINT)
    returncode = process.wait(timeout=600)

    stderr = read_log(tmp_path, "interrupted", "err")
    stdout = read_log(tmp_path, "interrupted", "out")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Repeat the command" in stdout
    # Children of the main process (workers, multiprocessing's resource tracker)
    # finish exiting after it does, as in the SIGKILL test above.
    wait_until(lambda: not any(process_alive(pid) for pid in workers_before), timeout_s=30)
    assert integrity(store) == "ok"
    states = run_states(store)
    unfinished = [run_id for run_id, (status, _, _) in states.items() if status == "running"]
    assert unfinished
    errors = query(store, "SELECT error FROM runs WHERE status = 'running'")
    assert {error for (error,) in errors} == {"interrupted before the last step"}
