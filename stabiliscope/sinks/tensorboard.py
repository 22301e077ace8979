"""TensorBoard event files for one run, and a TensorBoard server for a sweep.

`TensorBoardSink` writes a fixed set of tags, chosen so that the dashboards
show the gradient analysis without any arranging. In TensorBoard, the Custom
Scalars tab shows the depth profiles of each depth and milestone (deepest
first), then the training curves and the per-layer series. The Images tab
shows the heatmaps, and the HParams tab one row per run with its summary
metrics.

A depth-64 model logged every step for 5000 steps gets about 400 tags per
run, and TensorBoard lists them in a few seconds (tests/test_dashboard_scale.py
measures both). Every metric of every block stays in the watch's records and
in the SQLite run store. The event files carry:

Scalars against the training step:

- the global scalars: `loss`, `grad/total`, `lr` and, when the watch flushes
  every N > 1 steps, their interval extremes (`loss/interval_max`, ...);
- one series per layer for the few metrics of `SERIES_METRICS`, such as
  `grad/mlp.out/block_07` (see `block_tag`). When depth times the number of
  metrics exceeds `max_series_tags`, every k-th block and the last block are
  written, with the smallest k that fits;
- events: `events/spike_count` counts the spikes detected up to each
  recorded step, so each spike is a step up. `events/nonfinite_count` is the
  number of NaN or Inf elements the step saw (the sum of its `nonfinite/*`
  counts, plus one per non-finite `loss` or `grad/total`). `events/diverged`
  goes from 0 to 1 at the step where the caller reports a divergence;
- `summary/*`: the HParams metrics of the run (see `dashboard.SUMMARY_METRICS`),
  one point each at the last recorded step.

Depth profiles, whose TensorBoard step is the block index (0 next to the
embedding): `profile/L<depth>/<metric>/<milestone>` for every per-block
`grad/*` metric and every `act/*_rms`. The milestones are `init` (the first
record), `10pct` and `50pct` (the first record at or after that fraction of
`total_steps`, only when `total_steps` is given) and `final` (the last record,
written at close). Runs of one depth share these tags, so selecting runs in
TensorBoard overlays their strategies against layer index.

Images: `heatmap/<metric>` for `HEATMAP_METRICS`, layer by step on a log10
colour scale (see `stabiliscope.sinks.heatmap`).

Text: `run/config`, `events/spikes`, `events/first_nonfinite`,
`events/divergence` and `profile/milestones` (the training step of each
milestone).

Plugin data: a custom-scalars layout (see `dashboard.build_layout`) and, when
hparams are given, the HParams experiment and session, all in the run's own
folder.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.writer import FileWriter

from stabiliscope.sinks import dashboard
from stabiliscope.sinks.dashboard import HParamValue, block_tag, profile_tag
from stabiliscope.sinks.heatmap import LayerStepHistory, render_heatmap_png
from stabiliscope.watch.records import Sink, SpikeEvent, StepRecord

logger = logging.getLogger(__name__)

__all__ = ["TensorBoardServer", "TensorBoardSink", "block_tag", "profile_tag"]

SERIES_METRICS = ("grad/block", "grad/attn.o", "grad/mlp.out", "grad/resid_post", "act/resid_post_rms")
"""Per-block metrics written as one scalar series per layer."""

HEATMAP_METRICS = (
    "grad/block",
    "grad/attn.o",
    "grad/mlp.out",
    "grad/resid_post",
    "act/resid_post_rms",
    "act/attn_out_rms",
    "act/mlp_out_rms",
    "update/mlp.out",
    "attn/logit_max",
)
"""Per-block metrics drawn as layer-by-step heatmaps."""

PROFILE_FIRST = ("grad/mlp.out", "grad/attn.o", "grad/block", "grad/resid_post", "act/resid_post_rms")
"""Depth-profile metrics listed first in the layout; the others follow by name."""

SUMMARY_PROFILE_METRIC = "grad/mlp.out"
"""Per-block metric behind the `summary/grad_*` HParams metrics, as in `stabiliscope report`."""

MILESTONE_FRACTIONS = (0.1, 0.5)
"""Fractions of `total_steps` at which depth profiles are written, between init and final."""

MAX_SERIES_TAGS = 512
"""Default bound on the per-layer scalar series of one run."""

FLUSH_SECS = 10
"""Seconds between flushes (heatmaps re-rendered, event file flushed), so a live dashboard lags by at most this."""

OUTCOMES = ("completed", "diverged", "failed")


def is_profile_metric(metric: str) -> bool:
    """Return True for the per-block metrics written as depth profiles: `grad/*` and `act/*_rms`."""
    return metric.startswith("grad/") or (metric.startswith("act/") and metric.endswith("_rms"))


def ordered_profile_metrics(metrics: Sequence[str]) -> list[str]:
    """Return the depth-profile metrics among `metrics`: those of `PROFILE_FIRST`, then the rest by name."""
    present = {metric for metric in metrics if is_profile_metric(metric)}
    first = [metric for metric in PROFILE_FIRST if metric in present]
    return first + sorted(present - set(first))


def series_blocks(depth: int, metric_count: int, max_tags: int) -> list[int]:
    """Return the blocks that get a scalar series: all of them, or every k-th and the last.

    k is the smallest stride for which `metric_count` series per block stay
    within `max_tags`.
    """
    if metric_count == 0 or depth * metric_count <= max_tags:
        return list(range(depth))
    per_metric = max(max_tags // metric_count, 2)
    stride = math.ceil(depth / (per_metric - 1))
    blocks = list(range(0, depth, stride))
    if blocks[-1] != depth - 1:
        blocks.append(depth - 1)
    return blocks


def milestone_name(fraction: float) -> str:
    """Return the milestone name of a fraction of training, such as `10pct` for 0.1."""
    return f"{round(fraction * 100)}pct"


def last_over_first(profile: Sequence[float]) -> float:
    """Return last-block over first-block value, or NaN when it is undefined."""
    if not profile:
        return math.nan
    first, last = profile[0], profile[-1]
    if not (math.isfinite(first) and math.isfinite(last)) or first == 0:
        return math.nan
    return last / first


def depth_slope(profile: Sequence[float]) -> float:
    """Return the least-squares slope of log10(value) against block index, in decades per block.

    NaN when the profile has fewer than two blocks or a value that is not
    positive and finite.
    """
    values = np.asarray(profile, dtype=np.float64)
    if values.size < 2 or not (np.isfinite(values).all() and (values > 0).all()):
        return math.nan
    slope, _ = np.polyfit(np.arange(values.size), np.log10(values), deg=1)
    return float(slope)


class TensorBoardSink(Sink):
    """Sink that writes one run's records as TensorBoard summaries under `run_dir`.

    `total_steps` is the planned number of optimizer steps; with it, depth
    profiles are also written at the `milestone_fractions` of training.
    `layout_depths` lists every depth of the sweep this run belongs to, for
    the custom-scalars layout (the run's own depth is always included).
    `hparams` maps hparam names to str, bool, int or float values, and
    `hparam_domains` gives the discrete values of some of them. TensorBoard
    takes the domains from one run and hides runs whose value is not among
    them, so give domains only when every run of the folder shares them.
    `hparams_differ` names the hparams whose values vary across the folder's
    runs, which the HParams dashboard shows first.
    `description` is written once as the Markdown text entry `run/config`.

    Non-finite values are written unchanged, and TensorBoard shows them as
    NaN or Inf points. At most every `flush_secs` seconds, when `write` is
    called, the heatmaps are re-rendered and the event file is flushed.
    `close()` writes the final depth profile, the heatmaps and the HParams
    metrics, and may be called more than once. `await_outcome=True` keeps
    the file open after the first `close()` until `set_outcome` or a second
    `close()`, for a trainer whose watch closes the sink before the trainer
    knows whether the run diverged.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int | None = None,
        milestone_fractions: Sequence[float] = MILESTONE_FRACTIONS,
        layout_depths: Sequence[int] = (),
        series_metrics: Sequence[str] = SERIES_METRICS,
        heatmap_metrics: Sequence[str] = HEATMAP_METRICS,
        max_series_tags: int = MAX_SERIES_TAGS,
        hparams: Mapping[str, HParamValue] | None = None,
        hparam_domains: Mapping[str, Sequence[HParamValue]] | None = None,
        hparams_differ: Sequence[str] = (),
        description: str | None = None,
        flush_secs: float = FLUSH_SECS,
        await_outcome: bool = False,
    ) -> None:
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}")
        for fraction in milestone_fractions:
            if not 0 < fraction < 1:
                raise ValueError(f"milestone fractions must be in (0, 1), got {fraction!r}")
        if hparams is not None:
            dashboard.check_hparams(hparams)

        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.layout_depths = tuple(layout_depths)
        self.series_metrics = tuple(series_metrics)
        self.heatmap_metrics = tuple(heatmap_metrics)
        self.max_series_tags = max_series_tags
        self.flush_secs = flush_secs
        self.await_outcome = await_outcome
        self.hparams = dict(hparams) if hparams is not None else None

        # (name, first step it applies to), in step order.
        self._milestones: list[tuple[str, int]] = []
        if total_steps is not None:
            targets = {milestone_name(f): math.floor(f * total_steps) for f in milestone_fractions}
            self._milestones = sorted(targets.items(), key=lambda item: item[1])

        self._writer: FileWriter | None = FileWriter(str(self.run_dir), flush_secs=flush_secs)
        self._depth: int | None = None
        self._profile_metrics: list[str] = []
        self._series_tags: dict[str, list[tuple[int, str]]] = {}
        self._histories: dict[str, LayerStepHistory] = {}
        self._init_profile: list[float] = []
        self._milestone_steps: list[tuple[str, int]] = []
        self._last_record: StepRecord | None = None
        self._profile_source: StepRecord | None = None  # the record behind the final depth profile
        self._profile_source_size = 0
        self._previous_step: int | None = None
        self._spike_count = 0
        self._outcome: str | None = None
        self._diverged_step: int | None = None
        self._final_val_loss: float | None = None
        self._heatmaps_stale = False
        self._records_finished = False
        self._last_flush = time.monotonic()

        if description is not None:
            self._add(dashboard.text_summary("run/config", description), 0)
        if self.hparams is not None:
            self._add(dashboard.experiment_summary(self.hparams, hparam_domains, differ=hparams_differ), 0)
            self._add(dashboard.session_start_summary(self.hparams), 0)

    # Writing

    def write(self, records: list[StepRecord], spikes: list[SpikeEvent]) -> None:
        self._require_writable()
        spikes = sorted(spikes, key=lambda spike: spike.step)
        counted = 0

        for record in records:
            if self._depth is None:
                self._start(record)
            while counted < len(spikes) and spikes[counted].step <= record.step:
                self._spike_count += 1
                counted += 1
            self._write_record(record)
            self._write_milestones(record)
            if record.first_nonfinite is not None:
                self._write_first_nonfinite(record)
            if self._last_record is not None:
                self._previous_step = self._last_record.step
            self._last_record = record
            # A watch with every > 1 closes with a record of scalars and
            # gradient norms only, so the final profile takes the last full record.
            present = sum(len(record.blocks.get(m, ())) == self._depth for m in self._profile_metrics)
            if present >= self._profile_source_size:
                self._profile_source, self._profile_source_size = record, present
        self._spike_count += len(spikes) - counted

        # One entry per step, because TensorBoard 2.21's data server keeps
        # only the last entry written at a step of a tag.
        by_step: dict[int, list[str]] = {}
        for spike in spikes:
            by_step.setdefault(spike.step, []).append(
                f"{spike.metric} = {spike.value:.6g} at step {spike.step} "
                f"(trailing median {spike.median:.6g}, robust z-score {spike.zscore:.3g})"
            )
        for step, lines in by_step.items():
            self._add(dashboard.text_summary("events/spikes", "\n\n".join(lines)), step)

        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Re-render the heatmaps when new records arrived, and flush the event file."""
        writer = self._require_open()
        if self._heatmaps_stale:
            self._write_heatmaps()
        writer.flush()
        self._last_flush = time.monotonic()

    def set_outcome(
        self,
        status: str,
        *,
        diverged_step: int | None = None,
        final_val_loss: float | None = None,
    ) -> None:
        """Record how the run ended, for the HParams metrics and the divergence event.

        `status` is `completed`, `diverged` or `failed`. A diverged run with a
        `diverged_step` gets `events/diverged` (0 at the record before, 1 at
        that step) and a text entry. Without a call, `close` takes a run
        whose last loss is NaN or Inf as diverged and any other as completed.

        A watch closes its sinks when it closes, so this may come after
        `close()`. With `await_outcome=True` the event file is still open
        then, and this call writes the outcome and closes it. Otherwise the
        outcome goes to a second event file in the same folder, at the same
        steps, and TensorBoard shows the later values.
        """
        if status not in OUTCOMES:
            raise ValueError(f"unknown outcome {status!r}; expected one of: {', '.join(OUTCOMES)}")
        self._outcome = status
        self._diverged_step = diverged_step if status == "diverged" else None
        self._final_val_loss = final_val_loss
        if self._writer is not None:
            if self._records_finished:
                self.close()
            return  # otherwise close() writes it

        self._writer = FileWriter(str(self.run_dir), flush_secs=self.flush_secs, filename_suffix=".outcome")
        try:
            self._write_outcome()
        finally:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Write the final depth profile and the heatmaps, then the outcome, and close the file.

        With `await_outcome=True` and no outcome yet, the first call writes
        the final profile and heatmaps only. The file stays open for
        `set_outcome`, and the next call closes it.
        """
        writer = self._writer
        if writer is None:
            return
        if not self._records_finished:
            self._records_finished = True
            last = self._profile_source
            if last is not None:
                self._write_profile("final", last)
                self._write_heatmaps()
            if self.await_outcome and self._outcome is None:
                writer.flush()
                return

        self._write_outcome()
        writer.flush()
        writer.close()
        self._writer = None

    # Internals

    def _require_open(self) -> FileWriter:
        if self._writer is None:
            raise RuntimeError(f"TensorBoardSink for {self.run_dir} is closed")
        return self._writer

    def _require_writable(self) -> FileWriter:
        if self._records_finished:
            raise RuntimeError(f"TensorBoardSink for {self.run_dir} is closed; only set_outcome may follow")
        return self._require_open()

    def _add(self, summary: Summary, step: int) -> None:
        self._require_open().add_summary(summary, step)

    def _add_scalars(self, values: Mapping[str, float], step: int) -> None:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._add(summary, step)

    def _start(self, record: StepRecord) -> None:
        """Size everything from the first record: depth, tags, histories, layout and the init profile."""
        depth = max((len(values) for values in record.blocks.values()), default=0)
        self._depth = depth
        if depth == 0:
            return

        present = [metric for metric in self.series_metrics if metric in record.blocks]
        blocks = series_blocks(depth, len(present), self.max_series_tags)
        self._series_tags = {metric: [(b, block_tag(metric, b, depth)) for b in blocks] for metric in present}
        self._histories = {
            metric: LayerStepHistory(depth) for metric in self.heatmap_metrics if metric in record.blocks
        }
        self._profile_metrics = ordered_profile_metrics(list(record.blocks))

        milestones = ["init", *(name for name, _ in self._milestones), "final"]
        layout = dashboard.build_layout(
            [*self.layout_depths, depth], self._profile_metrics, list(self._series_tags), milestones
        )
        self._add(dashboard.layout_summary(layout), 0)

        self._write_profile("init", record)
        self._init_profile = list(record.blocks.get(SUMMARY_PROFILE_METRIC, []))

    def _write_record(self, record: StepRecord) -> None:
        # One event carries every value of the step: an event per value would
        # cost about 0.1 ms each, with hundreds of values per step.
        values = [Summary.Value(tag=metric, simple_value=float(v)) for metric, v in record.scalars.items()]
        for metric, tags in self._series_tags.items():
            per_block = record.blocks.get(metric)
            if per_block is None:
                continue
            values.extend(Summary.Value(tag=tag, simple_value=float(per_block[b])) for b, tag in tags)
        values.append(Summary.Value(tag="events/spike_count", simple_value=float(self._spike_count)))
        values.append(Summary.Value(tag="events/nonfinite_count", simple_value=_nonfinite_count(record)))
        self._add(Summary(value=values), record.step)

        for metric, history in self._histories.items():
            per_block = record.blocks.get(metric)
            if per_block is not None and len(per_block) == history.depth:
                history.add(record.step, per_block)
                self._heatmaps_stale = True

    def _write_milestones(self, record: StepRecord) -> None:
        while self._milestones and self._milestones[0][1] <= record.step:
            name, _ = self._milestones.pop(0)
            self._write_profile(name, record)

    def _write_profile(self, milestone: str, record: StepRecord) -> None:
        depth = self._depth
        if not depth:
            return
        metrics = [m for m in self._profile_metrics if len(record.blocks.get(m, ())) == depth]
        for block in range(depth):
            values = [
                Summary.Value(tag=profile_tag(depth, m, milestone), simple_value=float(record.blocks[m][block]))
                for m in metrics
            ]
            self._add(Summary(value=values), block)
        # The entry lists every milestone so far, because when two milestones
        # fall on one step, TensorBoard keeps only the later entry.
        self._milestone_steps.append((milestone, record.step))
        rows = "\n".join(f"| `{name}` | {step} |" for name, step in self._milestone_steps)
        text = f"| depth profile | training step |\n| --- | --- |\n{rows}"
        self._add(dashboard.text_summary("profile/milestones", text), record.step)

    def _write_first_nonfinite(self, record: StepRecord) -> None:
        event = record.first_nonfinite
        where = "a global scalar" if event.block is None else f"block {event.block}"
        text = (
            f"first NaN or Inf at step {event.step}, {where}, {event.position} "
            f"({event.direction}, {event.count} elements)"
        )
        self._add(dashboard.text_summary("events/first_nonfinite", text), event.step)

    def _write_heatmaps(self) -> None:
        step = self._last_record.step if self._last_record is not None else 0
        for metric, history in self._histories.items():
            if not len(history):
                continue
            png, width, height = render_heatmap_png(metric, history.data())
            self._add(dashboard.image_summary(f"heatmap/{metric}", png, width, height), step)
        self._heatmaps_stale = False

    def _status(self) -> str:
        if self._outcome is not None:
            return self._outcome
        last = self._last_record
        if last is not None and not math.isfinite(last.scalars.get("loss", 0.0)):
            return "diverged"
        return "completed"

    def _write_outcome(self) -> None:
        """Write the divergence event, the HParams metrics and the session end."""
        last = self._last_record
        if self._diverged_step is not None:
            self._write_divergence(self._diverged_step)
        if last is not None:
            self._add_scalars(self._summary_metrics(), last.step)
        if self.hparams is not None:
            self._add(dashboard.session_end_summary(self._status() != "failed"), last.step if last else 0)

    def _write_divergence(self, diverged_step: int) -> None:
        earlier = [
            step
            for step in (self._previous_step, self._last_record.step if self._last_record else None)
            if step is not None and step < diverged_step
        ]
        if earlier:
            self._add_scalars({"events/diverged": 0.0}, max(earlier))
        self._add_scalars({"events/diverged": 1.0}, diverged_step)
        loss = self._last_record.scalars.get("loss", math.nan) if self._last_record else math.nan
        text = f"diverged at step {diverged_step}; last recorded loss {loss:.6g}"
        self._add(dashboard.text_summary("events/divergence", text), diverged_step)

    def _summary_metrics(self) -> dict[str, float]:
        last = self._last_record
        final_profile = list(last.blocks.get(SUMMARY_PROFILE_METRIC, [])) if last else []
        metrics = {
            "summary/final_loss": last.scalars.get("loss", math.nan) if last else math.nan,
            "summary/diverged": 1.0 if self._status() == "diverged" else 0.0,
            "summary/spike_count": float(self._spike_count),
            "summary/grad_last_over_first_init": last_over_first(self._init_profile),
            "summary/grad_last_over_first_final": last_over_first(final_profile),
            "summary/grad_depth_slope_init": depth_slope(self._init_profile),
            "summary/grad_depth_slope_final": depth_slope(final_profile),
        }
        if self._final_val_loss is not None:
            metrics["summary/final_val_loss"] = self._final_val_loss
        return metrics


def _nonfinite_count(record: StepRecord) -> float:
    count = sum(
        sum(values) for metric, values in record.blocks.items() if metric.startswith("nonfinite/")
    )
    count += sum(1 for name in ("loss", "grad/total") if not math.isfinite(record.scalars.get(name, 0.0)))
    return float(count)


KEEP_ALL = 2**31 - 1
"""Sample count that keeps every point of a tag.

NOTE: `--samples_per_plugin scalars=0` does not keep everything in
TensorBoard 2.21: the data server then stores every point, but the scalars
plugin requests 0 of them, so every chart stays empty.
"""

KEPT_IMAGES = 100
"""Images kept per tag; the latest image of a tag is always among them."""

SAMPLES_PER_PLUGIN = f"scalars={KEEP_ALL},text={KEEP_ALL},images={KEPT_IMAGES}"

LAYOUT_PAGE = "#custom_scalars&_smoothingWeight=0"
"""URL fragment of the custom-scalars dashboard without smoothing, which would blur a depth profile."""


# Readiness checks go straight to the server, never through an HTTP proxy set
# in the environment.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TensorBoardServer:
    """A TensorBoard child process serving `logdir`.

    `start()` launches `python -m tensorboard.main` and waits until its HTTP
    data API responds. `stop()` terminates it. Use it as a context manager to
    stop the child on any exit.

    The server keeps every scalar point and text entry, and up to
    `KEPT_IMAGES` images of each tag, always including the latest (see
    `SAMPLES_PER_PLUGIN`). By default TensorBoard 2.21 keeps 1000 points per
    scalar tag, sampled at random, which can drop the single step of a loss
    spike. Every point costs server memory: the resident size of TensorBoard
    2.21's data server was 0.86 GB for one depth-64 run of 5000 steps.
    """

    def __init__(self, logdir: str | Path, *, host: str = "127.0.0.1", port: int = 6006) -> None:
        self.logdir = Path(logdir)
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Address of the dashboard as a browser on this machine reaches it."""
        host = self._client_host()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def command(self) -> list[str]:
        """Return the command line that starts the server."""
        return [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(self.logdir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--samples_per_plugin",
            SAMPLES_PER_PLUGIN,
        ]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until `/data/runs` responds.

        Raises RuntimeError with the last line of the server's output when it
        exits early (for example because the port is in use), and when it does
        not respond within `timeout_s` seconds. The child is stopped in both cases.
        """
        command = self.command()
        logger.info("starting TensorBoard: %s", " ".join(command))
        # The child's output goes to a temporary file rather than a pipe, which
        # would block the server once the pipe buffer is full.
        self._output = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            returncode = self.process.poll()
            if returncode is not None:
                last_line = self._last_output_line()
                self.stop()
                raise RuntimeError(f"TensorBoard exited with status {returncode}: {last_line}")
            if self._responds():
                logger.info("TensorBoard (pid %d) responds at %s", self.process.pid, self.url)
                return
            time.sleep(0.25)

        last_line = self._last_output_line()
        self.stop()
        raise RuntimeError(
            f"TensorBoard did not respond at {self.url} within {timeout_s:.0f} s: {last_line}"
        )

    def wait(self) -> int:
        """Block until the server exits and return its exit status."""
        if self.process is None:
            raise RuntimeError("TensorBoard server is not running")
        return self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server, killing it when it outlives `timeout_s` seconds."""
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("TensorBoard (pid %d) ignored SIGTERM; killing it", process.pid)
                    process.kill()
                    process.wait()
            logger.info("TensorBoard (pid %d) stopped", process.pid)
            self.process = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> TensorBoardServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _client_host(self) -> str:
        # A server bound to every interface is reached on loopback from here.
        if self.host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return self.host

    def _responds(self) -> bool:
        try:
            with _DIRECT_OPENER.open(self.url + "data/runs", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _last_output_line(self) -> str:
        if self._output is None:
            return "no output"
        self._output.seek(0)
        text = self._output.read().decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"
