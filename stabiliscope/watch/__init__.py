"""Hooks that record per-block statistics of a training run.

`stabiliscope.watch` is both this package and the function that attaches a
watch: calling the module calls `watch()`. The package's `__class__` is a
callable module type, so `stabiliscope.watch(model)` and imports of its
submodules (`stabiliscope.watch.discovery`) both work.
"""

import sys
import types

from stabiliscope.watch.core import POSITIONS, Watch, watch
from stabiliscope.watch.discovery import ROLES, ModelMap, ParamSlice, discover
from stabiliscope.watch.records import Sink, SpikeEvent, StepRecord

__all__ = [
    "POSITIONS",
    "ROLES",
    "ModelMap",
    "ParamSlice",
    "Sink",
    "SpikeEvent",
    "StepRecord",
    "Watch",
    "discover",
    "watch",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Watch:
        return watch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
