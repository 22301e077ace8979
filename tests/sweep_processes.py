"""Helpers for tests that run `stabiliscope` in real subprocesses and read their stores.

The subprocesses import the package from this checkout (through PYTHONPATH),
so they test the same code as the in-process tests, whatever is installed.
Stores are read with plain sqlite3, independently of the code under test.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import stabiliscope

SOURCE_ROOT = Path(stabiliscope.__file__).resolve().parents[1]

# A grid of 4 short runs (2 strategies x depths 2 and 3) on tiny models.
TINY_GRID = [
    "--norms",
    "pre,post",
    "--depths",
    "2,3",
    "--width",
    "16",
    "--heads",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--warmup",
    "1",
]
TINY_RUN_IDS = ["post-L02-s0", "post-L03-s0", "pre-L02-s0", "pre-L03-s0"]


def cli_env() -> dict[str, str]:
    """Return the environment for a `python -m stabiliscope` subprocess of this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stabiliscope", *args]


def start_cli(args: Sequence[str], log_dir: Path, name: str) -> subprocess.Popen:
    """Start the CLI in its own process group, with stdout and stderr in files under `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout = (log_dir / f"{name}.out").open("wb")
    stderr = (log_dir / f"{name}.err").open("wb")
    process = subprocess.Popen(
        cli_command(*args),
        env=cli_env(),
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    stdout.close()
    stderr.close()
    return process


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler. A terminal's Ctrl-C is simulated
    # here, so the child gets the default disposition back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_dashboard(process: subprocess.Popen, log_dir: Path, name: str) -> None:
    """Stop a `stabiliscope dashboard` started by `start_cli`, and any TensorBoard child it left.

    The command stops TensorBoard on SIGTERM once it has printed where it
    serves, so the signal waits for that line. Killing the process group
    afterwards removes a child that outlived the command all the same.
    """
    try:
        wait_until(lambda: "Ctrl-C to stop" in read_log(log_dir, name, "out"), process, timeout_s=60)
        time.sleep(0.5)
        process.terminate()
        process.wait(timeout=60)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def run_cli(args: Sequence[str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout_s
    )


def read_log(log_dir: Path, name: str, stream: str) -> str:
    return (log_dir / f"{name}.{stream}").read_text(errors="replace")


# Timeouts are generous: on a busy shared machine, a process under `nice`
# can wait minutes for the CPU before it gets to the point a test waits for.


def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen | None = None, timeout_s: float = 600
) -> None:
    """Poll `condition` every 20 ms; fail when `process` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with status {process.returncode} before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


def kill_group(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to the process group of `process`, as a terminal sends Ctrl-C."""
    os.killpg(process.pid, signum)


def query(store: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    """Run a read-only query on a store file, returning [] for an absent store or one without tables yet."""
    if not store.exists():
        return []
    connection = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return connection.execute(sql, parameters).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise
    finally:
        connection.close()


def run_states(store: Path) -> dict[str, tuple[str, str, str | None]]:
    """Return {run_id: (status, started_at, finished_at)}."""
    rows = query(store, "SELECT run_id, status, started_at, finished_at FROM runs")
    return {run_id: (status, started, finished) for run_id, status, started, finished in rows}


def finished_runs(store: Path) -> set[str]:
    return {run_id for run_id, (status, _, _) in run_states(store).items() if status in ("completed", "diverged")}


def steps_recorded(store: Path) -> dict[str, int]:
    """Return {run_id: number of recorded loss steps} for runs with status `running`."""
    rows = query(
        store,
        "SELECT runs.run_id, COUNT(metrics.step) FROM runs JOIN metrics ON metrics.run_id = runs.run_id "
        "WHERE runs.status = 'running' AND metrics.metric = 'loss' GROUP BY runs.run_id",
    )
    return dict(rows)


def integrity(store: Path) -> str:
    connection = sqlite3.connect(store)
    try:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()


def child_pids(pid: int) -> list[int]:
    """Return the ids of the live processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may contain spaces, so fields are counted after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        state, parent = fields[0], int(fields[1])
        if parent == pid and state != "Z":
            children.append(int(entry.name))
    return children


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def tb_files(out: Path, run_id: str) -> dict[str, bytes]:
    """Return {file name: bytes} of a run's TensorBoard folder."""
    folder = out / "tb" / run_id
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.is_dir() else {}
