"""`stabiliscope dashboard` as a user runs it: a real process serving a sweep folder on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stabiliscope.sinks.tensorboard import TensorBoardSink
from stabiliscope.watch.records import StepRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 1500

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> object:
    with _OPENER.open(url, timeout=30) as response:
        return json.loads(response.read())


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, below the ephemeral range.

    A port from bind(0) comes from the kernel's ephemeral range (32768-60999
    by default on Linux), where an outgoing connection can take it before
    TensorBoard binds it.
    """
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found in 20000-32767")


def _responds(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def sweep_folder(tmp_path: Path) -> Path:
    """A sweep folder with one run of `STEPS` steps and a one-step loss spike at step 1000."""
    records = [
        StepRecord(step, {"loss": 50.0 if step == 1000 else 2.0}, {"grad/mlp.out": [1.0, 2.0]})
        for step in range(STEPS)
    ]
    sink = TensorBoardSink(tmp_path / "sweep" / "tb" / "pre-L02-s0", heatmap_metrics=())
    sink.write(records, [])
    sink.close()
    return tmp_path / "sweep"


def test_dashboard_serves_every_point(sweep_folder: Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "stabiliscope", "dashboard", str(sweep_folder), "--port", str(port)]
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any("Depth profiles and layouts" in line for line in lines):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.25)

        query = urllib.parse.urlencode({"run": "pre-L02-s0", "tag": "loss"})
        points: list = []
        while time.monotonic() < deadline and len(points) < STEPS:
            try:
                points = _get(url + "data/plugin/scalars/scalars?" + query)
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
        reader.join(timeout=10)

    assert f"TensorBoard serves {sweep_folder / 'tb'} at {url} (Ctrl-C to stop)\n" in lines
    assert f"Depth profiles and layouts: {url}#custom_scalars&_smoothingWeight=0\n" in lines
    assert len(points) == STEPS
    assert points[1000][2] == 50.0
    assert returncode == 0
    assert not _responds(url + "data/runs")
