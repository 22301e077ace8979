"""Packing of one step's device statistics into a single tensor, and unpacking on the host.

The watch concatenates everything a flush step produced into one float32
tensor so that a flush costs one device-to-host copy. `FlushLayout` fixes
the order of the parts; `unpack` turns the host copy back into a
`StepRecord`, spike events and the first non-finite location.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stabiliscope.watch.records import NonfiniteEvent, SpikeEvent, StepRecord

# Stream positions, in forward order inside a block (TransformerLens's names).
POSITIONS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
SPIKE_METRICS = ("loss", "grad/total")
SCALAR_CODES = ("loss", "grad/total")  # codes of the first non-finite scalar


def block_metric_names(roles: tuple[str, ...]) -> tuple[str, ...]:
    """Return every per-block metric `unpack` can record for a model with `roles`."""
    names = [f"grad/{role}" for role in roles]
    names += ["grad/block", "grad/resid_post", "nonfinite/grad_resid_post"]
    for position in POSITIONS:
        names += [f"act/{position}_rms", f"act/{position}_absmax", f"nonfinite/{position}"]
    names += ["attn/logit_max", "attn/entropy"]
    names += [f"update/{role}" for role in roles]
    return tuple(names)


@dataclass
class HostCounts:
    """Element counts known on the host without reading the device."""

    act_elements: np.ndarray  # (positions, blocks): elements measured per position
    attn_rows: np.ndarray  # (blocks,): attention rows measured
    spike_steps: list[int]
    has_update: bool


@dataclass(frozen=True)
class FlushLayout:
    """Sizes of the parts of a packed flush tensor, in packing order.

    Parts, in order:

    - 2 scalars: loss, grad/total;
    - 4 interval extremes: loss max and min, grad/total max and min;
    - the first non-finite scalar as (step, code), -1 when none;
    - role gradient norms (blocks x roles) and block gradient norms;
    - stream gradient sum of squares and non-finite count (2 x blocks);
    - activation sum of squares, max |x| and non-finite count
      (3 x positions x blocks);
    - attention logit max and entropy sum (2 x blocks);
    - update ratios (blocks x roles), only when the optimizer step was seen;
    - spike scores and values (steps x 2 metrics x 4: flag, z-score, median, value).
    """

    depth: int
    roles: tuple[str, ...]

    def unpack(
        self, step: int, host: np.ndarray, counts: HostCounts, every: int, lr: float | None
    ) -> tuple[StepRecord, list[SpikeEvent], NonfiniteEvent | None]:
        """Turn the host copy of a packed flush into a record, spikes and any non-finite event."""
        depth, role_count, positions = self.depth, len(self.roles), len(POSITIONS)
        offset = 0

        def take(count: int) -> np.ndarray:
            nonlocal offset
            chunk = host[offset : offset + count]
            offset += count
            return chunk

        loss, grad_total = take(2)
        interval = take(4)
        first_bad_step, first_bad_code = take(2)
        role_norms = take(depth * role_count).reshape(depth, role_count)
        block_norms = take(depth)
        stream_grad = take(2 * depth).reshape(2, depth)
        act = take(3 * positions * depth).reshape(3, positions, depth)
        attn = take(2 * depth).reshape(2, depth)
        updates = take(depth * role_count).reshape(depth, role_count) if counts.has_update else None
        spike_log = take(len(counts.spike_steps) * len(SPIKE_METRICS) * 4)
        spike_log = spike_log.reshape(len(counts.spike_steps), len(SPIKE_METRICS), 4)

        scalars = {"loss": float(loss), "grad/total": float(grad_total)}
        if every > 1:
            scalars["loss/interval_max"] = float(interval[0])
            scalars["loss/interval_min"] = float(interval[1])
            scalars["grad/total/interval_max"] = float(interval[2])
            scalars["grad/total/interval_min"] = float(interval[3])
        if lr is not None:
            scalars["lr"] = lr

        blocks: dict[str, list[float]] = {}
        for role_index, role in enumerate(self.roles):
            blocks[f"grad/{role}"] = role_norms[:, role_index].tolist()
        blocks["grad/block"] = block_norms.tolist()

        measured = counts.act_elements > 0
        resid_post = POSITIONS.index("resid_post")
        if measured[resid_post].all():
            blocks["grad/resid_post"] = np.sqrt(stream_grad[0]).tolist()
            blocks["nonfinite/grad_resid_post"] = stream_grad[1].tolist()
        for index, position in enumerate(POSITIONS):
            if not measured[index].all():
                continue
            blocks[f"act/{position}_rms"] = np.sqrt(act[0, index] / counts.act_elements[index]).tolist()
            blocks[f"act/{position}_absmax"] = act[1, index].tolist()
            blocks[f"nonfinite/{position}"] = act[2, index].tolist()
        if (counts.attn_rows > 0).all():
            blocks["attn/logit_max"] = attn[0].tolist()
            blocks["attn/entropy"] = (attn[1] / counts.attn_rows).tolist()
        if updates is not None:
            for role_index, role in enumerate(self.roles):
                blocks[f"update/{role}"] = updates[:, role_index].tolist()

        spikes = self._spikes(spike_log, counts.spike_steps)
        nonfinite = self._first_nonfinite(step, act[2], stream_grad[1], measured, first_bad_step, first_bad_code)
        return StepRecord(step=step, scalars=scalars, blocks=blocks), spikes, nonfinite

    @staticmethod
    def _spikes(spike_log: np.ndarray, spike_steps: list[int]) -> list[SpikeEvent]:
        spikes = []
        for row, spike_step in enumerate(spike_steps):
            for metric_index, metric in enumerate(SPIKE_METRICS):
                flag, zscore, median, value = spike_log[row, metric_index]
                if flag < 0.5:
                    continue
                spikes.append(SpikeEvent(spike_step, metric, float(value), float(zscore), float(median)))
        return spikes

    def _first_nonfinite(
        self,
        step: int,
        forward_counts: np.ndarray,
        backward_counts: np.ndarray,
        measured: np.ndarray,
        first_bad_step: float,
        first_bad_code: float,
    ) -> NonfiniteEvent | None:
        """Locate the first NaN or Inf of the interval, in the order the hooks saw them.

        A forward pass visits blocks in order and positions in `POSITIONS`
        order; the backward pass then visits blocks in reverse. A non-finite
        loss or gradient norm seen on an earlier, unmeasured step of the
        interval comes first, without a block.
        """
        if first_bad_step >= 0 and first_bad_step < step:
            return NonfiniteEvent(int(first_bad_step), None, SCALAR_CODES[int(first_bad_code)], _direction(first_bad_code), 1)

        for block in range(self.depth):
            for index, position in enumerate(POSITIONS):
                if measured[index, block] and forward_counts[index, block] > 0:
                    return NonfiniteEvent(step, block, position, "forward", int(forward_counts[index, block]))
        for block in reversed(range(self.depth)):
            if backward_counts[block] > 0:
                return NonfiniteEvent(step, block, "resid_post", "backward", int(backward_counts[block]))

        if first_bad_step == step:
            return NonfiniteEvent(step, None, SCALAR_CODES[int(first_bad_code)], _direction(first_bad_code), 1)
        return None


def _direction(code: float) -> str:
    return "forward" if int(code) == 0 else "backward"
