"""A real TensorBoard server over a real sweep folder, checked through its HTTP data API."""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from stabiliscope.experiments.sweep import TB_FOLDER, SweepConfig, run_sweep
from stabiliscope.sinks.tensorboard import TensorBoardServer, TensorBoardSink
from stabiliscope.watch.records import StepRecord

STRATEGIES = ["pre", "post", "hybrid"]
DEPTHS = [2, 3]
STEPS = 6
RUN_IDS = sorted(f"{strategy}-L{depth:02d}-s0" for strategy in STRATEGIES for depth in DEPTHS)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> object:
    with _OPENER.open(url, timeout=120) as response:
        return json.loads(response.read())


def _get_bytes(url: str) -> bytes:
    with _OPENER.open(url, timeout=120) as response:
        return response.read()


def _post(url: str, body: dict) -> object:
    # TensorBoard rejects POST requests without this header (XSRF protection).
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    with _OPENER.open(request, timeout=120) as response:
        return json.loads(response.read())


def _wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; the server loads event files in the background."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except urllib.error.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"condition not met within {timeout_s} s")


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


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A sweep of 3 strategies at depths 2 and 3, and the URL of a TensorBoard serving it."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dashboard") / "sweep"
    config = SweepConfig(
        norms=STRATEGIES,
        depths=DEPTHS,
        width=16,
        heads=2,
        steps=STEPS,
        batch_size=2,
        seq_len=16,
        lr=3e-3,
        warmup=1,
        out=out,
        grad_clip=1.0,
    )
    try:
        outcomes = run_sweep(config)
    finally:
        torch.set_num_threads(previous_threads)
    assert all(outcome.status != "failed" for outcome in outcomes), outcomes

    with TensorBoardServer(out / TB_FOLDER, port=_free_port()) as server:
        server.start(timeout_s=60)
        url = server.url

        def loaded() -> bool:
            tags = _get(url + "data/plugin/scalars/tags")
            return sorted(tags) == RUN_IDS and all("summary/final_loss" in tags[run] for run in RUN_IDS)

        _wait_for(loaded)
        yield out, url


def _query(**params: str) -> str:
    return urllib.parse.urlencode(params)


# Runs and plugins


def test_server_lists_every_run(served_sweep) -> None:
    _, url = served_sweep
    assert sorted(_get(url + "data/runs")) == RUN_IDS


def test_server_no_phantom_runs(served_sweep) -> None:
    out, _ = served_sweep
    # Each run folder contains event files only: no sub-folder that would be another run.
    assert [path for path in (out / TB_FOLDER).rglob("*") if path.is_dir() and path.parent != out / TB_FOLDER] == []


def test_server_plugins_enabled(served_sweep) -> None:
    _, url = served_sweep
    plugins = _get(url + "data/plugins_listing")
    for name in ("scalars", "custom_scalars", "images", "hparams", "text"):
        assert plugins[name]["enabled"], name


# Scalars


def test_server_profile_tags_per_depth(served_sweep) -> None:
    _, url = served_sweep
    tags = _get(url + "data/plugin/scalars/tags")
    assert "profile/L03/grad/mlp.out/init" in tags["hybrid-L03-s0"]
    assert "profile/L03/act/resid_post_rms/final" in tags["pre-L03-s0"]
    assert not any(tag.startswith("profile/L03/") for tag in tags["pre-L02-s0"])


def test_server_profile_milestones(served_sweep) -> None:
    _, url = served_sweep
    tags = _get(url + "data/plugin/scalars/tags")["post-L03-s0"]
    milestones = {tag.rsplit("/", 1)[1] for tag in tags if tag.startswith("profile/L03/grad/mlp.out/")}
    assert milestones == {"init", "10pct", "50pct", "final"}


def test_server_profile_layer_axis(served_sweep) -> None:
    _, url = served_sweep
    points = _get(url + "data/plugin/scalars/scalars?" + _query(run="pre-L03-s0", tag="profile/L03/grad/mlp.out/init"))
    # Each point is [wall time, step, value]; the step is the layer index.
    assert [point[1] for point in points] == [0, 1, 2]
    assert all(point[2] > 0 for point in points)


def test_server_block_series(served_sweep) -> None:
    _, url = served_sweep
    points = _get(url + "data/plugin/scalars/scalars?" + _query(run="hybrid-L02-s0", tag="grad/mlp.out/block_01"))
    assert [point[1] for point in points] == list(range(STEPS))


def test_server_tag_count_bounded(served_sweep) -> None:
    _, url = served_sweep
    tags = _get(url + "data/plugin/scalars/tags")["pre-L03-s0"]
    # 3 globals, 5 x 3 layer series, 2 event series, 14 x 4 x 1 profile tags, 8 summary tags.
    assert len(tags) == 3 + 15 + 2 + 56 + 8


# Custom-scalars layout


def test_server_layout_categories(served_sweep) -> None:
    _, url = served_sweep
    layout = _get(url + "data/plugin/custom_scalars/layout")
    titles = [category["title"] for category in layout["category"]]
    assert titles[0] == "Depth profiles, L=3, at initialization"
    assert titles[3] == "Depth profiles, L=3, at the end of training"
    assert "Depth profiles, L=2, at 50 % of training" in titles
    assert titles[-2:] == ["Training", "Per-layer series, one line per layer"]


def test_server_layout_merged_once(served_sweep) -> None:
    _, url = served_sweep
    # Every run carries the same layout; the plugin merges them without duplicates.
    layout = _get(url + "data/plugin/custom_scalars/layout")
    first = layout["category"][0]["chart"]
    assert len(first) == len({chart["title"] for chart in first})


def _first_chart_regex(url: str) -> str:
    layout = _get(url + "data/plugin/custom_scalars/layout")
    return layout["category"][0]["chart"][0]["multiline"]["tag"][0]


def test_server_layout_chart_overlays_strategies(served_sweep) -> None:
    _, url = served_sweep
    regex = _first_chart_regex(url)
    lines = {}
    for run in RUN_IDS:
        response = _get(url + "data/plugin/custom_scalars/scalars?" + _query(run=run, tag=regex))
        lines[run] = response["tag_to_events"]
    # The depth-3 chart contains one line per depth-3 run and none of the depth-2 runs.
    assert sorted(run for run, payload in lines.items() if payload) == ["hybrid-L03-s0", "post-L03-s0", "pre-L03-s0"]


def test_server_layer_lines_chart(served_sweep) -> None:
    _, url = served_sweep
    response = _get(url + "data/plugin/custom_scalars/scalars?" + _query(run="post-L03-s0", tag=r"^grad/mlp\.out/block_[0-9]+$"))
    assert sorted(response["tag_to_events"]) == [f"grad/mlp.out/block_{b:02d}" for b in range(3)]


# HParams


def _session_groups(url: str) -> dict[str, dict]:
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
    }
    groups = _post(url + "data/plugin/hparams/session_groups", request)["sessionGroups"]
    return {group["name"]: group for group in groups}


def test_server_hparams_names(served_sweep) -> None:
    _, url = served_sweep
    experiment = _post(url + "data/plugin/hparams/experiment", {"experimentName": ""})
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"strategy", "depth", "width", "lr", "init", "seed"} <= names


def test_server_hparams_differ_first(served_sweep) -> None:
    _, url = served_sweep
    experiment = _post(url + "data/plugin/hparams/experiment", {"experimentName": ""})
    differing = [info["name"] for info in experiment["hparamInfos"] if info.get("differs")]
    assert sorted(differing) == ["depth", "strategy"]
    # The dashboard shows the first five as columns, and lists the differing ones first.
    assert [info["name"] for info in experiment["hparamInfos"][:2]] == ["depth", "strategy"]


def test_server_hparams_metrics(served_sweep) -> None:
    _, url = served_sweep
    experiment = _post(url + "data/plugin/hparams/experiment", {"experimentName": ""})
    tags = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {
        "summary/final_loss",
        "summary/diverged",
        "summary/spike_count",
        "summary/grad_last_over_first_final",
        "summary/grad_depth_slope_final",
    } <= tags


def test_server_hparams_one_session_per_run(served_sweep) -> None:
    _, url = served_sweep
    assert sorted(_session_groups(url)) == RUN_IDS


def test_server_hparams_values(served_sweep) -> None:
    _, url = served_sweep
    group = _session_groups(url)["hybrid-L03-s0"]
    metrics = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
    assert group["hparams"]["strategy"] == "hybrid"
    assert group["hparams"]["depth"] == 3
    assert group["hparams"]["init"] == "megatron"
    assert metrics["summary/diverged"] == 0.0
    assert metrics["summary/final_loss"] > 0


# Images and text


def test_server_heatmap_tags(served_sweep) -> None:
    _, url = served_sweep
    tags = _get(url + "data/plugin/images/tags")["pre-L02-s0"]
    assert {"heatmap/grad/mlp.out", "heatmap/act/resid_post_rms", "heatmap/grad/resid_post"} <= set(tags)


def test_server_heatmap_png(served_sweep) -> None:
    _, url = served_sweep
    images = _get(url + "data/plugin/images/images?" + _query(run="pre-L03-s0", tag="heatmap/grad/mlp.out"))
    image = _get_bytes(url + "data/plugin/images/individualImage?" + images[-1]["query"])
    assert images[-1]["step"] == STEPS - 1
    assert image[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_milestone_text(served_sweep) -> None:
    _, url = served_sweep
    entries = _get(url + "data/plugin/text/text?" + _query(run="post-L02-s0", tag="profile/milestones"))
    # Of 6 steps, init and the 10 % milestone are step 0, the 50 % one step 3.
    assert [entry["step"] for entry in entries] == [0, 3, STEPS - 1]
    for name in ("init", "10pct", "50pct", "final"):
        assert f"<code>{name}</code>" in entries[-1]["text"]


# Every point kept


def test_server_keeps_every_point(tmp_path: Path) -> None:
    # TensorBoard's default keeps 1000 random points per tag, which could drop this spike.
    steps = 2500
    records = [
        StepRecord(step, {"loss": 100.0 if step == 1234 else 1.0}, {"grad/mlp.out": [1.0, 2.0]})
        for step in range(steps)
    ]
    sink = TensorBoardSink(tmp_path / "tb" / "run", heatmap_metrics=())
    sink.write(records, [])
    sink.close()

    with TensorBoardServer(tmp_path / "tb", port=_free_port()) as server:
        server.start(timeout_s=60)
        query = _query(run="run", tag="loss")
        _wait_for(lambda: len(_get(server.url + "data/plugin/scalars/scalars?" + query)) == steps)
        points = _get(server.url + "data/plugin/scalars/scalars?" + query)

    assert [point[1] for point in points] == list(range(steps))
    assert points[1234][2] == 100.0
