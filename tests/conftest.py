"""Shared pytest fixtures."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from stabiliscope.watch.records import StepRecord

BLOCK_METRICS = ("grad/mlp.out", "grad/resid_post", "act/resid_post_rms")


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the duration of a test.

    The tiny models of the sweep tests gain nothing from more threads, and on
    a shared machine with few cores extra threads make them many times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_records() -> Callable[..., list[StepRecord]]:
    """Return a factory of synthetic step records.

    `make_records(steps, depth)` returns one record per step with `loss`,
    `grad/total` and the metrics of BLOCK_METRICS. Block `b` at step `s`
    has the value `(b + 1) * 10 ** -s`, so profiles rise toward the output
    and shrink by 10x per step. `overrides` maps (step, metric, block) to a
    value, with block -1 for a global scalar.
    """

    def factory(
        steps: int,
        depth: int,
        overrides: dict[tuple[int, str, int], float] | None = None,
    ) -> list[StepRecord]:
        overrides = overrides or {}
        records = []
        for step in range(steps):
            scalars = {"loss": 5.0 - 0.1 * step, "grad/total": 2.0 / (step + 1)}
            blocks = {
                metric: [(block + 1) * 10.0**-step for block in range(depth)]
                for metric in BLOCK_METRICS
            }
            for (override_step, metric, block), value in overrides.items():
                if override_step != step:
                    continue
                if block < 0:
                    scalars[metric] = value
                else:
                    blocks[metric][block] = value
            records.append(StepRecord(step=step, scalars=scalars, blocks=blocks))
        return records

    return factory


@pytest.fixture
def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """An empty sweep folder inside pytest's tmp_path."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    return folder
