"""Tests for the TensorBoard sink and server, reading real event files back."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stabiliscope.sinks.tensorboard import TensorBoardServer, TensorBoardSink, block_tag
from stabiliscope.watch.records import SpikeEvent


def _load(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _values(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def _write_run(run_dir: Path, records, spikes=()) -> None:
    sink = TensorBoardSink(run_dir)
    sink.write(records, list(spikes))
    sink.close()


def test_block_tag_pads_two_digits() -> None:
    assert block_tag("grad/mlp.out", 7, depth=8) == "grad/mlp.out/block_07"


def test_block_tag_pads_to_depth() -> None:
    assert block_tag("act/resid_post_rms", 7, depth=128) == "act/resid_post_rms/block_007"


def test_sink_writes_global_scalars(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "loss") == pytest.approx({0: 5.0, 1: 4.9, 2: 4.8})
    assert _values(accumulator, "grad/total")[1] == pytest.approx(1.0)


def test_sink_writes_block_scalars(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=2, depth=4))
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "grad/mlp.out/block_03") == pytest.approx({0: 4.0, 1: 0.4})
    assert "act/resid_post_rms/block_00" in accumulator.Tags()["scalars"]


def test_sink_writes_init_profile(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    # The TensorBoard step of a profile point is the block index.
    assert _values(accumulator, "profile/init/grad/mlp.out") == pytest.approx(
        {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    )


def test_sink_writes_final_profile(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "profile/final/grad/resid_post") == pytest.approx(
        {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.04}
    )


def test_sink_profiles_span_flushes(tmp_path: Path, make_records) -> None:
    records = make_records(steps=3, depth=2)
    sink = TensorBoardSink(tmp_path / "run")
    for record in records:
        sink.write([record], [])
    sink.close()
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "profile/init/act/resid_post_rms") == pytest.approx({0: 1.0, 1: 2.0})
    assert _values(accumulator, "profile/final/act/resid_post_rms") == pytest.approx({0: 0.01, 1: 0.02})


def test_sink_writes_spike_scalar_and_text(tmp_path: Path, make_records) -> None:
    spike = SpikeEvent(step=2, metric="loss", value=9.5, zscore=11.0, median=4.9)
    _write_run(tmp_path / "run", make_records(steps=3, depth=2), [spike])
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "events/spike") == {2: 1.0}
    text_events = accumulator.Tensors("events/spike_detail/text_summary")
    assert text_events[0].step == 2
    assert b"loss = 9.5" in text_events[0].tensor_proto.string_val[0]


def test_sink_accepts_nonfinite_values(tmp_path: Path, make_records) -> None:
    overrides = {
        (1, "loss", -1): math.nan,
        (1, "grad/mlp.out", 0): math.inf,
        (1, "grad/resid_post", 1): math.nan,
    }
    _write_run(tmp_path / "run", make_records(steps=2, depth=2, overrides=overrides))
    accumulator = _load(tmp_path / "run")
    assert math.isnan(_values(accumulator, "loss")[1])
    assert _values(accumulator, "grad/mlp.out/block_00")[1] == math.inf
    assert math.isnan(_values(accumulator, "profile/final/grad/resid_post")[1])


def test_sink_description_written_as_text(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run", description='{"lr": 0.003}')
    sink.close()
    accumulator = _load(tmp_path / "run")
    assert "run/config/text_summary" in accumulator.Tags()["tensors"]


def test_sink_close_twice_is_harmless(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run")
    sink.write(make_records(steps=1, depth=2), [])
    sink.close()
    sink.close()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_sink_write_after_close_raises(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run")
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(make_records(steps=1, depth=2), [])


def test_server_command_keeps_every_point(tmp_path: Path) -> None:
    command = TensorBoardServer(tmp_path, port=6123).command()
    assert command[command.index("--samples_per_plugin") + 1] == "scalars=0,images=0"
    assert command[command.index("--host") + 1] == "127.0.0.1"


def _get_json(url: str) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.loads(response.read())


def test_server_serves_runs_and_tags(tmp_path: Path, make_records, free_port: int) -> None:
    tb_dir = tmp_path / "tb"
    _write_run(tb_dir / "pre-L02-s0", make_records(steps=2, depth=2))
    _write_run(tb_dir / "post-L02-s0", make_records(steps=2, depth=2))

    with TensorBoardServer(tb_dir, host="127.0.0.1", port=free_port) as server:
        server.start(timeout_s=60)
        process = server.process

        # The server loads event files in the background after it responds.
        deadline = time.monotonic() + 30
        runs: object = []
        while time.monotonic() < deadline:
            runs = _get_json(server.url + "data/runs")
            if len(runs) == 2:
                break
            time.sleep(0.5)
        tags = _get_json(server.url + "data/plugin/scalars/tags")

    assert sorted(runs) == ["post-L02-s0", "pre-L02-s0"]
    assert "profile/init/grad/mlp.out" in tags["pre-L02-s0"]
    assert "grad/mlp.out/block_01" in tags["post-L02-s0"]
    assert process.poll() is not None
