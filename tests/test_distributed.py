"""The watch in 2-process torchrun jobs (gloo on CPU) against one process on the global batch."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stabiliscope.watch import Watch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(mode: str, out: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(WORKER), "--mode", mode, "--out", str(out),
    ]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def single_process_arrays() -> dict[str, np.ndarray]:
    """Train the same model in one process: each step accumulates the two ranks' halves as micro-batches."""
    model = worker.build_reference_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    half = worker.GLOBAL_BATCH // 2
    with Watch(model, optimizer) as w:
        for x, y in worker.global_batches():
            losses = []
            for rows in (slice(0, half), slice(half, None)):
                _, loss = model(x[rows], y[rows])
                (loss / 2).backward()
                losses.append(loss.detach())
            optimizer.step()
            w.step(torch.stack(losses).mean())
            optimizer.zero_grad()
        return w.arrays()


@pytest.fixture(scope="module")
def reference():
    return single_process_arrays()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(mode, reference, tmp_path):
    run_torchrun(mode, tmp_path)
    distributed = dict(np.load(tmp_path / "arrays.npz"))

    assert set(distributed) == set(reference)
    assert distributed["step"].tolist() == [0, 1, 2]
    for name, expected in reference.items():
        if name == "step" or name.startswith("spike"):
            continue
        got = distributed[name]
        finite = np.isfinite(expected)
        assert np.array_equal(finite, np.isfinite(got)), name
        scale = np.maximum(np.abs(expected[finite]), 1e-12)
        error = np.max(np.abs(got[finite] - expected[finite]) / scale) if finite.any() else 0.0
        tolerance = 1e-5 if name.startswith(("grad/", "loss", "update/")) else 1e-4
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def test_torchrun_only_rank_zero_writes(tmp_path):
    run_torchrun("ddp", tmp_path)
    assert (tmp_path / "rank0" / "store.sqlite").is_file()
    assert any((tmp_path / "rank0" / "tb").iterdir())
    assert not (tmp_path / "rank1").exists()


def test_grad_norms_cover_every_parameter(reference):
    # The per-role norms of the last step square-sum to at most the total.
    roles = [name for name in reference if name.startswith("grad/attn.") or name.startswith("grad/mlp.")]
    role_sq = sum(float(np.sum(reference[name][-1] ** 2)) for name in roles)
    assert role_sq <= reference["grad/total"][-1] ** 2 * (1 + 1e-6)
    assert math.isfinite(reference["grad/total"][-1])
