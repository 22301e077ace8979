"""Summary protos for TensorBoard's dashboards: custom-scalars layout, HParams, text and images.

The protos are built from TensorBoard's own definitions, without TensorFlow,
and written by `TensorBoardSink` through a plain event-file writer.

The custom-scalars layout of a run covers a whole sweep. TensorBoard's
custom-scalars plugin merges the layouts of all runs: categories with the
same title are joined and duplicate charts dropped. Every run of a sweep can
therefore carry the same layout in its own folder, so no extra run folder
is needed just for the layout.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from google.protobuf import struct_pb2
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.text import plugin_data_pb2 as text_plugin_data_pb2

if TYPE_CHECKING:
    from stabiliscope.models import ModelConfig
    from stabiliscope.train import TrainConfig

HParamValue = str | bool | int | float

MILESTONE_TITLES = {
    "init": "at initialization",
    "final": "at the end of training",
}
"""Category wording of the fixed milestones; `<N>pct` milestones read `at N % of training`."""

SUMMARY_METRICS = {
    "summary/final_loss": ("final loss", "Training loss of the last recorded step."),
    "summary/final_val_loss": ("final val loss", "Validation loss after training; absent when the run diverged."),
    "summary/diverged": ("diverged", "1 when the run diverged, else 0."),
    "summary/spike_count": ("spikes", "Number of loss and grad/total spikes detected."),
    "summary/grad_last_over_first_init": (
        "grad last/first at init",
        "Last-block over first-block value of the gradient depth profile at initialization.",
    ),
    "summary/grad_last_over_first_final": (
        "grad last/first at end",
        "Last-block over first-block value of the gradient depth profile at the last recorded step.",
    ),
    "summary/grad_depth_slope_init": (
        "grad depth slope at init",
        "Least-squares slope of log10 of the gradient depth profile against block index "
        "at initialization, in decades per block.",
    ),
    "summary/grad_depth_slope_final": (
        "grad depth slope at end",
        "Least-squares slope of log10 of the gradient depth profile against block index "
        "at the last recorded step, in decades per block.",
    ),
}
"""HParams metric tags written by `TensorBoardSink.close`, with display name and description."""


def milestone_title(milestone: str) -> str:
    """Return the category wording of a milestone name such as `init` or `10pct`."""
    if milestone in MILESTONE_TITLES:
        return MILESTONE_TITLES[milestone]
    return f"at {milestone.removesuffix('pct')} % of training"


def profile_tag(depth: int, metric: str, milestone: str) -> str:
    """Return the tag of a depth profile, such as `profile/L16/grad/mlp.out/init`.

    The depth is part of the tag, so that TensorBoard draws runs of one depth
    in one chart: selecting runs overlays their strategies.
    """
    return f"profile/L{depth:02d}/{metric}/{milestone}"


def block_tag(metric: str, block: int, depth: int) -> str:
    """Return the tag of `metric` at `block`, such as `grad/mlp.out/block_07`.

    Block numbers have at least two digits, and as many as the largest block
    index of `depth` needs, so that runs of different depths share tag names.
    """
    digits = max(2, len(str(depth - 1)))
    return f"{metric}/block_{block:0{digits}d}"


# Custom-scalars layout


def _multiline(title: str, regex: str) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))


def build_layout(
    depths: Sequence[int],
    profile_metrics: Sequence[str],
    series_metrics: Sequence[str],
    milestones: Sequence[str],
) -> layout_pb2.Layout:
    """Build the custom-scalars layout of a sweep.

    Categories, in order:

    - one per (depth, milestone), deepest first: a chart per metric in
      `profile_metrics` with layer index on the x axis and one line per run,
      which compares the strategies at that depth. Only the deepest depth's
      initialization and end categories start open;
    - `Training`: loss, grad/total (with the interval extremes when the watch
      flushes every N > 1 steps), learning rate, and the event series;
    - `Per-layer series`: a chart per metric in `series_metrics` with one line
      per layer.
    """
    categories = []
    ordered_depths = sorted(set(depths), reverse=True)
    for depth in ordered_depths:
        for milestone in milestones:
            charts = [
                _multiline(f"{metric} against layer, L={depth}", f"^{re.escape(profile_tag(depth, metric, milestone))}$")
                for metric in profile_metrics
            ]
            opened = depth == ordered_depths[0] and milestone in ("init", "final")
            categories.append(
                layout_pb2.Category(
                    title=f"Depth profiles, L={depth}, {milestone_title(milestone)}",
                    chart=charts,
                    closed=not opened,
                )
            )

    categories.append(
        layout_pb2.Category(
            title="Training",
            chart=[
                _multiline("loss", r"^loss(/interval_(max|min))?$"),
                _multiline("grad/total (before clipping)", r"^grad/total(/interval_(max|min))?$"),
                _multiline("learning rate", r"^lr$"),
                _multiline("events: spikes so far, non-finite values, divergence", r"^events/"),
            ],
        )
    )
    categories.append(
        layout_pb2.Category(
            title="Per-layer series, one line per layer",
            chart=[
                _multiline(f"{metric}, one line per layer", f"^{re.escape(metric)}/block_[0-9]+$")
                for metric in series_metrics
            ],
        )
    )
    return layout_pb2.Layout(category=categories)


def layout_summary(layout: layout_pb2.Layout) -> Summary:
    """Return the summary that stores `layout` for the custom-scalars plugin."""
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[layout.SerializeToString()],
        tensor_shape=TensorShapeProto(),
    )
    return Summary(
        value=[
            Summary.Value(
                tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG,
                metadata=custom_scalar_metadata.create_summary_metadata(),
                tensor=tensor,
            )
        ]
    )


# HParams


def _struct_value(value: HParamValue) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, (int, float)):
        return struct_pb2.Value(number_value=float(value))
    return struct_pb2.Value(string_value=str(value))


def _data_type(value: HParamValue) -> int:
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    if isinstance(value, (int, float)):
        return api_pb2.DATA_TYPE_FLOAT64
    return api_pb2.DATA_TYPE_STRING


def _hparams_summary(tag: str, plugin_data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(
        value=[
            Summary.Value(
                tag=tag,
                metadata=hparams_metadata.create_summary_metadata(plugin_data),
                tensor=hparams_metadata.NULL_TENSOR,
            )
        ]
    )


def run_hparams(model_config: ModelConfig, train_config: TrainConfig) -> dict[str, HParamValue]:
    """Return the HParams of a reference-model run: strategy, depth, width, learning rate, init, seed and the rest.

    `grad_clip` is 0.0 for a run without clipping, as `--grad-clip 0` sets it.
    """
    return {
        "strategy": model_config.strategy,
        "depth": model_config.depth,
        "width": model_config.width,
        "lr": train_config.lr,
        "init": model_config.resolved_init,
        "seed": train_config.seed,
        "heads": model_config.heads,
        "norm": model_config.norm,
        "embed_scale": model_config.embed_scale,
        "ffn": model_config.ffn,
        "steps": train_config.steps,
        "batch_size": train_config.batch_size,
        "seq_len": train_config.seq_len,
        "warmup": train_config.warmup,
        "grad_clip": train_config.grad_clip or 0.0,
    }


def check_hparams(hparams: Mapping[str, object]) -> None:
    """Raise ValueError unless every value is a str, bool, int or float."""
    for name, value in hparams.items():
        if not isinstance(value, (str, bool, int, float)):
            raise ValueError(
                f"hparam {name!r} has value {value!r} of type {type(value).__name__}; "
                "expected str, bool, int or float"
            )


def experiment_summary(
    hparams: Mapping[str, HParamValue],
    domains: Mapping[str, Sequence[HParamValue]] | None = None,
    metrics: Mapping[str, tuple[str, str]] = SUMMARY_METRICS,
    differ: Sequence[str] = (),
) -> Summary:
    """Return the HParams experiment summary: the hparams with their types and domains, and the metrics.

    A name in `domains` gets a discrete domain, which the HParams dashboard
    offers as checkboxes. Names in `differ` are the hparams whose values vary
    between the runs: the dashboard lists them first, and shows the first
    five hparams as table columns by default.
    """
    domains = domains or {}
    infos = []
    for name, value in hparams.items():
        info = api_pb2.HParamInfo(name=name, type=_data_type(value), differs=name in differ)
        if name in domains:
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[_struct_value(v) for v in domains[name]]))
        infos.append(info)
    metric_infos = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=display, description=description)
        for tag, (display, description) in metrics.items()
    ]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
    plugin_data = plugin_data_pb2.HParamsPluginData(
        version=hparams_metadata.PLUGIN_DATA_VERSION, experiment=experiment
    )
    return _hparams_summary(hparams_metadata.EXPERIMENT_TAG, plugin_data)


def session_start_summary(hparams: Mapping[str, HParamValue], start_time_s: float | None = None) -> Summary:
    """Return the HParams session start summary that records this run's hparam values."""
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time_s or time.time())
    for name, value in hparams.items():
        start.hparams[name].CopyFrom(_struct_value(value))
    plugin_data = plugin_data_pb2.HParamsPluginData(
        version=hparams_metadata.PLUGIN_DATA_VERSION, session_start_info=start
    )
    return _hparams_summary(hparams_metadata.SESSION_START_INFO_TAG, plugin_data)


def session_end_summary(succeeded: bool, end_time_s: float | None = None) -> Summary:
    """Return the HParams session end summary with status success or failure."""
    status = api_pb2.STATUS_SUCCESS if succeeded else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end_time_s or time.time())
    plugin_data = plugin_data_pb2.HParamsPluginData(
        version=hparams_metadata.PLUGIN_DATA_VERSION, session_end_info=end
    )
    return _hparams_summary(hparams_metadata.SESSION_END_INFO_TAG, plugin_data)


# Text and images


def text_summary(tag: str, text: str) -> Summary:
    """Return a text-plugin summary; TensorBoard renders `text` as Markdown."""
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name="text",
            content=text_plugin_data_pb2.TextPluginData(version=0).SerializeToString(),
        )
    )
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[text.encode("utf-8")],
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def image_summary(tag: str, png: bytes, width: int, height: int) -> Summary:
    """Return an image summary of an RGB PNG of `width` x `height` pixels."""
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
