"""Destinations of watched records: the SQLite run store and TensorBoard.

The rich progress display lives in `stabiliscope.sinks.console`, which only
the CLI imports.
"""

from stabiliscope.sinks.store import RunRow, RunStore, StoreSink
from stabiliscope.sinks.tensorboard import TensorBoardServer, TensorBoardSink

__all__ = ["RunRow", "RunStore", "StoreSink", "TensorBoardServer", "TensorBoardSink"]
