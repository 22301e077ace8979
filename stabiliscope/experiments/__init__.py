"""Experiments built on the trainer: depth-scaling sweeps and their summaries."""

from stabiliscope.experiments.summary import SummaryRow, summarize
from stabiliscope.experiments.sweep import (
    RunOutcome,
    SweepConfig,
    SweepPoint,
    SweepReporter,
    grid,
    make_run_id,
    run_sweep,
)

__all__ = [
    "RunOutcome",
    "SummaryRow",
    "SweepConfig",
    "SweepPoint",
    "SweepReporter",
    "grid",
    "make_run_id",
    "run_sweep",
    "summarize",
]
