"""An exclusive lock per run store, so that two sweeps never train into one store at once.

The lock is `flock` on a file next to the store (`store.sqlite.lock`,
`store-2-of-4.sqlite.lock`), held by the sweep's main process for the whole
invocation. The kernel releases it when that process exits, even by SIGKILL,
so a crashed sweep never leaves a stale lock behind. Shards of one sweep lock
different files and run side by side.

Worker processes do not hold the lock. They exit with the main process
instead (see `stabiliscope.experiments.workers`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from stabiliscope.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"

DEFAULT_WAIT_S = 10.0
"""Seconds to wait for the lock, so that a sweep started as another one ends does not fail."""

_POLL_S = 0.2


class StoreLock:
    """Exclusive lock on one run store, taken with a `with` block.

    Raises ConfigError when another process holds the lock for longer than
    `wait_s` seconds, and when the lock file cannot be created.
    """

    def __init__(self, store_path: str | Path, *, wait_s: float = DEFAULT_WAIT_S) -> None:
        self.store_path = Path(store_path)
        self.path = Path(f"{store_path}{LOCK_SUFFIX}")
        self.wait_s = wait_s
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock, polling until `wait_s` has passed."""
        if fcntl is None:
            # NOTE: without flock (Windows), two sweeps into one store are not prevented.
            logger.warning("file locks are not available on this platform; run one sweep per store at a time")
            return
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(
                f"cannot create the lock file {str(self.path)!r}: {error.strerror}; "
                "pass a sweep folder you can write to"
            ) from None

        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(descriptor)
                    raise ConfigError(
                        f"run store {str(self.store_path)!r} is in use by another sweep "
                        f"(lock file {str(self.path)!r}); wait for it to finish, or pass another --out or --shard"
                    ) from None
                time.sleep(_POLL_S)
        self._descriptor = descriptor

    def release(self) -> None:
        """Release the lock; later calls do nothing."""
        if self._descriptor is not None:
            # Closing the descriptor releases the flock.
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
