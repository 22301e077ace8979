"""The `Watch`: hooks on a model that record per-block statistics every step.

Data flows one way. Forward and backward hooks write into preallocated device
buffers, and `Watch.step` reduces the parameter gradients and scores spikes on
the device. On a flush step, everything the step produced is packed into one
tensor, copied to the host once, turned into a `StepRecord` and passed to the
sinks. A step that is not a flush step launches kernels but never waits
for the device.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from stabiliscope.watch.discovery import ModelMap, ParamSlice, discover
from stabiliscope.watch.records import Sink, SpikeEvent, StepRecord
from stabiliscope.watch.spikes import SpikeDetector

logger = logging.getLogger(__name__)

# Stream positions whose activations are measured, in TransformerLens's names.
POSITIONS = ("attn_out", "mlp_out", "resid_post")
SPIKE_METRICS = ("loss", "grad/total")


class Watch:
    """Per-block gradient and activation statistics of one model.

    Call `step(loss)` once per optimizer step, after the backward pass of the
    last micro-batch. Parameter gradient norms are taken by hooks that run
    when a gradient has been accumulated into `.grad`, so they are the norms
    of the accumulated gradient before any clipping, wherever `step` is called
    relative to `clip_grad_norm_` and `optimizer.step()`.

    Forward statistics are taken only in training forwards (module in training
    mode with gradients enabled) of flush steps; `no_grad` and eval forwards
    are ignored. Records stay in `records` (unless `keep_records=False`) and
    go to each sink in `sinks` at every flush.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        name: str = "model",
        every: int = 1,
        sinks: Sequence[Sink] = (),
        spike_window: int = 64,
        spike_threshold: float = 6.0,
        spike_min_history: int = 16,
        keep_records: bool = True,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer number of steps, got {every!r}")
        self.model = model
        self.optimizer = optimizer
        self.name = name
        self.every = every
        self.sinks = list(sinks)
        self.keep_records = keep_records
        self.model_map: ModelMap = discover(model)
        self.records: list[StepRecord] = []
        self.spikes: list[SpikeEvent] = []

        self._spike_settings = (spike_window, spike_threshold, spike_min_history)
        self._handles: list = []
        self._step = 0
        self._closed = False

    # ----------------------------------------------------------------- set-up

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def depth(self) -> int:
        return len(self.model_map.blocks)

    @property
    def roles(self) -> list[str]:
        return self.model_map.roles

    def describe(self) -> str:
        """Return what discovery found, block by block."""
        return self.model_map.describe()

    def attach(self) -> "Watch":
        """Register every hook and allocate the device buffers; idempotent."""
        if self._closed:
            raise RuntimeError(f"watch {self.name!r} was closed; create a new one to watch again")
        if self._handles:
            return self

        self._allocate()
        try:
            self._register_hooks()
        except BaseException:
            self._remove_hooks()
            raise
        logger.debug("watch %r attached: %d blocks, roles %s", self.name, self.depth, self.roles)
        return self

    def _allocate(self) -> None:
        first_param = next(self.model.parameters())
        device = first_param.device
        self._device = device

        # Every trainable parameter counts toward grad/total, a block's
        # parameters toward grad/block, and each role slice toward its role.
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        position_of = {id(p): i for i, p in enumerate(self._params)}
        role_count = len(self.roles)

        in_block, in_block_target = [], []
        for block in self.model_map.blocks:
            for param in block.module.parameters():
                if id(param) in position_of:
                    in_block.append(position_of[id(param)])
                    in_block_target.append(block.index)

        self._slices: list[tuple[int, ParamSlice]] = []
        slice_target = []
        for block in self.model_map.blocks:
            for role_index, role in enumerate(self.roles):
                for part in block.params.get(role, []):
                    if id(part.param) in position_of:
                        self._slices.append((position_of[id(part.param)], part))
                        slice_target.append(block.index * role_count + role_index)
        self._slices_of_param: dict[int, list[int]] = {}
        for slice_index, (param_index, _) in enumerate(self._slices):
            self._slices_of_param.setdefault(param_index, []).append(slice_index)

        def index_tensor(values: Iterable[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        self._in_block = index_tensor(in_block)
        self._in_block_target = index_tensor(in_block_target)
        self._slice_target = index_tensor(slice_target)
        self._grad_sq: list[torch.Tensor | None] = [None] * len(self._params)
        self._slice_sq: list[torch.Tensor | None] = [None] * len(self._slices)
        self._zero = torch.zeros((), device=device)

        depth = self.depth
        self._resid_grad_sq = torch.zeros(depth, device=device)
        self._act_sumsq = torch.zeros(len(POSITIONS), depth, device=device)
        self._act_absmax = torch.zeros(len(POSITIONS), depth, device=device)
        self._act_count = np.zeros((len(POSITIONS), depth), dtype=np.int64)  # host: shapes are known there
        self._interval = torch.tensor([-math.inf, math.inf, -math.inf, math.inf], device=device)
        self._pending_spikes: list[tuple[int, torch.Tensor]] = []
        window, threshold, min_history = self._spike_settings
        self._spikes = SpikeDetector(len(SPIKE_METRICS), window, threshold, min_history, device)

    def _register_hooks(self) -> None:
        for index, param in enumerate(self._params):
            self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(index)))

        for block in self.model_map.blocks:
            targets = {"attn_out": block.attn_out, "mlp_out": block.mlp_out, "resid_post": block.module}
            for position_index, position in enumerate(POSITIONS):
                module = targets[position]
                if module is None:
                    continue
                hook = self._forward_hook(position_index, block.index, track_grad=position == "resid_post")
                self._handles.append(module.register_forward_hook(hook))

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # ------------------------------------------------------------------ hooks

    def _grad_hook(self, index: int):
        slices = [(j, self._slices[j][1]) for j in self._slices_of_param.get(index, [])]

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            with torch.no_grad():
                whole = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
                self._grad_sq[index] = whole
                for slice_index, part in slices:
                    if part.dim is None:
                        self._slice_sq[slice_index] = whole
                    else:
                        part_grad = part.select(grad)
                        self._slice_sq[slice_index] = torch.linalg.vector_norm(part_grad, dtype=torch.float32).square()

        return hook

    def _recording(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self._step % self.every == 0

    def _forward_hook(self, position_index: int, block_index: int, track_grad: bool):
        def hook(module: nn.Module, args, output) -> None:
            if not self._recording(module):
                return
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(tensor, torch.Tensor):
                return

            with torch.no_grad():
                values = tensor.detach()
                sumsq = torch.linalg.vector_norm(values, dtype=torch.float32).square()
                absmax = torch.linalg.vector_norm(values, ord=math.inf, dtype=torch.float32)
                self._act_sumsq[position_index, block_index].add_(sumsq)
                current = self._act_absmax[position_index, block_index]
                current.copy_(torch.maximum(current, absmax))
            self._act_count[position_index, block_index] += values.numel()

            if track_grad and tensor.requires_grad:
                tensor.register_hook(self._stream_grad_hook(block_index))

        return hook

    def _stream_grad_hook(self, block_index: int):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                self._resid_grad_sq[block_index].add_(torch.linalg.vector_norm(grad, dtype=torch.float32).square())

        return hook

    # ------------------------------------------------------------------- step

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Close one optimizer step: reduce gradient norms, score spikes, flush on schedule.

        `loss` is the step's training loss: a tensor on any device, a float,
        or None when not available. A tensor is read on the device, so
        passing one does not synchronise.
        """
        if not self._handles:
            raise RuntimeError(f"watch {self.name!r} is not attached; call attach() or use it as a context manager")

        with torch.no_grad():
            grad_sq = torch.stack([self._zero if sq is None else sq for sq in self._grad_sq])
            slice_sq = torch.stack([self._zero if sq is None else sq for sq in self._slice_sq] or [self._zero])[
                : len(self._slices)
            ]
            self._grad_sq = [None] * len(self._params)
            self._slice_sq = [None] * len(self._slices)
            loss_value = self._as_device_scalar(loss)
            scalars = torch.stack([loss_value, grad_sq.sum().sqrt()])

            spike_scores = self._spikes.score(scalars)
            self._pending_spikes.append((self._step, spike_scores))
            extremes = torch.stack([scalars[0], scalars[0], scalars[1], scalars[1]])
            self._interval = torch.stack(
                [
                    torch.fmax(self._interval[0], extremes[0]),
                    torch.fmin(self._interval[1], extremes[1]),
                    torch.fmax(self._interval[2], extremes[2]),
                    torch.fmin(self._interval[3], extremes[3]),
                ]
            )

            if self._step % self.every == 0:
                self._flush(self._step, scalars, grad_sq, slice_sq)
        self._step += 1

    def _as_device_scalar(self, loss: torch.Tensor | float | None) -> torch.Tensor:
        if loss is None:
            return torch.full((), math.nan, device=self._device)
        if isinstance(loss, torch.Tensor):
            return loss.detach().reshape(()).to(device=self._device, dtype=torch.float32)
        return torch.tensor(float(loss), device=self._device)

    def _flush(self, step: int, scalars: torch.Tensor, grad_sq: torch.Tensor, slice_sq: torch.Tensor) -> None:
        depth, role_count = self.depth, len(self.roles)

        role_sq = torch.zeros(depth * role_count, device=self._device)
        role_sq.index_add_(0, self._slice_target, slice_sq)
        block_sq = torch.zeros(depth, device=self._device)
        block_sq.index_add_(0, self._in_block_target, grad_sq[self._in_block])
        spike_log = torch.stack([scores for _, scores in self._pending_spikes])

        packed = torch.cat(
            [
                scalars,
                self._interval,
                role_sq.sqrt(),
                block_sq.sqrt(),
                self._resid_grad_sq.sqrt(),
                self._act_sumsq.flatten(),
                self._act_absmax.flatten(),
                spike_log.flatten(),
            ]
        )
        host = packed.cpu().numpy().astype(np.float64)  # the one device-to-host copy
        record, spikes = self._unpack(step, host, [s for s, _ in self._pending_spikes])
        self._reset_interval()

        if self.keep_records:
            self.records.append(record)
        self.spikes.extend(spikes)
        for spike in spikes:
            logger.info(
                "%s: %s spike at step %d: %.4g (median %.4g, robust z %.1f)",
                self.name, spike.metric, spike.step, spike.value, spike.median, spike.zscore,
            )
        for sink in self.sinks:
            sink.write([record], spikes)

    def _unpack(self, step: int, host: np.ndarray, spike_steps: list[int]) -> tuple[StepRecord, list[SpikeEvent]]:
        depth, role_count, positions = self.depth, len(self.roles), len(POSITIONS)
        offset = 0

        def take(count: int) -> np.ndarray:
            nonlocal offset
            chunk = host[offset : offset + count]
            offset += count
            return chunk

        loss, grad_total = take(2)
        interval = take(4)
        role_norms = take(depth * role_count).reshape(depth, role_count)
        block_norms = take(depth)
        resid_grad = take(depth)
        act_sumsq = take(positions * depth).reshape(positions, depth)
        act_absmax = take(positions * depth).reshape(positions, depth)
        spike_log = take(len(spike_steps) * len(SPIKE_METRICS) * 3).reshape(len(spike_steps), len(SPIKE_METRICS), 3)

        scalars = {"loss": float(loss), "grad/total": float(grad_total)}
        if self.every > 1:
            scalars["loss/interval_max"] = float(interval[0])
            scalars["loss/interval_min"] = float(interval[1])
            scalars["grad/total/interval_max"] = float(interval[2])
            scalars["grad/total/interval_min"] = float(interval[3])
        if self.optimizer is not None:
            scalars["lr"] = float(self.optimizer.param_groups[0]["lr"])

        blocks: dict[str, list[float]] = {}
        for role_index, role in enumerate(self.roles):
            blocks[f"grad/{role}"] = role_norms[:, role_index].tolist()
        blocks["grad/block"] = block_norms.tolist()
        if self._act_count[POSITIONS.index("resid_post")].all():
            blocks["grad/resid_post"] = resid_grad.tolist()
        for position_index, position in enumerate(POSITIONS):
            counts = self._act_count[position_index]
            if not counts.all():
                continue
            blocks[f"act/{position}_rms"] = np.sqrt(act_sumsq[position_index] / counts).tolist()
            blocks[f"act/{position}_absmax"] = act_absmax[position_index].tolist()

        spikes = []
        for row, spike_step in enumerate(spike_steps):
            for metric_index, metric in enumerate(SPIKE_METRICS):
                flag, zscore, median = spike_log[row, metric_index]
                if flag > 0.5:
                    value = scalars["loss"] if metric == "loss" else scalars["grad/total"]
                    if spike_step != step:
                        value = math.nan  # only the extremes of earlier steps in the interval are kept
                    spikes.append(SpikeEvent(spike_step, metric, value, float(zscore), float(median)))
        return StepRecord(step=step, scalars=scalars, blocks=blocks), spikes

    def _reset_interval(self) -> None:
        self._pending_spikes = []
        self._interval = torch.tensor([-math.inf, math.inf, -math.inf, math.inf], device=self._device)
        self._resid_grad_sq.zero_()
        self._act_sumsq.zero_()
        self._act_absmax.zero_()
        self._act_count[:] = 0

    # --------------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove every hook and close the sinks; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            self._remove_hooks()
        finally:
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> "Watch":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # --------------------------------------------------------------- analysis

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the in-memory records as arrays.

        `"step"` maps to the recorded step numbers; each scalar metric to an
        array of shape (records,); each per-block metric to shape
        (records, blocks). A value missing from a record is NaN.
        """
        steps = np.array([r.step for r in self.records], dtype=np.int64)
        result: dict[str, np.ndarray] = {"step": steps}
        scalar_names = sorted({name for r in self.records for name in r.scalars})
        block_names = sorted({name for r in self.records for name in r.blocks})
        for name in scalar_names:
            result[name] = np.array([r.scalars.get(name, math.nan) for r in self.records], dtype=np.float64)
        for name in block_names:
            rows = [r.blocks.get(name, [math.nan] * self.depth) for r in self.records]
            result[name] = np.array(rows, dtype=np.float64).reshape(len(self.records), self.depth)
        return result


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **options) -> Watch:
    """Attach a `Watch` to `model` and return it; use it as a context manager to detach.

    `options` are the keyword arguments of `Watch` (`name`, `every`, `sinks`,
    spike settings, `keep_records`).
    """
    return Watch(model, optimizer, **options).attach()
