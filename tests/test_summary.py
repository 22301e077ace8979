"""Tests for the sweep summary, built from a real run store in tmp_path."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from stabiliscope.experiments.summary import (
    NONFINITE_MARK,
    SPARK_LEVELS,
    layer_ratio,
    render_table,
    sparkline,
    summarize,
    to_csv,
    to_json,
)
from stabiliscope.sinks.store import SWEEP_CONFIG_KEY, RunStore


def _add_run(
    store: RunStore,
    make_records,
    *,
    strategy: str,
    depth: int,
    seed: int,
    status: str = "completed",
    steps: int = 3,
    train_loss: float = 3.0,
    val_loss: float | None = 3.2,
    diverged_step: int | None = None,
    spikes: int = 0,
    overrides: dict | None = None,
) -> None:
    run_id = f"{strategy}-L{depth:02d}-s{seed}"
    store.begin_run(run_id, {}, strategy=strategy, depth=depth, width=32, seed=seed)
    store.write_records(run_id, make_records(steps=steps, depth=depth, overrides=overrides))
    if status == "failed":
        store.fail_run(run_id, "RuntimeError: boom")
    elif status != "running":
        store.finish_run(
            run_id,
            status=status,
            diverged_step=diverged_step,
            final_train_loss=train_loss,
            final_val_loss=val_loss,
            spike_count=spikes,
            wall_time_s=1.0,
            tokens_per_s=100.0,
        )


@pytest.fixture
def store(sweep_dir: Path):
    with RunStore.open(sweep_dir) as opened:
        yield opened


# Sparkline and ratio


def test_sparkline_rising_profile() -> None:
    assert sparkline([1.0, 10.0, 100.0]) == SPARK_LEVELS[0] + SPARK_LEVELS[4] + SPARK_LEVELS[-1]


def test_sparkline_log_scale() -> None:
    # 1, 10, 100, 1000 are equally spaced in log10, so the levels are too.
    assert sparkline([1.0, 10.0, 100.0, 1000.0]) == "▁▃▆█"


def test_sparkline_flat_profile() -> None:
    assert sparkline([2.0, 2.0, 2.0]) == SPARK_LEVELS[0] * 3


def test_sparkline_small_variation_stays_low() -> None:
    line = sparkline([1.0, 1.01])
    assert line == SPARK_LEVELS[0] * 2


def test_sparkline_marks_nonfinite() -> None:
    assert sparkline([1.0, math.nan, math.inf, 10.0]) == f"▁{NONFINITE_MARK}{NONFINITE_MARK}█"


def test_sparkline_marks_zero() -> None:
    assert sparkline([0.0, 1.0, 10.0]) == "·▁█"


def test_sparkline_empty() -> None:
    assert sparkline([]) == ""


def test_layer_ratio_last_over_first() -> None:
    assert layer_ratio([2.0, 5.0, 8.0]) == pytest.approx(4.0)


def test_layer_ratio_nonfinite_is_nan() -> None:
    assert math.isnan(layer_ratio([math.nan, 1.0]))


def test_layer_ratio_zero_first_is_nan() -> None:
    assert math.isnan(layer_ratio([0.0, 1.0]))


def test_layer_ratio_empty_is_nan() -> None:
    assert math.isnan(layer_ratio([]))


# Aggregation


def test_summarize_one_row_per_strategy_depth(store: RunStore, make_records) -> None:
    for strategy in ("pre", "post"):
        for depth in (2, 4):
            for seed in (0, 1):
                _add_run(store, make_records, strategy=strategy, depth=depth, seed=seed)
    rows = summarize(store)
    assert [(row.strategy, row.depth) for row in rows] == [
        ("post", 2),
        ("post", 4),
        ("pre", 2),
        ("pre", 4),
    ]
    assert rows[0].seeds == [0, 1]


def test_summarize_follows_sweep_norm_order(store: RunStore, make_records) -> None:
    store.set_meta(SWEEP_CONFIG_KEY, {"norms": ["pre", "post"]})
    _add_run(store, make_records, strategy="post", depth=2, seed=0)
    _add_run(store, make_records, strategy="pre", depth=2, seed=0)
    rows = summarize(store)
    assert [row.strategy for row in rows] == ["pre", "post"]


def test_summarize_mean_over_seeds(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=2, seed=0, train_loss=3.0, val_loss=3.5, spikes=1)
    _add_run(store, make_records, strategy="pre", depth=2, seed=1, train_loss=4.0, val_loss=4.5, spikes=2)
    row = summarize(store)[0]
    assert row.final_train_loss == pytest.approx(3.5)
    assert row.final_val_loss == pytest.approx(4.0)
    assert row.spike_count == pytest.approx(1.5)


def test_summarize_profiles_first_and_last_step(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=3, seed=0, steps=3)
    row = summarize(store)[0]
    assert row.init_profile == pytest.approx([1.0, 2.0, 3.0])
    assert row.final_profile == pytest.approx([0.01, 0.02, 0.03])
    assert row.init_steps == [0]
    assert row.final_steps == [2]
    assert row.init_ratio == pytest.approx(3.0)


def test_summarize_profile_mean_over_seeds(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=2, seed=0)
    _add_run(
        store,
        make_records,
        strategy="pre",
        depth=2,
        seed=1,
        overrides={(0, "grad/mlp.out", 0): 3.0},
    )
    row = summarize(store)[0]
    assert row.init_profile == pytest.approx([2.0, 2.0])


def test_diverged_single_seed_text(store: RunStore, make_records) -> None:
    _add_run(
        store,
        make_records,
        strategy="post",
        depth=4,
        seed=0,
        status="diverged",
        diverged_step=37,
        train_loss=math.inf,
        val_loss=None,
    )
    row = summarize(store)[0]
    assert row.diverged_text == "yes @ 37"
    assert row.final_train_loss == math.inf
    assert row.final_val_loss is None


def test_diverged_some_seeds_text(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="post", depth=4, seed=0)
    _add_run(
        store,
        make_records,
        strategy="post",
        depth=4,
        seed=1,
        status="diverged",
        diverged_step=12,
        train_loss=math.nan,
        val_loss=None,
    )
    _add_run(store, make_records, strategy="post", depth=4, seed=2, train_loss=5.0)
    row = summarize(store)[0]
    assert row.diverged_text == "1/3 seeds @ 12"
    # The diverged seed's NaN loss is left out of the mean.
    assert row.final_train_loss == pytest.approx(4.0)


def test_not_diverged_text(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=2, seed=0)
    assert summarize(store)[0].diverged_text == "no"


def test_unfinished_runs_left_out(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=2, seed=0, train_loss=3.0)
    _add_run(store, make_records, strategy="pre", depth=2, seed=1, status="failed")
    _add_run(store, make_records, strategy="pre", depth=2, seed=2, status="running")
    row = summarize(store)[0]
    assert row.seeds == [0]
    assert row.unfinished_seeds == [1, 2]
    assert row.final_train_loss == pytest.approx(3.0)


def test_only_failed_runs_give_empty_row(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=2, seed=0, status="failed")
    row = summarize(store)[0]
    assert row.seeds == []
    assert row.final_train_loss is None
    assert row.init_profile == []
    assert row.diverged_text == "-"


# Renderers


def test_to_json_is_strict_json(store: RunStore, make_records) -> None:
    _add_run(
        store,
        make_records,
        strategy="post",
        depth=2,
        seed=0,
        status="diverged",
        diverged_step=1,
        train_loss=math.nan,
        val_loss=None,
        overrides={(2, "grad/mlp.out", 1): math.inf},
    )
    text = to_json(summarize(store))
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert data[0]["final_train_loss"] is None
    assert data[0]["final_profile"] == [pytest.approx(0.01), None]
    assert data[0]["diverged_steps"] == [1]


def test_to_json_full_profiles(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=4, seed=0)
    data = json.loads(to_json(summarize(store)))
    assert data[0]["init_profile"] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert data[0]["init_last_over_first"] == pytest.approx(4.0)


def test_to_csv_joins_profiles(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=3, seed=0)
    rows = list(csv.DictReader(io.StringIO(to_csv(summarize(store)))))
    assert rows[0]["init_profile"] == "1;2;3"
    assert rows[0]["strategy"] == "pre"
    assert rows[0]["final_val_loss"] == "3.2"


def test_render_table_shows_sparklines(store: RunStore, make_records) -> None:
    _add_run(store, make_records, strategy="pre", depth=4, seed=0)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_table(summarize(store)))
    text = console.export_text()
    assert sparkline([1.0, 2.0, 3.0, 4.0]) in text
    assert "pre" in text
