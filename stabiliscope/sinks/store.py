"""SQLite run store: one file per sweep or shard, the source for reports and probes.

The store lives at `SWEEP_DIR/store.sqlite`, or `SWEEP_DIR/store-K-of-N.sqlite`
for shard K of N (see `stabiliscope.experiments.shards`). It is opened in WAL
mode with a busy timeout, so a report can read it while a sweep writes, and
several worker processes of one sweep can write it. Every write is one
`BEGIN IMMEDIATE` transaction, so a process killed at any moment leaves
either all or none of a write. Its schema version is kept in
`PRAGMA user_version`.

Tables:

- `meta(key, value)`: sweep-level entries such as the sweep configuration (JSON).
- `runs`: one row per run, with its configuration as JSON, its status
  (`running`, `completed`, `diverged` or `failed`) and its final numbers.
- `metrics(run_id, step, metric, block, value)`: one row per value. Global
  scalars such as `loss` use `block = -1`. SQLite stores a NaN REAL as NULL, so
  NULL in `value` means NaN. Infinities are stored as REAL infinities and read
  back unchanged.
- `events(run_id, step, kind, metric, value, detail)`: spikes, divergence and
  other point events, with a JSON `detail`. A `nonfinite` event marks the
  first NaN or Inf a watch located; its detail has `block`, `position`,
  `direction` and `count`.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from stabiliscope.errors import ConfigError
from stabiliscope.watch.records import Sink, SpikeEvent, StepRecord

logger = logging.getLogger(__name__)

STORE_FILENAME = "store.sqlite"
SCHEMA_VERSION = 1
GLOBAL_BLOCK = -1
"""`block` value of a global scalar such as `loss` or `grad/total`."""

SWEEP_CONFIG_KEY = "sweep_config"
"""`meta` key of the sweep configuration (JSON) that created or last extended the store."""

RUN_STATUSES = ("running", "completed", "diverged", "failed")
FINISHED_STATUSES = ("completed", "diverged")

DEFAULT_TIMEOUT_S = 30.0
"""Seconds a connection waits for another writer's lock before it raises."""

STORE_TABLES = frozenset({"meta", "runs", "metrics", "events"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id           TEXT PRIMARY KEY,
    config           TEXT NOT NULL,
    strategy         TEXT NOT NULL,
    depth            INTEGER NOT NULL,
    width            INTEGER NOT NULL,
    seed             INTEGER NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('running', 'completed', 'diverged', 'failed')),
    diverged_step    INTEGER,
    final_train_loss REAL,
    final_val_loss   REAL,
    spike_count      INTEGER,
    wall_time_s      REAL,
    tokens_per_s     REAL,
    error            TEXT,
    started_at       TEXT NOT NULL,
    finished_at      TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    metric TEXT NOT NULL,
    step   INTEGER NOT NULL,
    block  INTEGER NOT NULL,
    value  REAL,
    PRIMARY KEY (run_id, metric, step, block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY,
    run_id   TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    step     INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    metric   TEXT,
    value    REAL,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, step);
"""


class EmptyStoreError(ConfigError):
    """A store file without any table yet, such as one a starting sweep has just created."""


class EventRow(NamedTuple):
    """One point event of a run, as written to the `events` table."""

    step: int
    kind: str
    metric: str | None = None
    value: float | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunRow:
    """One row of the `runs` table, with the configuration decoded from JSON.

    `final_train_loss` is NaN when the stored value is NaN. `final_val_loss` is
    None when the run has no validation loss (a diverged or unfinished run).
    """

    run_id: str
    config: dict[str, Any]
    strategy: str
    depth: int
    width: int
    seed: int
    status: str
    diverged_step: int | None
    final_train_loss: float | None
    final_val_loss: float | None
    spike_count: int | None
    wall_time_s: float | None
    tokens_per_s: float | None
    error: str | None
    started_at: str
    finished_at: str | None

    @property
    def finished(self) -> bool:
        """True when the run reached its last step or diverged."""
        return self.status in FINISHED_STATUSES


class RunStore:
    """Connection to one sweep's SQLite store.

    Open it with `RunStore.open(sweep_dir)` or `RunStore(path)`, and close it
    with `close()` or a `with` block. Every write method commits its own
    transaction. Opening an existing store writes nothing, so a command that
    fails after opening leaves the file as it was. Raises ConfigError naming
    the file when the file is not a SQLite database, is a SQLite database
    with other tables, or was written with a newer schema.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = DEFAULT_TIMEOUT_S, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        try:
            # Autocommit mode: every write opens its own BEGIN IMMEDIATE
            # transaction (see `_write`), so the busy timeout covers the lock.
            if read_only:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._connection = sqlite3.connect(uri, timeout=timeout_s, uri=True, isolation_level=None)
            else:
                self._connection = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        except sqlite3.Error as error:
            raise ConfigError(f"failed to open run store {str(self.path)!r}: {error}") from error

        try:
            self._check_readable() if read_only else self._initialize()
        except ConfigError:
            self._connection.close()
            raise
        except sqlite3.OperationalError as error:
            self._connection.close()
            if "locked" not in str(error):
                raise
            raise ConfigError(
                f"run store {str(self.path)!r} stayed locked by another process for "
                f"{timeout_s:g} s; wait for that process or pass another sweep folder"
            ) from error
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise ConfigError(
                f"run store {str(self.path)!r} is not a readable SQLite database ({error}); "
                "move it away or pass another sweep folder"
            ) from error

    @classmethod
    def open(cls, sweep_dir: str | Path, *, filename: str = STORE_FILENAME, **kwargs: Any) -> RunStore:
        """Open or create `sweep_dir/filename`, creating the folder when needed."""
        folder = Path(sweep_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder / filename, **kwargs)

    def _table_names(self) -> set[str]:
        rows = self._connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}

    def _check_readable(self) -> None:
        """Check, without writing, that the file is a run store this version can read."""
        version = self._connection.execute("PRAGMA user_version").fetchone()[0]
        tables = self._table_names()
        if version == 0 and not tables:
            raise EmptyStoreError(
                f"run store {str(self.path)!r} is empty; it contains no runs yet"
            )
        if version == 0 or not STORE_TABLES <= tables:
            raise ConfigError(
                f"{str(self.path)!r} is not a stabiliscope run store (no runs table); "
                "pass a folder written by 'stabiliscope sweep'"
            )
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"run store {str(self.path)!r} has schema version {version}, but this "
                f"stabiliscope reads version {SCHEMA_VERSION} at most; upgrade stabiliscope"
            )

    def _initialize(self) -> None:
        connection = self._connection
        connection.execute("PRAGMA foreign_keys = ON")

        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"run store {str(self.path)!r} has schema version {version}, but this "
                f"stabiliscope reads version {SCHEMA_VERSION} at most; upgrade stabiliscope"
            )
        tables = self._table_names()
        if version == 0 and tables:
            raise ConfigError(
                f"{str(self.path)!r} is a SQLite database with other tables "
                f"({', '.join(sorted(tables)[:3])}), not a stabiliscope run store; "
                "move it away or pass another sweep folder"
            )

        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            # SQLite cannot use WAL on some file systems, such as network mounts.
            logger.warning("run store %s uses journal mode %s instead of WAL", self.path, mode)
        # In WAL mode, NORMAL skips the fsync at each commit. A process crash
        # loses nothing, and a power loss can lose the last commits only.
        connection.execute("PRAGMA synchronous = NORMAL")

        if version == 0:
            # A script runs its own transaction, which must not be nested in `_write`.
            connection.executescript(
                f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
            )
        elif not STORE_TABLES <= tables:
            raise ConfigError(
                f"run store {str(self.path)!r} has schema version {version} but lacks the tables "
                f"{', '.join(sorted(STORE_TABLES - tables))}; move it away or pass another sweep folder"
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run the enclosed statements as one transaction that takes the write lock first.

        `BEGIN IMMEDIATE` waits up to the busy timeout for another writer,
        whereas a deferred transaction that upgrades from a read to a write
        can fail at once with "database is locked".
        """
        connection = self._connection
        if connection is None:
            raise ValueError(f"run store {str(self.path)!r} is closed")
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        """Close the connection; later calls do nothing."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Sweep-level entries

    def set_meta(self, key: str, value: Any) -> None:
        """Store `value` as JSON under `key`, replacing an earlier value."""
        with self._write():
            self._connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (key, json.dumps(value, sort_keys=True)),
            )

    def get_meta(self, key: str) -> Any | None:
        """Return the value stored under `key`, or None when there is none."""
        row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    # Run lifecycle

    def begin_run(
        self,
        run_id: str,
        config: dict[str, Any],
        *,
        strategy: str,
        depth: int,
        width: int,
        seed: int,
    ) -> None:
        """Insert `run_id` with status `running`, replacing any earlier attempt.

        The metrics and events of an earlier attempt (a crashed, failed or
        interrupted run) are deleted in the same transaction, so a rerun never
        mixes steps from two attempts.
        """
        with self._write():
            self._delete_run_data(run_id)
            self._connection.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            self._connection.execute(
                "INSERT INTO runs (run_id, config, strategy, depth, width, seed, status, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'running', ?)",
                (run_id, json.dumps(config, sort_keys=True), strategy, depth, width, seed, _now()),
            )

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        diverged_step: int | None,
        final_train_loss: float,
        final_val_loss: float | None,
        spike_count: int,
        wall_time_s: float,
        tokens_per_s: float,
        events: Iterable[EventRow] = (),
    ) -> None:
        """Record the outcome of a run that reached its last step or diverged.

        The status and `events` (such as the `diverged` event) are written in
        one transaction, so a crash never leaves a finished run without them.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(f"finish status must be one of {FINISHED_STATUSES}, got {status!r}")
        with self._write():
            self._insert_events(run_id, events)
            self._connection.execute(
                "UPDATE runs SET status = ?, diverged_step = ?, final_train_loss = ?, "
                "final_val_loss = ?, spike_count = ?, wall_time_s = ?, tokens_per_s = ?, "
                "error = NULL, finished_at = ? WHERE run_id = ?",
                (
                    status,
                    diverged_step,
                    final_train_loss,
                    final_val_loss,
                    spike_count,
                    wall_time_s,
                    tokens_per_s,
                    _now(),
                    run_id,
                ),
            )

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark `run_id` as `failed` with the error text; a later sweep reruns it."""
        with self._write():
            self._connection.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
                (error, _now(), run_id),
            )

    def mark_interrupted(self, run_id: str) -> None:
        """Keep `run_id` as `running` with a note, so a later sweep reruns it."""
        with self._write():
            self._connection.execute(
                "UPDATE runs SET status = 'running', error = 'interrupted before the last step' "
                "WHERE run_id = ?",
                (run_id,),
            )

    def delete_run(self, run_id: str) -> None:
        """Delete `run_id` with its metrics and events."""
        with self._write():
            self._delete_run_data(run_id)
            self._connection.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def _delete_run_data(self, run_id: str) -> None:
        self._connection.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
        self._connection.execute("DELETE FROM events WHERE run_id = ?", (run_id,))

    # Metrics and events

    def write_records(
        self,
        run_id: str,
        records: Sequence[StepRecord],
        spikes: Sequence[SpikeEvent] = (),
    ) -> None:
        """Insert the values of `records` and the `spikes` in one transaction.

        All metric rows go in one `executemany`. A step written twice keeps the
        later values. A record that carries the run's first non-finite
        location adds a `nonfinite` event.
        """
        metric_rows = list(_metric_rows(run_id, records))
        events = [
            EventRow(
                spike.step,
                "spike",
                spike.metric,
                spike.value,
                {"zscore": _json_float(spike.zscore), "median": _json_float(spike.median)},
            )
            for spike in spikes
        ]
        events += [_nonfinite_event(record) for record in records if _first_nonfinite(record) is not None]

        with self._write():
            self._connection.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, metric, step, block, value) "
                "VALUES (?, ?, ?, ?, ?)",
                metric_rows,
            )
            self._insert_events(run_id, events)

    def add_event(
        self,
        run_id: str,
        step: int,
        kind: str,
        *,
        metric: str | None = None,
        value: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Insert one event such as `diverged` for `run_id` at `step`."""
        with self._write():
            self._insert_events(run_id, [EventRow(step, kind, metric, value, detail)])

    def _insert_events(self, run_id: str, events: Iterable[EventRow]) -> None:
        rows = [
            (
                run_id,
                event.step,
                event.kind,
                event.metric,
                event.value,
                None if event.detail is None else json.dumps(event.detail),
            )
            for event in events
        ]
        if rows:
            self._connection.executemany(
                "INSERT INTO events (run_id, step, kind, metric, value, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    # Queries

    def get_run(self, run_id: str) -> RunRow | None:
        """Return the row of `run_id`, or None when the store has no such run."""
        row = self._connection.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return None if row is None else _run_row(row)

    def list_runs(self, statuses: Iterable[str] | None = None) -> list[RunRow]:
        """Return the runs ordered by strategy, depth and seed, optionally filtered by status."""
        rows = self._connection.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY strategy, depth, seed, run_id"
        ).fetchall()
        runs = [_run_row(row) for row in rows]
        if statuses is not None:
            requested = set(statuses)
            runs = [run for run in runs if run.status in requested]
        return runs

    def recorded_steps(self, run_id: str, metric: str) -> list[int]:
        """Return the steps at which `metric` was recorded for `run_id`, ascending."""
        rows = self._connection.execute(
            "SELECT DISTINCT step FROM metrics WHERE run_id = ? AND metric = ? ORDER BY step",
            (run_id, metric),
        ).fetchall()
        return [row[0] for row in rows]

    def last_step(self, run_id: str, metric: str) -> int | None:
        """Return the last step at which `metric` was recorded, or None."""
        row = self._connection.execute(
            "SELECT MAX(step) FROM metrics WHERE run_id = ? AND metric = ?", (run_id, metric)
        ).fetchone()
        return row[0]

    def block_profile(self, run_id: str, metric: str, step: int) -> list[float]:
        """Return the per-block values of `metric` at `step`, indexed by block.

        Returns an empty list when nothing was recorded. A block missing in the
        middle of the profile is returned as NaN.
        """
        rows = self._connection.execute(
            "SELECT block, value FROM metrics "
            "WHERE run_id = ? AND metric = ? AND step = ? AND block >= 0 ORDER BY block",
            (run_id, metric, step),
        ).fetchall()
        if not rows:
            return []
        profile = [math.nan] * (rows[-1][0] + 1)
        for block, value in rows:
            profile[block] = _read_float(value)
        return profile

    def scalar_series(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        """Return `(step, value)` pairs of a global scalar such as `loss`, by step."""
        rows = self._connection.execute(
            "SELECT step, value FROM metrics WHERE run_id = ? AND metric = ? AND block = ? "
            "ORDER BY step",
            (run_id, metric, GLOBAL_BLOCK),
        ).fetchall()
        return [(step, _read_float(value)) for step, value in rows]

    def metric_names(self, run_id: str) -> list[str]:
        """Return the names of every metric recorded for `run_id`, sorted."""
        rows = self._connection.execute(
            "SELECT DISTINCT metric FROM metrics WHERE run_id = ? ORDER BY metric", (run_id,)
        ).fetchall()
        return [row[0] for row in rows]

    def events(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Return the events of `run_id` by step, optionally only those of `kind`."""
        query = "SELECT step, kind, metric, value, detail FROM events WHERE run_id = ?"
        parameters: tuple[Any, ...] = (run_id,)
        if kind is not None:
            query += " AND kind = ?"
            parameters += (kind,)
        rows = self._connection.execute(query + " ORDER BY step, event_id", parameters).fetchall()
        return [
            {
                "step": step,
                "kind": event_kind,
                "metric": metric,
                "value": _read_float(value),
                "detail": None if detail is None else json.loads(detail),
            }
            for step, event_kind, metric, value, detail in rows
        ]


def check_existing_store(path: str | Path) -> None:
    """Raise ConfigError when `path` exists but is not a run store this version can write.

    Reads only, so a command can reject a bad store file before it creates
    anything next to it. An absent or empty file passes, since opening it
    creates a new store.
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        RunStore(path, read_only=True).close()
    except EmptyStoreError:
        return


class StoreSink(Sink):
    """Sink that writes each flush of one run into a `RunStore`.

    `run_id` must already be in the store (see `RunStore.begin_run`). The sink
    does not own the store, so `close()` leaves the connection open for the
    caller, which also records the run's outcome.
    """

    def __init__(self, store: RunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def write(self, records: list[StepRecord], spikes: list[SpikeEvent]) -> None:
        self.store.write_records(self.run_id, records, spikes)


_RUN_COLUMNS = (
    "run_id, config, strategy, depth, width, seed, status, diverged_step, final_train_loss, "
    "final_val_loss, spike_count, wall_time_s, tokens_per_s, error, started_at, finished_at"
)


def _run_row(row: tuple[Any, ...]) -> RunRow:
    (
        run_id,
        config,
        strategy,
        depth,
        width,
        seed,
        status,
        diverged_step,
        final_train_loss,
        final_val_loss,
        spike_count,
        wall_time_s,
        tokens_per_s,
        error,
        started_at,
        finished_at,
    ) = row

    # A finished run always has a train loss, so NULL there is a stored NaN.
    # A NULL validation loss means there was none (a diverged run).
    if final_train_loss is None and status in FINISHED_STATUSES:
        final_train_loss = math.nan

    return RunRow(
        run_id=run_id,
        config=json.loads(config),
        strategy=strategy,
        depth=depth,
        width=width,
        seed=seed,
        status=status,
        diverged_step=diverged_step,
        final_train_loss=final_train_loss,
        final_val_loss=final_val_loss,
        spike_count=spike_count,
        wall_time_s=wall_time_s,
        tokens_per_s=tokens_per_s,
        error=error,
        started_at=started_at,
        finished_at=finished_at,
    )


def _metric_rows(run_id: str, records: Sequence[StepRecord]) -> Iterable[tuple[Any, ...]]:
    for record in records:
        for metric, value in record.scalars.items():
            yield (run_id, metric, record.step, GLOBAL_BLOCK, float(value))
        for metric, values in record.blocks.items():
            for block, value in enumerate(values):
                yield (run_id, metric, record.step, block, float(value))


def _first_nonfinite(record: StepRecord) -> Any:
    return getattr(record, "first_nonfinite", None)


def _nonfinite_event(record: StepRecord) -> EventRow:
    """Return the `nonfinite` event of a record that carries the first NaN or Inf location."""
    location = _first_nonfinite(record)
    detail = {
        "block": location.block,
        "position": location.position,
        "direction": location.direction,
        "count": location.count,
    }
    return EventRow(location.step, "nonfinite", location.position, float(location.count), detail)


def _read_float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _json_float(value: float) -> float | str:
    # JSON has no NaN or Infinity literals, so non-finite numbers become strings.
    return value if math.isfinite(value) else str(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class WatchStoreSink(StoreSink):
    """StoreSink that owns its SQLite file: one run of a user's own training loop.

    On creation it opens (or creates) the store at `path` and begins `run_id`,
    replacing an earlier run of that name. The `strategy` column receives
    `model_name` (the model's class name), and `width` is 0 when the caller
    does not know it. `close()` marks the run completed with the last recorded
    loss and the spike count, then closes the store.
    """

    def __init__(self, path: str | Path, run_id: str, *, model_name: str, depth: int, width: int = 0) -> None:
        store = RunStore(path)
        super().__init__(store, run_id)
        self._started = time.perf_counter()
        self._last_loss = math.nan
        self._spike_count = 0
        store.begin_run(
            run_id,
            {"model": model_name, "source": "watch"},
            strategy=model_name,
            depth=depth,
            width=width,
            seed=0,
        )

    def write(self, records: list[StepRecord], spikes: list[SpikeEvent]) -> None:
        super().write(records, spikes)
        if records:
            self._last_loss = records[-1].scalars.get("loss", math.nan)
        self._spike_count += len(spikes)

    def close(self) -> None:
        if self.store is None:
            return
        self.store.finish_run(
            self.run_id,
            status="completed",
            diverged_step=None,
            final_train_loss=self._last_loss,
            final_val_loss=None,
            spike_count=self._spike_count,
            wall_time_s=time.perf_counter() - self._started,
            tokens_per_s=math.nan,
        )
        self.store.close()
        self.store = None
