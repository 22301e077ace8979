"""The scripts under examples/ run as a user would run them."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_plain_loop_example_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), "--steps", "3", "--depth", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "grad/mlp.out by layer, last step:" in result.stdout


def run_example(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_hf_llama_example_runs():
    pytest.importorskip("transformers")
    result = run_example("hf_llama.py", "--steps", "3", "--depth", "2")
    assert result.returncode == 0, result.stderr
    profile = result.stdout.split("grad/mlp.out by layer, last step:")[-1].split()
    assert len(profile) == 2, result.stdout


def test_lightning_example_runs(tmp_path):
    pytest.importorskip("lightning")
    result = run_example("lightning_loop.py", "--steps", "3", "--depth", "2", "--accumulate", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "optimizer steps recorded: 3" in result.stdout
    assert "grad/mlp.out by layer, last step:" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the example wrote files into the working directory"


def test_torchrun_fsdp_example_runs(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
        str(EXAMPLES / "torchrun_fsdp.py"), "--steps", "3", "--depth", "2", "--log-dir", str(tmp_path / "tb"),
    ]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ranks: 2" in result.stdout
    profile = result.stdout.split("grad/mlp.out by layer, last step:")[-1].split()
    assert len(profile) == 2, result.stdout
    assert any((tmp_path / "tb").iterdir())
