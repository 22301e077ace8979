"""Sweep summary: one row per (strategy, depth), read from the run store.

Each row aggregates the finished runs (status `completed` or `diverged`) of
one strategy and depth over their seeds:

- final train and validation loss: the mean over seeds whose value is finite.
  When no seed has a finite value, the train loss is the first seed's value
  (NaN or Inf), and the validation loss is None;
- divergence: how many seeds diverged and at which steps;
- spike count: the mean over seeds;
- depth profiles of `grad/mlp.out` at initialization (the first recorded step,
  step 0 for runs of `stabiliscope.train`) and at the last recorded step. Each
  is the element-wise mean over seeds, indexed by block from the embedding to
  the output;
- the first NaN or Inf of each seed that saw one: step, block, stream
  position and direction (forward or backward).

`flagged_runs` lists, run by run, those that diverged, saw a non-finite
value, failed or are unfinished, for a second table.

The summary reports what was measured and makes no judgement about which
profile is expected for a strategy.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from stabiliscope.experiments.sweep import make_run_id
from stabiliscope.sinks.store import SWEEP_CONFIG_KEY, RunRow, RunStore

PROFILE_METRIC = "grad/mlp.out"
"""Per-block metric whose depth profile the summary shows."""

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
NONFINITE_MARK = "!"
"""Sparkline character for a NaN or Inf value."""
NONPOSITIVE_MARK = "·"
"""Sparkline character for a zero or negative value, which has no log10."""

MIN_SPAN_DECADES = 0.1
"""Smallest log10 range a sparkline is drawn against.

Without a floor, a profile that varies by 1 % across depth would fill the
full height just like one that varies 100-fold. Below this span (a factor of
about 1.26), the bars stay near the bottom.
"""


@dataclass(frozen=True)
class NonfiniteLocation:
    """The first NaN or Inf a run's watch located, read from its `nonfinite` event.

    `block` is None when the value was seen only in a global scalar (`loss`
    or `grad/total`), which is then the `position`.
    """

    step: int
    block: int | None
    position: str
    direction: str
    count: int

    def describe(self) -> str:
        """Return text such as `step 12, block 3, attn_out (forward)`."""
        block = "" if self.block is None else f"block {self.block}, "
        return f"step {self.step}, {block}{self.position} ({self.direction})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "block": self.block,
            "position": self.position,
            "direction": self.direction,
            "count": self.count,
        }


def first_nonfinite(store: Any, run_id: str) -> NonfiniteLocation | None:
    """Return where `run_id` saw its first NaN or Inf, or None when it saw none."""
    events = store.events(run_id, kind="nonfinite")
    if not events:
        return None
    event = events[0]
    detail = event["detail"] or {}
    return NonfiniteLocation(
        step=event["step"],
        block=detail.get("block"),
        position=detail.get("position", event["metric"] or "?"),
        direction=detail.get("direction", "?"),
        count=int(detail.get("count", 0)),
    )


@dataclass
class SummaryRow:
    """Aggregated results of one strategy at one depth."""

    strategy: str
    depth: int
    seeds: list[int]
    unfinished_seeds: list[int]
    final_train_loss: float | None
    final_val_loss: float | None
    diverged_steps: list[int]
    spike_count: float | None
    metric: str = PROFILE_METRIC
    init_steps: list[int] = field(default_factory=list)
    final_steps: list[int] = field(default_factory=list)
    init_profile: list[float] = field(default_factory=list)
    final_profile: list[float] = field(default_factory=list)
    nonfinite: dict[int, NonfiniteLocation] = field(default_factory=dict)
    """The first NaN or Inf of each finished seed that saw one, by seed."""

    @property
    def init_ratio(self) -> float:
        """Last-layer over first-layer value of the initialization profile."""
        return layer_ratio(self.init_profile)

    @property
    def final_ratio(self) -> float:
        """Last-layer over first-layer value of the final profile."""
        return layer_ratio(self.final_profile)

    @property
    def diverged_text(self) -> str:
        """`no`, `yes @ 37` for one seed, or `1/3 seeds @ 37` for several."""
        if not self.seeds:
            return "-"
        if not self.diverged_steps:
            return "no"
        steps = ", ".join(str(step) for step in self.diverged_steps)
        if len(self.seeds) == 1:
            return f"yes @ {steps}"
        return f"{len(self.diverged_steps)}/{len(self.seeds)} seeds @ {steps}"

    def to_dict(self) -> dict[str, Any]:
        """Return the row as JSON-ready values; NaN and Inf become None."""
        return {
            "strategy": self.strategy,
            "depth": self.depth,
            "seeds": list(self.seeds),
            "unfinished_seeds": list(self.unfinished_seeds),
            "final_train_loss": _json_number(self.final_train_loss),
            "final_val_loss": _json_number(self.final_val_loss),
            "diverged_seeds": len(self.diverged_steps),
            "diverged_steps": list(self.diverged_steps),
            "spike_count": _json_number(self.spike_count),
            "metric": self.metric,
            "init_steps": list(self.init_steps),
            "final_steps": list(self.final_steps),
            "init_profile": [_json_number(value) for value in self.init_profile],
            "final_profile": [_json_number(value) for value in self.final_profile],
            "init_last_over_first": _json_number(self.init_ratio),
            "final_last_over_first": _json_number(self.final_ratio),
            "first_nonfinite": [
                {"seed": seed, **location.to_dict()} for seed, location in sorted(self.nonfinite.items())
            ],
        }


def summarize(store: RunStore, metric: str = PROFILE_METRIC) -> list[SummaryRow]:
    """Build one row per (strategy, depth) from the runs in `store`.

    Rows follow the strategy order of the stored sweep configuration (other
    strategies after it, by name), then depth ascending.
    """
    groups: dict[tuple[str, int], list[RunRow]] = {}
    for run in store.list_runs():
        groups.setdefault((run.strategy, run.depth), []).append(run)

    strategy_order = _strategy_order(store, {strategy for strategy, _ in groups})
    keys = sorted(groups, key=lambda key: (strategy_order[key[0]], key[1]))
    return [_summarize_group(store, strategy, depth, groups[(strategy, depth)], metric) for strategy, depth in keys]


def _strategy_order(store: RunStore, strategies: set[str]) -> dict[str, int]:
    sweep_config = store.get_meta(SWEEP_CONFIG_KEY) or {}
    ordered = [name for name in sweep_config.get("norms", []) if name in strategies]
    ordered += sorted(strategies - set(ordered))
    return {name: index for index, name in enumerate(ordered)}


def _summarize_group(
    store: RunStore, strategy: str, depth: int, runs: list[RunRow], metric: str
) -> SummaryRow:
    finished = sorted((run for run in runs if run.finished), key=lambda run: run.seed)
    unfinished = sorted(run.seed for run in runs if not run.finished)

    init_profiles: list[list[float]] = []
    final_profiles: list[list[float]] = []
    init_steps: list[int] = []
    final_steps: list[int] = []
    for run in finished:
        steps = store.recorded_steps(run.run_id, metric)
        if not steps:
            continue
        init_steps.append(steps[0])
        final_steps.append(steps[-1])
        init_profiles.append(store.block_profile(run.run_id, metric, steps[0]))
        final_profiles.append(store.block_profile(run.run_id, metric, steps[-1]))

    train_losses = [run.final_train_loss for run in finished if run.final_train_loss is not None]
    val_losses = [run.final_val_loss for run in finished if run.final_val_loss is not None]
    spike_counts = [float(run.spike_count) for run in finished if run.spike_count is not None]

    return SummaryRow(
        strategy=strategy,
        depth=depth,
        seeds=[run.seed for run in finished],
        unfinished_seeds=unfinished,
        final_train_loss=_mean_of_finite(train_losses, fallback_to_first=True),
        final_val_loss=_mean_of_finite(val_losses, fallback_to_first=False),
        diverged_steps=[
            run.diverged_step
            for run in finished
            if run.status == "diverged" and run.diverged_step is not None
        ],
        spike_count=_mean_of_finite(spike_counts, fallback_to_first=False),
        metric=metric,
        init_steps=init_steps,
        final_steps=final_steps,
        init_profile=_mean_profile(init_profiles),
        final_profile=_mean_profile(final_profiles),
        nonfinite={
            run.seed: location
            for run in finished
            if (location := first_nonfinite(store, run.run_id)) is not None
        },
    )


def _mean_of_finite(values: Sequence[float], *, fallback_to_first: bool) -> float | None:
    finite = [value for value in values if math.isfinite(value)]
    if finite:
        return math.fsum(finite) / len(finite)
    if fallback_to_first and values:
        return values[0]
    return None


def _mean_profile(profiles: Sequence[Sequence[float]]) -> list[float]:
    """Return the element-wise mean; a NaN or Inf in any seed makes that layer non-finite."""
    if not profiles:
        return []
    length = max(len(profile) for profile in profiles)
    mean: list[float] = []
    for block in range(length):
        values = [profile[block] if block < len(profile) else math.nan for profile in profiles]
        mean.append(sum(values) / len(values))
    return mean


def layer_ratio(profile: Sequence[float]) -> float:
    """Return last-layer / first-layer value, or NaN when it is undefined."""
    if len(profile) < 1:
        return math.nan
    first, last = profile[0], profile[-1]
    if not (math.isfinite(first) and math.isfinite(last)) or first == 0:
        return math.nan
    return last / first


def sparkline(values: Sequence[float]) -> str:
    """Draw `values` as one character per layer on a log10 scale.

    The scale runs from the smallest to the largest positive finite value of
    `values` (at least `MIN_SPAN_DECADES` wide). NaN and Inf are drawn as `!`,
    zero and negative values as `·`.
    """
    logs = [math.log10(value) for value in values if math.isfinite(value) and value > 0]
    low = min(logs) if logs else 0.0
    span = max(max(logs) - low, MIN_SPAN_DECADES) if logs else MIN_SPAN_DECADES
    top = len(SPARK_LEVELS) - 1

    characters: list[str] = []
    for value in values:
        if not math.isfinite(value):
            characters.append(NONFINITE_MARK)
        elif value <= 0:
            characters.append(NONPOSITIVE_MARK)
        else:
            level = round((math.log10(value) - low) / span * top)
            characters.append(SPARK_LEVELS[min(max(level, 0), top)])
    return "".join(characters)


# Renderers


def render_table(rows: Iterable[SummaryRow]) -> Table:
    """Return the summary as a rich Table, one line per (strategy, depth)."""
    rows = list(rows)
    metric = rows[0].metric if rows else PROFILE_METRIC
    table = Table(
        title=f"Depth sweep summary ({metric} per layer)",
        caption=(
            "Profiles: one character per layer, embedding side first, on a log10 scale "
            f"within each profile, at least a factor of {10 ** MIN_SPAN_DECADES:.2f} tall; "
            f"{NONFINITE_MARK} = NaN or Inf. "
            "last/first: last-layer value over first-layer value."
        ),
    )
    table.add_column("strategy", no_wrap=True)
    table.add_column("depth", justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column("diverged")
    table.add_column("spikes", justify="right")
    table.add_column("init profile", no_wrap=True)
    table.add_column("last/first", justify="right")
    table.add_column("final profile", no_wrap=True)
    table.add_column("last/first", justify="right")

    for row in rows:
        table.add_row(
            row.strategy,
            str(row.depth),
            _seeds_text(row),
            _format_number(row.final_train_loss, ".4f"),
            _format_number(row.final_val_loss, ".4f"),
            row.diverged_text,
            _format_number(row.spike_count, ".3g"),
            sparkline(row.init_profile),
            _format_ratio(row.init_ratio, row.init_profile),
            sparkline(row.final_profile),
            _format_ratio(row.final_ratio, row.final_profile),
        )
    return table


def to_json(rows: Iterable[SummaryRow]) -> str:
    """Return the rows as a JSON list of objects with the full per-layer profiles."""
    return json.dumps([row.to_dict() for row in rows], indent=2, allow_nan=False)


CSV_COLUMNS = (
    "strategy",
    "depth",
    "seeds",
    "unfinished_seeds",
    "final_train_loss",
    "final_val_loss",
    "diverged_seeds",
    "diverged_steps",
    "spike_count",
    "metric",
    "init_profile",
    "init_last_over_first",
    "final_profile",
    "final_last_over_first",
    "first_nonfinite",
)


def to_csv(rows: Iterable[SummaryRow]) -> str:
    """Return the rows as CSV; lists (seeds, steps, profiles) are joined with `;`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.strategy,
                row.depth,
                _join(row.seeds),
                _join(row.unfinished_seeds),
                _csv_number(row.final_train_loss),
                _csv_number(row.final_val_loss),
                len(row.diverged_steps),
                _join(row.diverged_steps),
                _csv_number(row.spike_count),
                row.metric,
                ";".join(_csv_number(value) for value in row.init_profile),
                _csv_number(row.init_ratio),
                ";".join(_csv_number(value) for value in row.final_profile),
                _csv_number(row.final_ratio),
                ";".join(
                    f"seed {seed}: {location.describe()}" for seed, location in sorted(row.nonfinite.items())
                ),
            ]
        )
    return buffer.getvalue()


# Runs to look at one by one


@dataclass(frozen=True)
class FlaggedRun:
    """A run that diverged, saw a non-finite value, failed or did not finish."""

    run_id: str
    status: str
    diverged_step: int | None
    nonfinite: NonfiniteLocation | None
    error: str | None


def flagged_runs(store: Any) -> list[FlaggedRun]:
    """Return the runs of `store` that are not `completed` or saw a NaN or Inf, by strategy, depth and seed."""
    flagged = []
    for run in store.list_runs():
        location = first_nonfinite(store, run.run_id)
        if run.status == "completed" and location is None:
            continue
        flagged.append(
            FlaggedRun(
                run_id=run.run_id,
                status=run.status,
                diverged_step=run.diverged_step,
                nonfinite=location,
                error=run.error,
            )
        )
    return flagged


def missing_runs(store: Any) -> list[str]:
    """Return the run ids of the sweep's grid that no run store of the folder has recorded.

    The grid comes from the sweep configuration saved in each store (every
    shard saves the whole grid). A shard that never started, or runs an
    interrupted sweep never reached, show up here.
    """
    planned: dict[str, None] = {}  # run ids in grid order, without repeats
    for run_store in getattr(store, "stores", [store]):
        config = run_store.get_meta(SWEEP_CONFIG_KEY) or {}
        for depth in config.get("depths", []):
            for strategy in config.get("norms", []):
                for seed in config.get("seeds", []):
                    planned[make_run_id(strategy, depth, seed)] = None
    return [run_id for run_id in planned if store.get_run(run_id) is None]


_STATUS_STYLES = {"completed": "green", "diverged": "yellow", "failed": "red", "running": "red"}


def render_flagged_table(runs: Iterable[FlaggedRun]) -> Table:
    """Return the diverged, non-finite, failed and unfinished runs as a rich Table, one line per run."""
    table = Table(
        title="Runs that diverged, saw NaN or Inf, failed or are unfinished",
        caption="first NaN/Inf: the first step, block and stream position where the watch saw one, "
        "in the forward or backward pass; elements: how many were non-finite there.",
    )
    table.add_column("run", no_wrap=True)
    table.add_column("status")
    table.add_column("diverged at", justify="right")
    table.add_column("first NaN/Inf")
    table.add_column("elements", justify="right")
    table.add_column("error")
    for run in runs:
        status = "unfinished" if run.status == "running" else run.status
        style = _STATUS_STYLES.get(run.status, "")
        table.add_row(
            run.run_id,
            f"[{style}]{status}[/]" if style else status,
            "-" if run.diverged_step is None else f"step {run.diverged_step}",
            "-" if run.nonfinite is None else run.nonfinite.describe(),
            "-" if run.nonfinite is None else str(run.nonfinite.count),
            run.error or "",
        )
    return table


def _seeds_text(row: SummaryRow) -> str:
    text = str(len(row.seeds))
    if row.unfinished_seeds:
        text += f" (+{len(row.unfinished_seeds)} unfinished)"
    return text


def _format_number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _format_ratio(ratio: float, profile: Sequence[float]) -> str:
    if not profile:
        return "-"
    if not math.isfinite(ratio):
        return NONFINITE_MARK
    return f"{ratio:.3g}"


def _json_number(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value


def _csv_number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"


def _join(values: Iterable[int]) -> str:
    return ";".join(str(value) for value in values)
