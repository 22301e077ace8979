"""Shards of a sweep grid, and reading every run store of a sweep folder as one.

`--shard K/N` trains a deterministic 1/N of the grid, so that N processes
(for example the tasks of a Slurm job array) can split one sweep. The points
are sorted by depth, strategy name and seed, and shard K takes every N-th
point starting at position K - 1. Each depth is therefore spread over the
shards rather than given to one of them.

Each shard writes its own store file, `store-K-of-N.sqlite`, into the shared
sweep folder, next to the `store.sqlite` of an unsharded run. `SweepReader`
reads all of them as one sweep for `report`, `dashboard` and `probe`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stabiliscope.errors import ConfigError
from stabiliscope.sinks.store import FINISHED_STATUSES, STORE_FILENAME, EmptyStoreError, RunRow, RunStore

logger = logging.getLogger(__name__)

STORE_FILE_PATTERN = re.compile(r"^store(?:-(?P<index>[1-9][0-9]*)-of-(?P<count>[1-9][0-9]*))?\.sqlite$")
"""Names of the run store files of a sweep folder: `store.sqlite` and `store-K-of-N.sqlite`."""

_SHARD_TEXT = re.compile(r"^\s*(?P<index>[+-]?[0-9]+)\s*/\s*(?P<count>[+-]?[0-9]+)\s*$")

PointT = TypeVar("PointT")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1-based, `1 <= index <= count`)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise _invalid_shard(f"{self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse `K/N`; raise ConfigError naming the text and the accepted form."""
        match = _SHARD_TEXT.match(text)
        if match is None:
            raise _invalid_shard(text)
        index, count = int(match["index"]), int(match["count"])
        if count < 1 or not 1 <= index <= count:
            raise _invalid_shard(text)
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def store_filename(self) -> str:
        """File name of this shard's run store, such as `store-2-of-4.sqlite`."""
        return f"store-{self.index}-of-{self.count}.sqlite"

    def select(self, points: Sequence[PointT]) -> list[PointT]:
        """Return this shard's points, in their order in `points`.

        Points need `depth`, `strategy` and `seed` attributes. The choice
        depends only on the set of points, not on their order, so the same
        grid listed in another order splits the same way.
        """
        ranked = sorted(points, key=lambda point: (point.depth, point.strategy, point.seed))
        chosen = set(ranked[self.index - 1 :: self.count])
        return [point for point in points if point in chosen]


def _invalid_shard(text: str) -> ConfigError:
    return ConfigError(f"invalid shard {text!r}; expected K/N with integers 1 <= K <= N, such as 1/4")


def store_filename(shard: Shard | None) -> str:
    """Return the store file name of `shard`, or `store.sqlite` for an unsharded sweep."""
    return STORE_FILENAME if shard is None else shard.store_filename


def find_store_files(folder: str | Path) -> list[Path]:
    """Return the run store files of a sweep folder: `store.sqlite` first, then shards by K and N."""
    folder = Path(folder)
    found: list[tuple[int, int, Path]] = []
    for path in folder.iterdir():
        match = STORE_FILE_PATTERN.match(path.name)
        if match is None or not path.is_file():
            continue
        if match["index"] is None:
            found.append((0, 0, path))
        else:
            found.append((int(match["count"]), int(match["index"]), path))
    return [path for _, _, path in sorted(found)]


class SweepReader:
    """Read-only view of every run store of a sweep folder, as one store.

    It offers the query methods of `RunStore` (`list_runs`, `get_run`,
    `get_meta`, `recorded_steps`, `last_step`, `block_profile`,
    `scalar_series`, `metric_names`, `events`), each read from the store
    that contains the run. When two stores hold a run with the same id (a shard
    rerun under another split), the finished copy wins over an unfinished
    one, and the later finish over an earlier one.
    """

    def __init__(self, folder: str | Path, stores: Sequence[RunStore]) -> None:
        self.folder = Path(folder)
        self.stores = list(stores)
        self._owners: dict[str, tuple[RunRow, RunStore]] = {}
        for store in self.stores:
            for run in store.list_runs():
                self._add_run(run, store)

    @classmethod
    def open(cls, folder: str | Path, *, exclude: Iterable[str] = ()) -> SweepReader:
        """Open every store file of `folder` read-only, except the file names in `exclude`.

        Raises ConfigError when `folder` contains no store file, and when a
        store file is not a readable run store. An empty SQLite file, such as
        the store of a shard that is being created, is skipped.
        """
        folder = Path(folder)
        excluded = set(exclude)
        paths = [path for path in find_store_files(folder) if path.name not in excluded]
        if not paths and not excluded:
            raise ConfigError(
                f"{str(folder)!r} contains no run store ({STORE_FILENAME} or store-K-of-N.sqlite); "
                "pass a folder written by 'stabiliscope sweep'"
            )

        stores: list[RunStore] = []
        try:
            for path in paths:
                try:
                    stores.append(RunStore(path, read_only=True))
                except EmptyStoreError:
                    logger.debug("skipping run store %s, which has no tables yet", path)
        except BaseException:
            for store in stores:
                store.close()
            raise
        return cls(folder, stores)

    def _add_run(self, run: RunRow, store: RunStore) -> None:
        current = self._owners.get(run.run_id)
        if current is not None and current[0].finished and run.finished:
            logger.warning(
                "run %s is finished in both %s and %s; reading the later one",
                run.run_id,
                current[1].path.name,
                store.path.name,
            )
        if current is None or _preference(run) > _preference(current[0]):
            self._owners[run.run_id] = (run, store)

    def _store_of(self, run_id: str) -> RunStore | None:
        owner = self._owners.get(run_id)
        return None if owner is None else owner[1]

    def path_of(self, run_id: str) -> Path | None:
        """Return the store file that contains `run_id`, or None when no store does."""
        store = self._store_of(run_id)
        return None if store is None else store.path

    @property
    def paths(self) -> list[Path]:
        """The store files read, in reading order."""
        return [store.path for store in self.stores]

    @property
    def path(self) -> Path:
        """The one store file read, or the sweep folder when there are several or none, for messages."""
        return self.stores[0].path if len(self.stores) == 1 else self.folder

    def close(self) -> None:
        """Close every store; later calls do nothing."""
        for store in self.stores:
            store.close()

    def __enter__(self) -> SweepReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Queries with the meaning of the RunStore methods of the same name

    def get_meta(self, key: str) -> Any | None:
        for store in self.stores:
            value = store.get_meta(key)
            if value is not None:
                return value
        return None

    def get_run(self, run_id: str) -> RunRow | None:
        owner = self._owners.get(run_id)
        return None if owner is None else owner[0]

    def list_runs(self, statuses: Iterable[str] | None = None) -> list[RunRow]:
        runs = sorted(
            (run for run, _ in self._owners.values()),
            key=lambda run: (run.strategy, run.depth, run.seed, run.run_id),
        )
        if statuses is not None:
            requested = set(statuses)
            runs = [run for run in runs if run.status in requested]
        return runs

    def recorded_steps(self, run_id: str, metric: str) -> list[int]:
        store = self._store_of(run_id)
        return [] if store is None else store.recorded_steps(run_id, metric)

    def last_step(self, run_id: str, metric: str) -> int | None:
        store = self._store_of(run_id)
        return None if store is None else store.last_step(run_id, metric)

    def block_profile(self, run_id: str, metric: str, step: int) -> list[float]:
        store = self._store_of(run_id)
        return [] if store is None else store.block_profile(run_id, metric, step)

    def scalar_series(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        store = self._store_of(run_id)
        return [] if store is None else store.scalar_series(run_id, metric)

    def metric_names(self, run_id: str) -> list[str]:
        store = self._store_of(run_id)
        return [] if store is None else store.metric_names(run_id)

    def events(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        store = self._store_of(run_id)
        return [] if store is None else store.events(run_id, kind)


def finished_runs_in_other_stores(folder: str | Path, own_filename: str) -> dict[str, tuple[RunRow, Path]]:
    """Return the finished runs of the folder's other store files, with the file of each, by run id."""
    with SweepReader.open(folder, exclude=[own_filename]) as reader:
        return {
            run.run_id: (run, reader.path_of(run.run_id))
            for run in reader.list_runs(FINISHED_STATUSES)
        }


def _preference(run: RunRow) -> tuple[bool, str]:
    # ISO 8601 timestamps in UTC compare correctly as text.
    return (run.finished, run.finished_at or run.started_at or "")
