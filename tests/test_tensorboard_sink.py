"""Tests for the TensorBoard sink and server, reading real event files back."""

from __future__ import annotations

import io
import json
import math
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from stabiliscope.sinks.heatmap import NONFINITE_RGB
from stabiliscope.sinks.tensorboard import (
    TensorBoardServer,
    TensorBoardSink,
    block_tag,
    depth_slope,
    profile_tag,
    series_blocks,
)
from stabiliscope.watch.records import NonfiniteEvent, SpikeEvent, StepRecord

SIZE_GUIDANCE = {"scalars": 0, "tensors": 0, "images": 0}


def _load(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance=SIZE_GUIDANCE)
    accumulator.Reload()
    return accumulator


def _values(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def _texts(accumulator: EventAccumulator, tag: str) -> dict[int, str]:
    return {event.step: event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(tag)}


def _write_run(run_dir: Path, records, spikes=(), **options) -> None:
    sink = TensorBoardSink(run_dir, **options)
    sink.write(records, list(spikes))
    sink.close()


# Tag names


def test_block_tag_pads_two_digits() -> None:
    assert block_tag("grad/mlp.out", 7, depth=8) == "grad/mlp.out/block_07"


def test_block_tag_pads_to_depth() -> None:
    assert block_tag("act/resid_post_rms", 7, depth=128) == "act/resid_post_rms/block_007"


def test_profile_tag_names_depth() -> None:
    assert profile_tag(16, "grad/mlp.out", "init") == "profile/L16/grad/mlp.out/init"


def test_series_blocks_all_when_within_budget() -> None:
    assert series_blocks(64, 5, 512) == list(range(64))


def test_series_blocks_stride_over_budget() -> None:
    # 512 tags over 5 metrics leave 102 per metric: a stride of ceil(256 / 101) = 3.
    assert series_blocks(256, 5, 512) == list(range(0, 256, 3))


def test_series_blocks_keep_last_block() -> None:
    blocks = series_blocks(200, 5, 512)
    assert blocks[-1] == 199
    assert len(blocks) <= 102


# Scalars against the training step


def test_sink_writes_global_scalars(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "loss") == pytest.approx({0: 5.0, 1: 4.9, 2: 4.8})
    assert _values(accumulator, "grad/total")[1] == pytest.approx(1.0)


def test_sink_writes_block_series(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=2, depth=4))
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "grad/mlp.out/block_03") == pytest.approx({0: 4.0, 1: 0.4})
    assert "act/resid_post_rms/block_00" in accumulator.Tags()["scalars"]


def test_sink_skips_series_of_other_metrics(tmp_path: Path) -> None:
    record = StepRecord(0, {"loss": 1.0}, {"update/mlp.out": [0.1, 0.2], "grad/mlp.out": [1.0, 2.0]})
    _write_run(tmp_path / "run", [record])
    scalar_tags = _load(tmp_path / "run").Tags()["scalars"]
    assert "grad/mlp.out/block_01" in scalar_tags
    assert not any(tag.startswith("update/") for tag in scalar_tags)


def test_sink_series_stride_at_depth(tmp_path: Path) -> None:
    record = StepRecord(0, {"loss": 1.0}, {"grad/mlp.out": [1.0] * 10})
    _write_run(tmp_path / "run", [record], series_metrics=("grad/mlp.out",), max_series_tags=4)
    series = sorted(tag for tag in _load(tmp_path / "run").Tags()["scalars"] if "/block_" in tag)
    # 4 tags allow a stride of ceil(10 / 3) = 4: blocks 0, 4, 8 and the last.
    assert series == [f"grad/mlp.out/block_{b:02d}" for b in (0, 4, 8, 9)]


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
    assert math.isnan(_values(accumulator, "profile/L02/grad/resid_post/final")[1])


# Depth profiles


def test_sink_writes_init_profile(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    # The TensorBoard step of a profile point is the block index.
    assert _values(accumulator, "profile/L04/grad/mlp.out/init") == pytest.approx(
        {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    )


def test_sink_writes_final_profile(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "profile/L04/grad/resid_post/final") == pytest.approx(
        {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.04}
    )


def test_final_profile_skips_closing_record(tmp_path: Path, make_records) -> None:
    records = make_records(steps=3, depth=2)
    last = records[-1]
    grads_only = {name: values for name, values in last.blocks.items() if name.startswith("grad/")}
    closing = StepRecord(step=last.step + 2, scalars=dict(last.scalars), blocks=grads_only)
    _write_run(tmp_path / "run", [*records, closing])
    accumulator = _load(tmp_path / "run")
    # The act profile comes from the last record that has it, step 2.
    assert _values(accumulator, "profile/L02/act/resid_post_rms/final") == pytest.approx({0: 0.01, 1: 0.02})
    assert _values(accumulator, "loss")[4] == pytest.approx(last.scalars["loss"])


def test_sink_profiles_span_flushes(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run")
    for record in make_records(steps=3, depth=2):
        sink.write([record], [])
    sink.close()
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "profile/L02/act/resid_post_rms/init") == pytest.approx({0: 1.0, 1: 2.0})
    assert _values(accumulator, "profile/L02/act/resid_post_rms/final") == pytest.approx({0: 0.01, 1: 0.02})


def test_sink_milestone_profiles(tmp_path: Path, make_records) -> None:
    # 10 % of 10 steps is step 1, 50 % is step 5; block b at step s is (b + 1) * 10**-s.
    _write_run(tmp_path / "run", make_records(steps=10, depth=2), total_steps=10)
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "profile/L02/grad/mlp.out/10pct") == pytest.approx({0: 0.1, 1: 0.2})
    assert _values(accumulator, "profile/L02/grad/mlp.out/50pct") == pytest.approx({0: 1e-5, 1: 2e-5})


def test_sink_milestones_without_total(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=10, depth=2))
    milestones = {tag.rsplit("/", 1)[1] for tag in _load(tmp_path / "run").Tags()["scalars"] if tag.startswith("profile/")}
    assert milestones == {"init", "final"}


def test_sink_milestone_takes_next_record(tmp_path: Path, make_records) -> None:
    # A watch flushing every 4 steps records steps 0, 4 and 8 of 10: the
    # 10 % milestone (step 1) takes step 4, the 50 % one (step 5) step 8.
    records = [record for record in make_records(steps=10, depth=2) if record.step % 4 == 0]
    _write_run(tmp_path / "run", records, total_steps=10)
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "profile/L02/grad/mlp.out/10pct") == pytest.approx({0: 1e-4, 1: 2e-4})
    assert _values(accumulator, "profile/L02/grad/mlp.out/50pct") == pytest.approx({0: 1e-8, 1: 2e-8})


def test_sink_milestone_steps_as_text(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=10, depth=2), total_steps=10)
    texts = _texts(_load(tmp_path / "run"), "profile/milestones")
    # Each entry lists the milestones so far, so that the last one lists them all.
    assert sorted(texts) == [0, 1, 5, 9]
    assert texts[9] == (
        "| depth profile | training step |\n| --- | --- |\n"
        "| `init` | 0 |\n| `10pct` | 1 |\n| `50pct` | 5 |\n| `final` | 9 |"
    )


def test_sink_milestones_share_step(tmp_path: Path, make_records) -> None:
    # With 4 steps, the 10 % milestone is step 0, as is init.
    _write_run(tmp_path / "run", make_records(steps=4, depth=2), total_steps=4)
    texts = _texts(_load(tmp_path / "run"), "profile/milestones")
    assert "| `init` | 0 |\n| `10pct` | 0 |" in texts[0]


# Events


def test_sink_spike_count_steps_up(tmp_path: Path, make_records) -> None:
    spikes = [SpikeEvent(step=2, metric="loss", value=9.5, zscore=11.0, median=4.9)]
    _write_run(tmp_path / "run", make_records(steps=4, depth=2), spikes)
    assert _values(_load(tmp_path / "run"), "events/spike_count") == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}


def test_sink_spikes_one_text_per_step(tmp_path: Path, make_records) -> None:
    spikes = [
        SpikeEvent(step=2, metric="loss", value=9.5, zscore=11.0, median=4.9),
        SpikeEvent(step=2, metric="grad/total", value=30.0, zscore=7.0, median=1.0),
    ]
    _write_run(tmp_path / "run", make_records(steps=3, depth=2), spikes)
    text = _texts(_load(tmp_path / "run"), "events/spikes")[2]
    assert text.split("\n\n") == [
        "loss = 9.5 at step 2 (trailing median 4.9, robust z-score 11)",
        "grad/total = 30 at step 2 (trailing median 1, robust z-score 7)",
    ]


def test_sink_spike_text(tmp_path: Path, make_records) -> None:
    spikes = [SpikeEvent(step=2, metric="loss", value=9.5, zscore=11.0, median=4.9)]
    _write_run(tmp_path / "run", make_records(steps=3, depth=2), spikes)
    assert _texts(_load(tmp_path / "run"), "events/spikes") == {
        2: "loss = 9.5 at step 2 (trailing median 4.9, robust z-score 11)"
    }


def test_sink_nonfinite_count(tmp_path: Path) -> None:
    records = [
        StepRecord(0, {"loss": 2.0, "grad/total": 1.0}, {"nonfinite/resid_post": [0.0, 0.0]}),
        StepRecord(1, {"loss": math.nan, "grad/total": 1.0}, {"nonfinite/resid_post": [0.0, 3.0], "nonfinite/mlp_out": [2.0, 0.0]}),
    ]
    _write_run(tmp_path / "run", records)
    # Step 1: 3 + 2 non-finite elements, plus one for the NaN loss.
    assert _values(_load(tmp_path / "run"), "events/nonfinite_count") == {0: 0.0, 1: 6.0}


def test_sink_first_nonfinite_text(tmp_path: Path) -> None:
    event = NonfiniteEvent(step=1, block=3, position="mlp_out", direction="forward", count=12)
    records = [StepRecord(0, {"loss": 2.0}), StepRecord(1, {"loss": math.inf}, first_nonfinite=event)]
    _write_run(tmp_path / "run", records)
    assert _texts(_load(tmp_path / "run"), "events/first_nonfinite") == {
        1: "first NaN or Inf at step 1, block 3, mlp_out (forward, 12 elements)"
    }


def test_sink_divergence_event(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run")
    sink.write(make_records(steps=5, depth=2), [])
    sink.set_outcome("diverged", diverged_step=4)
    sink.close()
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "events/diverged") == {3: 0.0, 4: 1.0}
    assert _texts(accumulator, "events/divergence") == {4: "diverged at step 4; last recorded loss 4.6"}


def test_sink_outcome_after_close(tmp_path: Path, make_records) -> None:
    # A watch closes its sinks before the trainer has the outcome.
    sink = TensorBoardSink(tmp_path / "run")
    sink.write(make_records(steps=5, depth=2), [])
    sink.close()
    sink.set_outcome("diverged", diverged_step=4, final_val_loss=None)
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "events/diverged") == {3: 0.0, 4: 1.0}
    assert _values(accumulator, "summary/diverged")[4] == 1.0


def test_sink_await_outcome_one_file(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run", await_outcome=True)
    sink.write(make_records(steps=5, depth=2), [])
    sink.close()
    sink.set_outcome("diverged", diverged_step=4)
    accumulator = _load(tmp_path / "run")
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    assert _values(accumulator, "events/diverged") == {3: 0.0, 4: 1.0}
    assert _values(accumulator, "summary/diverged") == {4: 1.0}


def test_sink_await_outcome_second_close(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run", await_outcome=True, hparams={"strategy": "pre"})
    sink.write(make_records(steps=3, depth=2), [])
    sink.close()
    sink.close()
    accumulator = _load(tmp_path / "run")
    assert _values(accumulator, "summary/diverged") == {2: 0.0}
    assert hparams_metadata.SESSION_END_INFO_TAG in accumulator.Tags()["tensors"]


def test_sink_await_outcome_rejects_write(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run", await_outcome=True)
    sink.close()
    with pytest.raises(RuntimeError, match="only set_outcome may follow"):
        sink.write(make_records(steps=1, depth=2), [])
    sink.close()


def test_sink_outcome_rejects_unknown(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown outcome 'crashed'; expected one of: completed, diverged, failed"):
        sink.set_outcome("crashed")
    sink.close()


# HParams metrics


def _summary_values(accumulator: EventAccumulator) -> dict[str, float]:
    return {
        tag: accumulator.Scalars(tag)[-1].value
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith("summary/")
    }


def test_sink_summary_metrics(tmp_path: Path, make_records) -> None:
    spikes = [SpikeEvent(step=1, metric="loss", value=9.0, zscore=8.0, median=5.0)]
    sink = TensorBoardSink(tmp_path / "run")
    sink.write(make_records(steps=3, depth=4), spikes)
    sink.set_outcome("completed", final_val_loss=4.5)
    sink.close()
    values = _summary_values(_load(tmp_path / "run"))

    # grad/mlp.out is [1, 2, 3, 4] * 10**-step, so last/first is 4 at every step.
    # The slope of log10([1, 2, 3, 4]) against [0, 1, 2, 3]: sum((x - 1.5)(y - mean y)) / 5.
    logs = [0.0, 0.30103, 0.47712, 0.60206]
    mean_log = sum(logs) / 4
    slope = sum((x - 1.5) * (y - mean_log) for x, y in zip(range(4), logs)) / 5.0
    assert values["summary/final_loss"] == pytest.approx(4.8)
    assert values["summary/final_val_loss"] == pytest.approx(4.5)
    assert values["summary/diverged"] == 0.0
    assert values["summary/spike_count"] == 1.0
    assert values["summary/grad_last_over_first_init"] == pytest.approx(4.0)
    assert values["summary/grad_last_over_first_final"] == pytest.approx(4.0)
    assert values["summary/grad_depth_slope_init"] == pytest.approx(slope, abs=1e-5)
    assert values["summary/grad_depth_slope_final"] == pytest.approx(slope, abs=1e-5)


def test_sink_guesses_divergence_from_loss(tmp_path: Path, make_records) -> None:
    records = make_records(steps=3, depth=2, overrides={(2, "loss", -1): math.nan})
    _write_run(tmp_path / "run", records)
    assert _summary_values(_load(tmp_path / "run"))["summary/diverged"] == 1.0


def test_depth_slope_halves_per_block() -> None:
    # Each block has half the previous value: log10(0.5) decades per block.
    assert depth_slope([8.0, 4.0, 2.0, 1.0]) == pytest.approx(math.log10(0.5))


def test_depth_slope_undefined_for_zero() -> None:
    assert math.isnan(depth_slope([1.0, 0.0, 2.0]))


# HParams and layout plugin data


def test_sink_hparams_in_run_folder(tmp_path: Path, make_records) -> None:
    hparams = {"strategy": "pre", "depth": 4, "lr": 0.003, "init": "megatron", "seed": 0, "width": 32}
    _write_run(tmp_path / "run", make_records(steps=2, depth=4), hparams=hparams, hparam_domains={"strategy": ["pre", "post"]})
    accumulator = _load(tmp_path / "run")

    start = hparams_metadata.parse_session_start_info_plugin_data(
        accumulator.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    )
    experiment = hparams_metadata.parse_experiment_plugin_data(
        accumulator.SummaryMetadata(hparams_metadata.EXPERIMENT_TAG).plugin_data.content
    )
    end = hparams_metadata.parse_session_end_info_plugin_data(
        accumulator.SummaryMetadata(hparams_metadata.SESSION_END_INFO_TAG).plugin_data.content
    )
    assert start.hparams["strategy"].string_value == "pre"
    assert start.hparams["lr"].number_value == pytest.approx(0.003)
    assert [info.name for info in experiment.hparam_infos] == list(hparams)
    assert [v.string_value for v in experiment.hparam_infos[0].domain_discrete.values] == ["pre", "post"]
    assert "summary/grad_depth_slope_final" in [info.name.tag for info in experiment.metric_infos]
    assert end.status == api_pb2.STATUS_SUCCESS
    # No sub-folder, as SummaryWriter.add_hparams would create: it would show as another run.
    assert [path for path in (tmp_path / "run").iterdir() if path.is_dir()] == []


def test_sink_failed_outcome_status(tmp_path: Path, make_records) -> None:
    sink = TensorBoardSink(tmp_path / "run", hparams={"strategy": "post"})
    sink.write(make_records(steps=2, depth=2), [])
    sink.set_outcome("failed")
    sink.close()
    content = _load(tmp_path / "run").SummaryMetadata(hparams_metadata.SESSION_END_INFO_TAG).plugin_data.content
    assert hparams_metadata.parse_session_end_info_plugin_data(content).status == api_pb2.STATUS_FAILURE


def test_sink_rejects_hparam_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hparam 'depths' has value \\[2, 4\\] of type list"):
        TensorBoardSink(tmp_path / "run", hparams={"depths": [2, 4]})


def test_sink_rejects_total_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="total_steps must be a positive integer or None, got 0"):
        TensorBoardSink(tmp_path / "run", total_steps=0)


def _layout(run_dir: Path) -> layout_pb2.Layout:
    event = _load(run_dir).Tensors("custom_scalars__config__")[0]
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_sink_layout_categories(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=2, depth=4), total_steps=20, layout_depths=[2, 8])
    titles = [category.title for category in _layout(tmp_path / "run").category]
    assert titles[:5] == [
        "Depth profiles, L=8, at initialization",
        "Depth profiles, L=8, at 10 % of training",
        "Depth profiles, L=8, at 50 % of training",
        "Depth profiles, L=8, at the end of training",
        "Depth profiles, L=4, at initialization",
    ]
    assert titles[-2:] == ["Training", "Per-layer series, one line per layer"]
    assert len(titles) == 3 * 4 + 2


def test_sink_layout_opens_deepest(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=2, depth=4), total_steps=20, layout_depths=[2, 8])
    closed = {category.title: category.closed for category in _layout(tmp_path / "run").category}
    assert closed["Depth profiles, L=8, at initialization"] is False
    assert closed["Depth profiles, L=8, at the end of training"] is False
    assert closed["Depth profiles, L=8, at 10 % of training"] is True
    assert closed["Depth profiles, L=4, at initialization"] is True


def test_sink_layout_profile_chart(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=2, depth=4))
    first = _layout(tmp_path / "run").category[0]
    assert first.title == "Depth profiles, L=4, at initialization"
    assert first.chart[0].title == "grad/mlp.out against layer, L=4"
    assert list(first.chart[0].multiline.tag) == [r"^profile/L04/grad/mlp\.out/init$"]


def test_sink_layout_layer_chart(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=2, depth=4))
    series = _layout(tmp_path / "run").category[-1]
    regexes = {chart.title: list(chart.multiline.tag) for chart in series.chart}
    assert regexes["grad/mlp.out, one line per layer"] == [r"^grad/mlp\.out/block_[0-9]+$"]


def test_sink_description_written_as_text(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "run", description='{"lr": 0.003}')
    sink.close()
    assert _texts(_load(tmp_path / "run"), "run/config") == {0: '{"lr": 0.003}'}


# Heatmaps


def _image(accumulator: EventAccumulator, tag: str, index: int = -1) -> Image.Image:
    return Image.open(io.BytesIO(accumulator.Images(tag)[index].encoded_image_string))


def test_sink_heatmap_at_close(tmp_path: Path, make_records) -> None:
    _write_run(tmp_path / "run", make_records(steps=3, depth=4))
    accumulator = _load(tmp_path / "run")
    event = accumulator.Images("heatmap/grad/mlp.out")[-1]
    image = _image(accumulator, "heatmap/grad/mlp.out")
    assert event.step == 2
    assert image.size == (event.width, event.height)
    assert image.mode == "RGB"


def test_sink_heatmap_each_flush(tmp_path: Path, make_records) -> None:
    records = make_records(steps=3, depth=2)
    sink = TensorBoardSink(tmp_path / "run", flush_secs=0)
    sink.write(records[:2], [])
    sink.write(records[2:], [])
    sink.close()
    steps = [event.step for event in _load(tmp_path / "run").Images("heatmap/act/resid_post_rms")]
    # One image per flush, then one more at close.
    assert steps == [1, 2, 2]


def test_sink_heatmap_marks_nonfinite(tmp_path: Path, make_records) -> None:
    records = make_records(steps=3, depth=2, overrides={(1, "grad/mlp.out", 0): math.nan})
    _write_run(tmp_path / "run", records)
    image = _image(_load(tmp_path / "run"), "heatmap/grad/mlp.out")
    assert NONFINITE_RGB in {colour for _, colour in image.getcolors(maxcolors=100_000)}


def test_sink_no_heatmap_without_metric(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", [StepRecord(0, {"loss": 1.0}, {"update/attn.q": [0.1, 0.2]})])
    assert _load(tmp_path / "run").Tags()["images"] == []


# Lifecycle


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


# Server


def test_server_command_keeps_every_point(tmp_path: Path) -> None:
    command = TensorBoardServer(tmp_path, port=6123).command()
    assert command[command.index("--samples_per_plugin") + 1] == "scalars=2147483647,text=2147483647,images=100"
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
    assert "profile/L02/grad/mlp.out/init" in tags["pre-L02-s0"]
    assert "grad/mlp.out/block_01" in tags["post-L02-s0"]
    assert process.poll() is not None
