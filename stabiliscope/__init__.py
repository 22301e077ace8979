"""stabiliscope: training-stability diagnostics for PyTorch transformers.

`watch(model, optimizer)` attaches hooks that record per-block gradient norms,
activation scales and loss spikes; `stabiliscope.models` holds the reference
transformer and its normalization strategies; the `stabiliscope` command runs
depth-scaling sweeps and reports.
"""

from stabiliscope import watch
from stabiliscope.watch import SpikeEvent, StepRecord, Watch

__version__ = "0.1.0"

__all__ = ["SpikeEvent", "StepRecord", "Watch", "__version__", "watch"]
