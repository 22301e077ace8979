"""stabiliscope: training-stability diagnostics for PyTorch transformers.

`watch(model, optimizer)` attaches hooks that record per-block gradient norms,
activation scales and loss spikes. `stabiliscope.models` contains the reference
transformer and its normalization strategies. The `stabiliscope` command runs
depth-scaling sweeps, reports and probes.
"""

from stabiliscope import watch
from stabiliscope.watch import SpikeEvent, StepRecord, Watch

__version__ = "0.1.0"

__all__ = ["SpikeEvent", "StepRecord", "Watch", "__version__", "watch"]
