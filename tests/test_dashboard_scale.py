"""Scale of the TensorBoard output: a depth-64 model logged every step for 5000 steps.

The run is written by the sink directly, without training, with the full set
of per-block metrics a watch records on the reference model. A real
TensorBoard server then lists its tags.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stabiliscope.sinks.tensorboard import TensorBoardServer, TensorBoardSink
from stabiliscope.watch.flush import POSITIONS
from stabiliscope.watch.records import StepRecord

pytestmark = pytest.mark.slow

DEPTH = 64
STEPS = 5000
ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "norm")
TAG_BUDGET = 1000
LISTING_LIMIT_S = 10.0
"""Seconds from starting TensorBoard until it lists every tag of the run."""

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> object:
    with _OPENER.open(url, timeout=60) as response:
        return json.loads(response.read())


def _block_metrics() -> list[str]:
    """The per-block metrics of a watch on the reference model with an optimizer."""
    names = [f"grad/{role}" for role in ROLES] + ["grad/block", "grad/resid_post", "nonfinite/grad_resid_post"]
    for position in POSITIONS:
        names += [f"act/{position}_rms", f"act/{position}_absmax", f"nonfinite/{position}"]
    names += ["attn/logit_max", "attn/entropy"]
    return names + [f"update/{role}" for role in ROLES]


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


@dataclass
class Listing:
    seconds: float
    scalar_tags: list[str]
    image_tags: list[str]
    text_tags: list[str]
    loss_points: int


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listing]:
    tb_dir = tmp_path_factory.mktemp("scale") / "tb"
    names = _block_metrics()
    base = np.random.default_rng(0).uniform(0.5, 1.5, size=(len(names), DEPTH))

    sink = TensorBoardSink(tb_dir / "pre-L64-s0", total_steps=STEPS, hparams={"strategy": "pre", "depth": DEPTH})
    for step in range(STEPS):
        scale = 1.0 / (1.0 + step / 100.0)
        blocks = dict(zip(names, (base * scale).tolist()))
        sink.write([StepRecord(step, {"loss": 5.0 * scale, "grad/total": scale, "lr": 1e-3}, blocks)], [])
    sink.close()

    with TensorBoardServer(tb_dir, port=_free_port()) as server:
        started = time.monotonic()
        server.start(timeout_s=60)

        # Poll until two consecutive listings agree and include the last tags written.
        previous: list[str] | None = None
        while time.monotonic() - started < 120:
            tags = _get(server.url + "data/plugin/scalars/tags").get("pre-L64-s0", {})
            names_now = sorted(tags)
            if names_now and names_now == previous and "summary/final_loss" in tags:
                break
            previous = names_now
            time.sleep(0.25)
        seconds = time.monotonic() - started

        images = _get(server.url + "data/plugin/images/tags").get("pre-L64-s0", {})
        texts = _get(server.url + "data/plugin/text/tags").get("pre-L64-s0", [])
        query = urllib.parse.urlencode({"run": "pre-L64-s0", "tag": "loss"})
        loss_points = len(_get(server.url + "data/plugin/scalars/scalars?" + query))
        yield Listing(seconds, names_now, sorted(images), sorted(texts), loss_points)


def test_scale_tags_under_budget(listing: Listing) -> None:
    # The custom-scalars layout and 3 HParams entries are 4 more tags.
    total = len(listing.scalar_tags) + len(listing.image_tags) + len(listing.text_tags) + 4
    assert total < TAG_BUDGET


def test_scale_every_layer_series(listing: Listing) -> None:
    series = [tag for tag in listing.scalar_tags if tag.startswith("grad/mlp.out/block_")]
    assert len(series) == DEPTH


def test_scale_profiles_at_milestones(listing: Listing) -> None:
    milestones = {tag.rsplit("/", 1)[1] for tag in listing.scalar_tags if tag.startswith("profile/L64/grad/mlp.out/")}
    assert milestones == {"init", "10pct", "50pct", "final"}


def test_scale_listing_time(listing: Listing) -> None:
    print(f"TensorBoard listed {len(listing.scalar_tags)} scalar tags in {listing.seconds:.1f} s")
    assert listing.seconds < LISTING_LIMIT_S


def test_scale_keeps_every_point(listing: Listing) -> None:
    assert listing.loss_points == STEPS
