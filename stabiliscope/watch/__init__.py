"""Hooks that record per-block statistics of a training run."""

from stabiliscope.watch.core import POSITIONS, Watch, watch
from stabiliscope.watch.discovery import ROLES, ModelMap, discover
from stabiliscope.watch.records import Sink, SpikeEvent, StepRecord

__all__ = ["POSITIONS", "ROLES", "ModelMap", "Sink", "SpikeEvent", "StepRecord", "Watch", "discover", "watch"]
