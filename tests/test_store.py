"""Tests for the SQLite run store, against real database files in tmp_path."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from stabiliscope.errors import ConfigError
from stabiliscope.sinks.store import (
    GLOBAL_BLOCK,
    SCHEMA_VERSION,
    STORE_FILENAME,
    RunStore,
    StoreSink,
)
from stabiliscope.watch.records import SpikeEvent


def _begin(store: RunStore, run_id: str = "pre-L04-s0", **config: object) -> None:
    store.begin_run(run_id, {"lr": 0.003, **config}, strategy="pre", depth=4, width=32, seed=0)


def _finish(store: RunStore, run_id: str = "pre-L04-s0", **overrides: object) -> None:
    values = {
        "status": "completed",
        "diverged_step": None,
        "final_train_loss": 3.5,
        "final_val_loss": 3.7,
        "spike_count": 2,
        "wall_time_s": 1.5,
        "tokens_per_s": 1000.0,
    }
    values.update(overrides)
    store.finish_run(run_id, **values)


def test_open_creates_store_file(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir):
        pass
    assert (sweep_dir / STORE_FILENAME).is_file()


def test_open_uses_wal_mode(sweep_dir: Path) -> None:
    RunStore.open(sweep_dir).close()
    with sqlite3.connect(sweep_dir / STORE_FILENAME) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_open_records_schema_version(sweep_dir: Path) -> None:
    RunStore.open(sweep_dir).close()
    with sqlite3.connect(sweep_dir / STORE_FILENAME) as connection:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION


def test_open_non_sqlite_file_names_file(sweep_dir: Path) -> None:
    path = sweep_dir / STORE_FILENAME
    path.write_bytes(b"this is a text file, not a database\n" * 200)
    with pytest.raises(ConfigError, match=str(path)):
        RunStore(path)


def test_open_newer_schema_rejected(sweep_dir: Path) -> None:
    path = sweep_dir / STORE_FILENAME
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="schema version"):
        RunStore(path)


def test_meta_round_trip(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        store.set_meta("sweep_config", {"norms": ["pre", "post"], "lr": 0.003})
        assert store.get_meta("sweep_config") == {"norms": ["pre", "post"], "lr": 0.003}


def test_meta_missing_key_is_none(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        assert store.get_meta("absent") is None


def test_begin_run_status_running(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        run = store.get_run("pre-L04-s0")
    assert run is not None
    assert run.status == "running"
    assert run.config == {"lr": 0.003}
    assert run.finished is False


def test_finish_run_round_trip(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        _finish(store)
        run = store.get_run("pre-L04-s0")
    assert run is not None
    assert run.status == "completed"
    assert run.final_train_loss == 3.5
    assert run.final_val_loss == 3.7
    assert run.spike_count == 2
    assert run.finished_at is not None


def test_finish_diverged_keeps_nan_loss(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        _finish(store, status="diverged", diverged_step=7, final_train_loss=math.nan, final_val_loss=None)
        run = store.get_run("pre-L04-s0")
    assert run is not None
    assert run.status == "diverged"
    assert run.diverged_step == 7
    assert math.isnan(run.final_train_loss)
    assert run.final_val_loss is None


def test_finish_run_rejects_failed_status(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        with pytest.raises(ValueError, match="failed"):
            _finish(store, status="failed")


def test_fail_run_stores_error(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.fail_run("pre-L04-s0", "RuntimeError: out of memory")
        run = store.get_run("pre-L04-s0")
    assert run is not None
    assert run.status == "failed"
    assert run.error == "RuntimeError: out of memory"


def test_mark_interrupted_keeps_running(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.mark_interrupted("pre-L04-s0")
        run = store.get_run("pre-L04-s0")
    assert run is not None
    assert run.status == "running"
    assert run.error is not None


def test_records_profile_round_trip(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.write_records("pre-L04-s0", make_records(steps=3, depth=4))
        profile = store.block_profile("pre-L04-s0", "grad/mlp.out", 0)
    assert profile == [1.0, 2.0, 3.0, 4.0]


def test_records_nonfinite_round_trip(sweep_dir: Path, make_records) -> None:
    overrides = {
        (1, "grad/mlp.out", 0): math.nan,
        (1, "grad/mlp.out", 1): math.inf,
        (1, "grad/mlp.out", 2): -math.inf,
        (1, "loss", GLOBAL_BLOCK): math.nan,
    }
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.write_records("pre-L04-s0", make_records(steps=2, depth=4, overrides=overrides))
        profile = store.block_profile("pre-L04-s0", "grad/mlp.out", 1)
        loss = dict(store.scalar_series("pre-L04-s0", "loss"))
    assert math.isnan(profile[0])
    assert profile[1] == math.inf
    assert profile[2] == -math.inf
    assert profile[3] == pytest.approx(0.4)
    assert math.isnan(loss[1])
    assert loss[0] == 5.0


def test_scalar_series_ordered_by_step(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        records = make_records(steps=4, depth=2)
        store.write_records("pre-L04-s0", records[2:])
        store.write_records("pre-L04-s0", records[:2])
        series = store.scalar_series("pre-L04-s0", "grad/total")
    assert [step for step, _ in series] == [0, 1, 2, 3]
    assert series[3][1] == pytest.approx(0.5)


def test_recorded_and_last_step(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.write_records("pre-L04-s0", make_records(steps=5, depth=2))
        assert store.recorded_steps("pre-L04-s0", "grad/mlp.out") == [0, 1, 2, 3, 4]
        assert store.last_step("pre-L04-s0", "grad/mlp.out") == 4
        assert store.last_step("pre-L04-s0", "grad/absent") is None


def test_block_profile_empty_when_missing(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        assert store.block_profile("pre-L04-s0", "grad/mlp.out", 0) == []


def test_same_step_written_twice_keeps_later(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.write_records("pre-L04-s0", make_records(steps=1, depth=2))
        store.write_records(
            "pre-L04-s0",
            make_records(steps=1, depth=2, overrides={(0, "grad/mlp.out", 1): 9.0}),
        )
        assert store.block_profile("pre-L04-s0", "grad/mlp.out", 0) == [1.0, 9.0]


def test_store_sink_writes_spike_events(sweep_dir: Path, make_records) -> None:
    spike = SpikeEvent(step=2, metric="loss", value=9.0, zscore=12.5, median=4.0)
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        sink = StoreSink(store, "pre-L04-s0")
        sink.write(make_records(steps=3, depth=2), [spike])
        sink.close()
        events = store.events("pre-L04-s0", kind="spike")
    assert len(events) == 1
    assert events[0]["step"] == 2
    assert events[0]["metric"] == "loss"
    assert events[0]["value"] == 9.0
    assert events[0]["detail"] == {"zscore": 12.5, "median": 4.0}


def test_spike_nonfinite_detail_round_trip(sweep_dir: Path) -> None:
    spike = SpikeEvent(step=1, metric="grad/total", value=math.inf, zscore=math.inf, median=1.0)
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.write_records("pre-L04-s0", [], [spike])
        event = store.events("pre-L04-s0")[0]
    assert event["value"] == math.inf
    assert event["detail"]["zscore"] == "inf"


def test_begin_run_cleans_earlier_attempt(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store)
        store.write_records("pre-L04-s0", make_records(steps=3, depth=2))
        store.add_event("pre-L04-s0", 2, "diverged", metric="loss", value=math.inf)

        _begin(store, lr=0.01)

        assert store.metric_names("pre-L04-s0") == []
        assert store.events("pre-L04-s0") == []
        assert store.get_run("pre-L04-s0").config == {"lr": 0.01}


def test_begin_run_leaves_other_runs(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store, run_id="pre-L04-s0")
        _begin(store, run_id="pre-L04-s1")
        store.write_records("pre-L04-s1", make_records(steps=2, depth=2))

        _begin(store, run_id="pre-L04-s0")

        assert store.recorded_steps("pre-L04-s1", "loss") == [0, 1]


def test_list_runs_filters_status(sweep_dir: Path) -> None:
    with RunStore.open(sweep_dir) as store:
        _begin(store, run_id="pre-L04-s0")
        _begin(store, run_id="pre-L04-s1")
        _finish(store, run_id="pre-L04-s1")
        finished = store.list_runs(statuses=["completed"])
        everything = store.list_runs()
    assert [run.run_id for run in finished] == ["pre-L04-s1"]
    assert [run.run_id for run in everything] == ["pre-L04-s0", "pre-L04-s1"]


def test_reader_sees_committed_writes(sweep_dir: Path, make_records) -> None:
    with RunStore.open(sweep_dir) as writer, RunStore.open(sweep_dir) as reader:
        _begin(writer)
        writer.write_records("pre-L04-s0", make_records(steps=2, depth=2))
        assert reader.recorded_steps("pre-L04-s0", "loss") == [0, 1]


def test_close_twice_is_harmless(sweep_dir: Path) -> None:
    store = RunStore.open(sweep_dir)
    store.close()
    store.close()
    assert store.path == sweep_dir / STORE_FILENAME
