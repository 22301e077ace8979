"""Host-side records produced by a watch flush.

A `StepRecord` contains the statistics of one optimizer step after they were copied
from the device. Per-block metrics are lists indexed by block (layer) index,
block 0 being the one closest to the embedding. A metric the model does not
expose is absent from the dictionaries rather than stored as a placeholder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NonfiniteEvent:
    """The first NaN or Inf a watch saw.

    `position` is a stream position (`resid_pre`, ..., `resid_post`). When the
    value was only seen in a global scalar, it is `loss` or `grad/total`, and
    `block` is None. `direction` is "forward" for activations and the
    loss, "backward" for gradients. `count` is the number of non-finite
    elements at that place in that step (1 for a scalar).
    """

    step: int
    block: int | None
    position: str
    direction: str
    count: int


@dataclass(frozen=True)
class StepRecord:
    """Statistics of one optimizer step.

    `step` counts optimizer steps from 0; step 0 carries the gradients taken at
    initialization, before any update. `scalars` contains the global metrics
    (`loss`, `grad/total` and, when the watch logs every N > 1 steps, the
    interval extremes `loss/interval_max`, `loss/interval_min`,
    `grad/total/interval_max`, `grad/total/interval_min`). `blocks` maps a
    per-block metric name such as `grad/mlp.out` or `act/resid_post_rms` to one
    value per block.
    """

    step: int
    scalars: dict[str, float]
    blocks: dict[str, list[float]] = field(default_factory=dict)
    # Set on the first record of a run that saw a NaN or Inf.
    first_nonfinite: NonfiniteEvent | None = None

    def is_finite(self) -> bool:
        """Return True when every recorded value is finite."""
        values = list(self.scalars.values())
        for per_block in self.blocks.values():
            values.extend(per_block)
        return all(math.isfinite(v) for v in values)


@dataclass(frozen=True)
class SpikeEvent:
    """A loss or `grad/total` value whose robust z-score exceeded the threshold.

    `zscore` is `(value - median) / (1.4826 * MAD)` over the trailing window of
    that metric (Iglewicz and Hoaglin 1993, modified z-score with the normal
    consistency constant). `median` is the window median it was compared with.
    """

    step: int
    metric: str
    value: float
    zscore: float
    median: float


class Sink:
    """Destination for flushed records: TensorBoard, a SQLite store, memory.

    `write` receives the records of one flush in step order, together with the
    spike events detected since the previous flush. Sinks must accept
    non-finite values without raising.
    """

    def write(self, records: list[StepRecord], spikes: list[SpikeEvent]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release resources; the default does nothing."""
