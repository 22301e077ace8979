"""Code shared by the framework callbacks."""

from __future__ import annotations

from collections.abc import Sequence

from stabiliscope.watch import Sink, Watch


def close_watch_and_sinks(watch: Watch, sinks: Sequence[Sink]) -> None:
    """Close `watch`, then every sink in `sinks` that the watch did not own and close itself."""
    try:
        watch.close()
    finally:
        for sink in sinks:
            if sink not in watch.sinks:
                sink.close()
