"""The `Watch`: hooks on a model that record per-block statistics every step.

Data flows one way. Forward and backward hooks write into preallocated device
buffers, and `Watch.step` reduces the parameter gradients and scores spikes on
the device. On a flush step, everything the step produced is packed into one
tensor, copied to the host once, turned into a `StepRecord` and passed to the
sinks. A step that is not a flush step launches kernels and calls no tensor
method that waits for the device. A CPU test checks this with a torch
function mode.
NOTE: no CUDA run has confirmed it with `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from stabiliscope.watch import stats
from stabiliscope.watch.discovery import HookPoint, ModelMap, ParamSlice, discover
from stabiliscope.watch.ranks import RankReducer, is_sharded, local_part
from stabiliscope.watch.flush import POSITIONS, SPIKE_METRICS, FlushLayout, HostCounts
from stabiliscope.watch.records import NonfiniteEvent, Sink, SpikeEvent, StepRecord
from stabiliscope.watch.spikes import SpikeDetector

logger = logging.getLogger(__name__)

RESID_PRE = POSITIONS.index("resid_pre")
RESID_POST = POSITIONS.index("resid_post")


@dataclass
class _Staged:
    """A flush step packed on the device, waiting for its optimizer step or the host copy."""

    step: int
    parts: list[torch.Tensor]
    spikes: torch.Tensor
    counts: HostCounts
    update: torch.Tensor | None = None


class Watch:
    """Per-block gradient and activation statistics of one model.

    Call `step(loss)` once per optimizer step, after the backward pass of the
    last micro-batch. Parameter gradient norms are taken by hooks that run
    when a gradient has been accumulated into `.grad`, so they are the norms
    of the accumulated gradient before any clipping, wherever `step` is called
    relative to `clip_grad_norm_` and `optimizer.step()`. With a `scaler`
    (an AMP `GradScaler`), gradient norms are divided by the loss scale that
    was in force during the backward pass.

    Forward statistics are taken only in training forwards of flush steps: the
    module is in training mode, gradients are enabled, and autograd is not
    recomputing a checkpointed block. `no_grad`, eval and recomputation
    forwards are ignored. Given the `optimizer`, the watch also records the
    learning rate and `update/<role>` across the optimizer step of each flush
    step, or of every `update_every`-th step when that is set (a multiple of
    `every`). A record with update ratios is emitted after its optimizer step.
    Update ratios are the watch's largest cost because they copy every weight
    before the optimizer step. They take about 11 ms of a 0.5 s step of a
    9.6 M parameter model on 2 CPU cores (benchmarks/watch_phases.py), and
    `update_every` saves that cost on the steps it skips.

    Records stay in `records` (unless `keep_records=False`) and go to each
    sink in `sinks` at every flush. `log_dir` adds a TensorBoard sink writing
    into that folder; `store` adds a SQLite run store at that file path, with
    the run named `name`.
    `mapping` places the blocks and roles of a model that no built-in layout
    fits: a dict, the path of a JSON file or a `ModelLayout` (see `discover`).

    In a `torch.distributed` job (DDP, or FSDP2's `fully_shard` over a 1-D
    mesh), `process_group="auto"` reduces the statistics over the default
    group, so every rank records what one process would on the global
    batch, and only rank 0 writes to the sinks. Pass a process group to
    choose another, or None to record each rank on its own.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        name: str = "model",
        every: int = 1,
        update_every: int | None = None,
        sinks: Sequence[Sink] = (),
        log_dir: str | os.PathLike | None = None,
        store: str | os.PathLike | None = None,
        scaler: torch.amp.GradScaler | None = None,
        mapping=None,
        spike_window: int = 64,
        spike_threshold: float = 6.0,
        spike_min_history: int = 16,
        keep_records: bool = True,
        process_group="auto",
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer number of steps, got {every!r}")
        if update_every is not None and optimizer is None:
            raise ValueError(
                "update_every needs the optimizer, because update ratios are measured across its steps: "
                "pass watch(model, optimizer, update_every=...)"
            )
        update_every = resolve_update_every(every, update_every)
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.name = name
        self.every = every
        self.update_every = update_every
        self.sinks = list(sinks)
        self.keep_records = keep_records
        self.model_map: ModelMap = discover(model) if mapping is None else discover(model, mapping=mapping)
        self.records: list[StepRecord] = []
        self.spikes: list[SpikeEvent] = []
        self.first_nonfinite: NonfiniteEvent | None = None

        self._sink_paths = (log_dir, store)
        self._process_group = process_group
        self._spike_settings = (spike_window, spike_threshold, spike_min_history)
        self._handles: list = []
        self._captures: list[tuple[nn.Module, bool]] = []
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
            self._open_sinks()
            self._register_hooks()
        except BaseException:
            self._remove_hooks()
            raise
        logger.debug("watch %r attached: %d blocks, roles %s", self.name, self.depth, self.roles)
        return self

    def _allocate(self) -> None:
        device = next(self.model.parameters()).device
        self._device = device
        depth, role_count = self.depth, len(self.roles)
        self._layout = FlushLayout(depth, tuple(self.roles))

        # Every trainable parameter counts toward grad/total, a block's
        # parameters toward grad/block, and each role slice toward its role.
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        position_of = {id(p): i for i, p in enumerate(self._params)}

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

        # Parameters with a role, and each role slice as a view of its
        # parameter, for update ratios. The weight copies are allocated on the
        # first optimizer step, so a watch without an optimizer costs no memory.
        self._ranks = RankReducer.detect(self._process_group, self._params, device)
        slice_sharded = [is_sharded(part.param) for _, part in self._slices]
        if any(part.dim is not None and sharded for (_, part), sharded in zip(self._slices, slice_sharded)):
            raise ValueError(
                "a fused projection split into roles (such as a fused QKV weight) cannot be measured "
                "when it is sharded; map its roles to separate projections or leave it unsharded"
            )
        self._slice_sharded = torch.tensor(slice_sharded, dtype=torch.bool, device=device)
        self._role_params = [local_part(self._params[i].detach()) for i in sorted(self._slices_of_param)]
        self._role_param_index = {id(self._params[i]): k for k, i in enumerate(sorted(self._slices_of_param))}
        self._slice_views = [part.select(local_part(part.param.detach())) for _, part in self._slices]
        self._weight_copies: list[torch.Tensor] | None = None
        self._copy_slice_views: list[torch.Tensor] = []

        def index_tensor(values: Iterable[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        self._in_block = index_tensor(in_block)
        self._in_block_target = index_tensor(in_block_target)
        self._slice_target = index_tensor(slice_target)
        # Role slices that are a row block of their parameter need their own
        # norm. A slice covering the whole parameter reuses the parameter's.
        self._split_slices_of_param: dict[int, list[int]] = {}
        for slice_index, (param_index, part) in enumerate(self._slices):
            if part.dim is not None:
                self._split_slices_of_param.setdefault(param_index, []).append(slice_index)
        self._fired = [False] * len(self._params)
        self._backward_queued = False
        self._step_closed = False  # step() ran, and no backward pass or optimizer step has ended since
        self._index_cache: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}
        self._grad_sq = torch.zeros(len(self._params), device=device)
        self._slice_sq = torch.zeros(len(self._slices), device=device)
        # On the CPU a host read does not wait for anything, so a non-finite
        # count is only taken when the sum of squares shows one is there.
        self._host_is_device = device.type == "cpu"
        self._no_count = torch.zeros((), device=device)

        # Hooks append 0-d results to these lists; `_stage` reduces them into
        # per-(position, block) values with a few batched kernels.
        # Each entry is (slot, sum of squares, min, max, non-finite count).
        self._act_pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._stream_pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._attn_pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._act_elements = np.zeros((len(POSITIONS), depth), dtype=np.int64)
        self._pre_is_previous_post = np.zeros(depth, dtype=bool)
        self._forward_seen = np.zeros(depth, dtype=bool)  # blocks measured by a forward outside backward
        self._attn_rows = np.zeros(depth, dtype=np.int64)
        self._last_output: tuple[int, torch.Tensor] | None = None
        self._interval = self._fresh_interval()
        self._first_bad = torch.full((2,), -1.0, device=device)  # (step, code) of a non-finite scalar
        self._step_value = torch.zeros((), device=device)
        self._pending_spikes: list[tuple[int, torch.Tensor]] = []
        self._staged: _Staged | None = None
        self._unstaged: tuple | None = None  # the last step() after the last flush step, staged by close()
        self._snapshot: tuple[int, torch.Tensor] | None = None  # (step, squared slice norms before)
        self._pending_update: tuple[int, torch.Tensor] | None = None
        window, threshold, min_history = self._spike_settings
        self._spikes = SpikeDetector(len(SPIKE_METRICS), window, threshold, min_history, device)

    @property
    def writes(self) -> bool:
        """Whether this process hands records to the sinks: in a distributed job only rank 0 does."""
        return self._ranks is None or self._ranks.rank == 0

    def _open_sinks(self) -> None:
        log_dir, store = self._sink_paths
        self._sink_paths = (None, None)
        if not self.writes:
            return
        if log_dir is not None:
            from stabiliscope.sinks.tensorboard import TensorBoardSink

            self.sinks.append(TensorBoardSink(log_dir))
        if store is not None:
            from stabiliscope.sinks.store import WatchStoreSink

            model_name = type(self.model_map.blocks[0].module).__name__
            self.sinks.append(WatchStoreSink(store, self.name, model_name=model_name, depth=self.depth))

    def _fresh_interval(self) -> torch.Tensor:
        return torch.tensor([-math.inf, math.inf, -math.inf, math.inf], device=self._device)

    def _register_hooks(self) -> None:
        for index, param in enumerate(self._params):
            self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(index)))

        for block in self.model_map.blocks:
            b = block.index
            self._handles.append(block.module.register_forward_pre_hook(self._resid_pre_hook(b), with_kwargs=True))
            self._handles.append(block.module.register_forward_hook(self._resid_post_hook(b)))
            for position, module in (("attn_out", block.attn_out), ("mlp_out", block.mlp_out)):
                if module is not None:
                    self._handles.append(module.register_forward_hook(self._output_hook(POSITIONS.index(position), b)))
            if block.resid_mid is not None:
                self._register_point(block.resid_mid, POSITIONS.index("resid_mid"), b)
            if block.attention is not None and hasattr(block.attention, "capture_qk"):
                self._captures.append((block.attention, block.attention.capture_qk))
                block.attention.capture_qk = True
                self._handles.append(block.attention.register_forward_hook(self._attention_hook(b)))

        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_optimizer_step))

    def _register_point(self, point: HookPoint, position: int, block: int) -> None:
        if point.side == "input":
            hook = self._input_hook(position, block)
            self._handles.append(point.module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self._handles.append(point.module.register_forward_hook(self._output_hook(position, block)))

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        captures, self._captures = self._captures, []
        for module, previous in captures:
            module.capture_qk = previous
            module.captured_qk = None

    # ------------------------------------------------------------------ hooks

    def _inverse_scale_squared(self) -> torch.Tensor | None:
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        scale = self.scaler._get_scale_async()
        if scale is None:
            return None
        return scale.float().reciprocal().square()

    def _grad_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._fired[index] = True
            if not self._backward_queued:
                # One batched reduction at the end of the backward pass costs
                # less than a reduction per parameter. It runs before
                # backward() returns, so before any gradient clipping.
                self._backward_queued = True
                _queue_callback(self._queue_after_backward)

        return hook

    def _queue_after_backward(self) -> None:
        # Queued again from a callback, the reduction runs after every callback
        # queued during the backward pass, among them DDP's, which writes the
        # averaged gradients into `.grad`.
        _queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """Take the squared norms of every accumulated gradient and role slice in one batch."""
        self._backward_queued = False
        self._step_closed = False
        kept = [i for i, fired in enumerate(self._fired) if fired and self._params[i].grad is not None]
        if not kept:
            return
        with torch.no_grad():
            grads = {i: local_part(self._params[i].grad) for i in kept}
            split = [(j, i) for i in kept for j in self._split_slices_of_param.get(i, ())]
            tensors = list(grads.values()) + [self._slices[j][1].select(grads[i]) for j, i in split]
            squares = _stacked_squared_norms(tensors, self._device)
            inverse = self._inverse_scale_squared()
            if inverse is not None:
                squares = squares * inverse

            kept_index, whole_slices, whole_params, split_slices = self._batch_indices(kept, split)
            grad_sq = torch.zeros(len(self._params), device=self._device)
            grad_sq.index_copy_(0, kept_index, squares[: len(kept)])
            slice_sq = torch.zeros(len(self._slices), device=self._device)
            slice_sq.index_copy_(0, whole_slices, grad_sq.index_select(0, whole_params))
            slice_sq.index_copy_(0, split_slices, squares[len(kept) :])
        self._grad_sq, self._slice_sq = grad_sq, slice_sq

    def _batch_indices(self, kept: list[int], split: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """Return the index tensors that scatter a batch of norms, cached per set of gradients."""
        key = tuple(kept)
        cached = self._index_cache.get(key)
        if cached is None:
            kept_set = set(kept)
            whole = [(j, i) for j, (i, part) in enumerate(self._slices) if part.dim is None and i in kept_set]

            def index_tensor(values: Iterable[int]) -> torch.Tensor:
                return torch.tensor(list(values), dtype=torch.long, device=self._device)

            cached = (
                index_tensor(kept),
                index_tensor(j for j, _ in whole),
                index_tensor(i for _, i in whole),
                index_tensor(j for j, _ in split),
            )
            self._index_cache[key] = cached
        return cached

    def _recording(self, module: nn.Module, block: int) -> bool:
        if not (module.training and torch.is_grad_enabled() and self._step % self.every == 0):
            return False
        if torch._C._current_graph_task_id() == -1:
            self._forward_seen[block] = True
            return True
        # A forward run by autograd during backward recomputes a checkpointed
        # block. Non-reentrant checkpointing ran the first forward with
        # gradients enabled, and it was measured then. Reentrant checkpointing
        # ran it under no_grad, so the recomputation is the one to measure.
        return not self._forward_seen[block]

    def _measure(self, position: int, block: int, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            values = tensor.detach()
            slot = position * self.depth + block
            sum_sq = stats.sum_of_squares(values)
            low, high = torch.aminmax(values)  # max |x| is taken for the whole batch at flush
            self._act_pending.append((slot, sum_sq, low, high, self._nonfinite_count(values, sum_sq)))
        self._act_elements[position, block] += values.numel()

    def _nonfinite_count(self, tensor: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
        """Count the NaN and Inf elements of `tensor`, given its sum of squares.

        A finite sum of squares means every element is finite. Activations
        are measured only on flush steps, so the host read on the CPU path
        never falls on a step that must not synchronise.
        """
        if self._host_is_device and math.isfinite(sum_sq.item()):
            return self._no_count
        return stats.nonfinite_count(tensor)

    def _resid_pre_hook(self, block: int):
        def hook(module: nn.Module, args, kwargs) -> None:
            if not self._recording(module, block):
                return
            tensor = _first_tensor(args, kwargs)
            if tensor is None:
                return
            previous = self._last_output
            if previous is not None and previous[0] == block - 1 and previous[1] is tensor:
                # The previous block's output, measured already: copied at flush.
                self._pre_is_previous_post[block] = True
                return
            self._measure(RESID_PRE, block, tensor)

        return hook

    def _resid_post_hook(self, block: int):
        def hook(module: nn.Module, args, output) -> None:
            if not self._recording(module, block):
                return
            tensor = _first_tensor((output,), {})
            if tensor is None:
                return
            self._measure(RESID_POST, block, tensor)
            self._last_output = (block, tensor)
            if tensor.requires_grad:
                tensor.register_hook(self._stream_grad_hook(block))

        return hook

    def _output_hook(self, position: int, block: int):
        def hook(module: nn.Module, args, output) -> None:
            if not self._recording(module, block):
                return
            tensor = _first_tensor((output,), {})
            if tensor is not None:
                self._measure(position, block, tensor)

        return hook

    def _input_hook(self, position: int, block: int):
        def hook(module: nn.Module, args, kwargs) -> None:
            if not self._recording(module, block):
                return
            tensor = _first_tensor(args, kwargs)
            if tensor is not None:
                self._measure(position, block, tensor)

        return hook

    def _stream_grad_hook(self, block: int):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                grad_sq = stats.sum_of_squares(grad)
                inverse = self._inverse_scale_squared()
                if inverse is not None:
                    grad_sq = grad_sq * inverse
                count = self._nonfinite_count(grad, grad_sq)
                self._stream_pending.append((block, grad_sq, count))

        return hook

    def _attention_hook(self, block: int):
        def hook(module: nn.Module, args, output) -> None:
            captured = module.captured_qk
            module.captured_qk = None
            if captured is None or not self._recording(module, block):
                return
            # The first sequence of the micro-batch stands for the batch: the
            # full (B, heads, T, T) logits would cost as much as the attention.
            q, k = captured[0][:1], captured[1][:1]
            with torch.no_grad():
                logit_max, entropy = stats.attention_stats(q, k)
            self._attn_pending.append((block, logit_max, entropy))
            self._attn_rows[block] += q.shape[1] * q.shape[2]

        return hook

    # ------------------------------------------------------ optimizer steps

    def _takes_update(self, step: int) -> bool:
        return self.optimizer is not None and step % self.update_every == 0

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        # Right after step(), with no backward pass or optimizer step since, the
        # optimizer step belongs to the step that step() closed, as in the
        # usual loop. Otherwise it belongs to the open step: the loop calls
        # step() after the optimizer, or the optimizer runs a closure that
        # does the forward and backward passes and calls step() (Lightning).
        target = self._step - 1 if self._step_closed else self._step
        self._step_closed = False
        if not self._takes_update(target):
            return
        with torch.no_grad():
            if self._weight_copies is None:
                self._weight_copies = [torch.empty_like(p) for p in self._role_params]
                self._copy_slice_views = [
                    part.select(self._weight_copies[self._role_param_index[id(part.param)]]) for _, part in self._slices
                ]
            # One copy_ per tensor: on CPU faster than _foreach_copy_ (torch 2.13).
            for copy, param in zip(self._weight_copies, self._role_params):
                copy.copy_(param)
            before_sq = _stacked_squared_norms(self._slice_views, self._device)
        self._snapshot = (target, before_sq)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._step_closed = False
        if self._snapshot is None:
            return
        target, before_sq = self._snapshot
        self._snapshot = None
        with torch.no_grad():
            ratios = self._update_ratios(before_sq)
        if self._staged is not None and self._staged.step == target:
            self._staged.update = ratios
            self._emit()
        else:
            self._pending_update = (target, ratios)

    def _update_ratios(self, before_sq: torch.Tensor) -> torch.Tensor:
        """Return ||W_after - W_before||_F / ||W_before||_F per (block, role), flattened.

        The copies taken before the step are overwritten in place with
        `W_before - W_after`, so no tensor of the model's size is allocated.
        """
        torch._foreach_sub_(self._weight_copies, self._role_params)
        change_sq = _stacked_squared_norms(self._copy_slice_views, self._device)
        if self._ranks is not None and self._ranks.any_sharded:
            both = self._ranks.sum_sharded(torch.cat([change_sq, before_sq]), self._slice_sharded.repeat(2))
            change_sq, before_sq = both[: change_sq.numel()], both[change_sq.numel() :]
        size = self.depth * len(self.roles)
        role_change = torch.zeros(size, device=self._device).index_add_(0, self._slice_target, change_sq)
        role_before = torch.zeros(size, device=self._device).index_add_(0, self._slice_target, before_sq)
        return (role_change / role_before).sqrt()

    # ------------------------------------------------------------------- step

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Close one optimizer step: reduce gradient norms, score spikes, flush on schedule.

        `loss` is the step's training loss: a tensor on any device, a float,
        or None when not available. A tensor is read on the device, so
        passing one does not synchronise.
        """
        if not self._handles:
            raise RuntimeError(f"watch {self.name!r} is not attached; call attach() or use it as a context manager")
        if self._staged is not None:
            self._emit()  # its optimizer step never came (for example, skipped by a GradScaler)

        with torch.no_grad():
            grad_sq, slice_sq = self._grad_sq, self._slice_sq
            self._grad_sq = torch.zeros(len(self._params), device=self._device)
            self._slice_sq = torch.zeros(len(self._slices), device=self._device)
            self._fired = [False] * len(self._params)

            loss_value = self._as_device_scalar(loss)
            if self._ranks is not None:
                loss_value, grad_sq, slice_sq = self._ranks.sum_step(loss_value, grad_sq, slice_sq, self._slice_sharded)
            scalars = torch.stack([loss_value, grad_sq.sum().sqrt()])
            self._track_scalars(scalars)
            if self._step % self.every == 0:
                self._stage(self._step, scalars, grad_sq, slice_sq)
                self._unstaged = None
            else:
                self._unstaged = (self._step, scalars, grad_sq, slice_sq)
        self._step += 1
        self._step_closed = True
        self._last_output = None
        self._forward_seen[:] = False

        staged = self._staged
        if staged is not None and (staged.update is not None or not self._takes_update(staged.step)):
            self._emit()

    def _as_device_scalar(self, loss: torch.Tensor | float | None) -> torch.Tensor:
        if loss is None:
            return torch.full((), math.nan, device=self._device)
        if isinstance(loss, torch.Tensor):
            return loss.detach().reshape(()).to(device=self._device, dtype=torch.float32)
        return torch.tensor(float(loss), device=self._device)

    def _track_scalars(self, scalars: torch.Tensor) -> None:
        """Score spikes, update the interval extremes and the first non-finite scalar, on the device."""
        # Each step keeps its values beside their scores, so a spike between
        # flush steps is reported with the value that set it off.
        scores = torch.cat([self._spikes.score(scalars), scalars[:, None]], dim=1)
        self._pending_spikes.append((self._step, scores))

        loss_value, grad_total = scalars[0], scalars[1]
        self._interval = torch.stack(
            [
                torch.fmax(self._interval[0], loss_value),
                torch.fmin(self._interval[1], loss_value),
                torch.fmax(self._interval[2], grad_total),
                torch.fmin(self._interval[3], grad_total),
            ]
        )

        bad_loss = ~torch.isfinite(loss_value)
        bad = bad_loss | ~torch.isfinite(grad_total)
        code = torch.where(bad_loss, 0.0, 1.0)
        first_time = bad & (self._first_bad[0] < 0)
        self._first_bad = torch.where(first_time, torch.stack([self._step_value, code]), self._first_bad)
        self._step_value = self._step_value + 1

    def _stage(self, step: int, scalars: torch.Tensor, grad_sq: torch.Tensor, slice_sq: torch.Tensor) -> None:
        depth, role_count = self.depth, len(self.roles)

        role_sq = torch.zeros(depth * role_count, device=self._device)
        role_sq.index_add_(0, self._slice_target, slice_sq)
        block_sq = torch.zeros(depth, device=self._device)
        block_sq.index_add_(0, self._in_block_target, grad_sq[self._in_block])

        act = self._reduce_activations()
        stream = torch.zeros(2, depth, dtype=torch.float64, device=self._device)
        if self._stream_pending:
            blocks = torch.tensor([b for b, _, _ in self._stream_pending], device=self._device)
            stream[0].index_add_(0, blocks, torch.stack([sq for _, sq, _ in self._stream_pending]).double())
            stream[1].index_add_(0, blocks, torch.stack([n for _, _, n in self._stream_pending]).double())
        attn = torch.zeros(2, depth, dtype=torch.float64, device=self._device)
        if self._attn_pending:
            blocks = torch.tensor([b for b, _, _ in self._attn_pending], device=self._device)
            logit_max = torch.stack([m for _, m, _ in self._attn_pending]).double()
            attn[0].scatter_reduce_(0, blocks, logit_max, reduce="amax")
            attn[1].index_add_(0, blocks, torch.stack([e for _, _, e in self._attn_pending]).double())

        if self._ranks is not None:
            stream, act, attn = self._reduce_across_ranks(stream, act, attn)

        parts = [
            scalars,
            self._interval,
            self._first_bad,
            role_sq.sqrt(),
            block_sq.sqrt(),
            stream.flatten(),
            act.flatten(),
            attn.flatten(),
        ]
        counts = HostCounts(
            act_elements=self._act_elements.copy(),
            attn_rows=self._attn_rows.copy(),
            spike_steps=[s for s, _ in self._pending_spikes],
            has_update=False,
        )
        spikes = torch.stack([scores for _, scores in self._pending_spikes]).flatten()
        self._staged = _Staged(step, parts, spikes, counts)
        if self._pending_update is not None and self._pending_update[0] == step:
            self._staged.update = self._pending_update[1]
        self._pending_update = None
        self._reset_interval()

    def _reduce_across_ranks(self, stream: torch.Tensor, act: torch.Tensor, attn: torch.Tensor):
        """Combine the flush's forward and stream statistics of every rank, and its element counts."""
        world = self._ranks.world
        counts = torch.from_numpy(np.concatenate([self._act_elements.ravel(), self._attn_rows])).to(self._device)
        sums = torch.cat([stream[0] / world**2, stream[1], act[0].flatten(), act[2].flatten(), attn[1], counts.double()])
        maxima = torch.cat([act[1].flatten(), attn[0]])
        sums, maxima = self._ranks.gather_flush(sums, maxima)

        depth, cells = self.depth, act[0].numel()
        stream = torch.stack([sums[:depth], sums[depth : 2 * depth]])
        act_sums = sums[2 * depth : 2 * depth + cells].view_as(act[0])
        act_counts = sums[2 * depth + cells : 2 * depth + 2 * cells].view_as(act[2])
        act = torch.stack([act_sums, maxima[:cells].view_as(act[1]), act_counts])
        attn = torch.stack([maxima[cells:], sums[2 * depth + 2 * cells : 3 * depth + 2 * cells]])

        host_counts = sums[3 * depth + 2 * cells :].cpu().numpy().astype(np.int64)  # a flush step may synchronise
        self._act_elements[:] = host_counts[:cells].reshape(self._act_elements.shape)
        self._attn_rows[:] = host_counts[cells:]
        return stream, act, attn

    def _reduce_activations(self) -> torch.Tensor:
        """Return (3, positions, blocks): summed squares, max |x| and non-finite counts, float64."""
        depth = self.depth
        act = torch.zeros(3, len(POSITIONS) * depth, dtype=torch.float64, device=self._device)
        if self._act_pending:
            slots, sums, lows, highs, counts = zip(*self._act_pending)
            slots = torch.tensor(slots, device=self._device)
            abs_max = torch.maximum(torch.stack(lows).double().abs(), torch.stack(highs).double().abs())
            act[0].index_add_(0, slots, torch.stack(sums).double())
            act[1].scatter_reduce_(0, slots, abs_max, "amax")
            act[2].index_add_(0, slots, torch.stack(counts).double())
        act = act.view(3, len(POSITIONS), depth)

        aliased = np.flatnonzero(self._pre_is_previous_post)
        if aliased.size:
            act[:, RESID_PRE, aliased] = act[:, RESID_POST, aliased - 1]
            self._act_elements[RESID_PRE, aliased] = self._act_elements[RESID_POST, aliased - 1]
        return act

    def _reset_interval(self) -> None:
        self._pending_spikes = []
        self._interval = self._fresh_interval()
        self._act_pending = []
        self._stream_pending = []
        self._attn_pending = []
        self._act_elements[:] = 0
        self._attn_rows[:] = 0
        self._pre_is_previous_post[:] = False

    def _emit(self) -> None:
        """Copy the staged flush to the host once and hand its record to the sinks."""
        staged, self._staged = self._staged, None
        parts = list(staged.parts)
        if staged.update is not None:
            parts.append(staged.update)
            staged.counts.has_update = True
        parts.append(staged.spikes)
        packed = torch.cat([part.double() for part in parts])
        host = packed.cpu().numpy()  # the one device-to-host copy

        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None
        record, spikes, nonfinite = self._layout.unpack(staged.step, host, staged.counts, self.every, lr)
        if nonfinite is not None and self.first_nonfinite is None:
            self.first_nonfinite = nonfinite
            record = StepRecord(record.step, record.scalars, record.blocks, first_nonfinite=nonfinite)
            logger.warning(
                "%s: first non-finite value at step %d, block %s, %s (%s, %d elements)",
                self.name, nonfinite.step, nonfinite.block, nonfinite.position, nonfinite.direction, nonfinite.count,
            )

        if self.keep_records:
            self.records.append(record)
        self.spikes.extend(spikes)
        for spike in spikes:
            logger.info(
                "%s: %s spike at step %d: %.4g (median %.4g, robust z %.1f)",
                self.name, spike.metric, spike.step, spike.value, spike.median, spike.zscore,
            )
        if self.writes:
            for sink in self.sinks:
                sink.write([record], spikes)

    # --------------------------------------------------------------- teardown

    def close(self) -> None:
        """Emit a waiting record, remove every hook and close the sinks; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._handles and self._staged is not None:
                self._emit()
            if self._handles and self._unstaged is not None:
                # One closing record keeps the loss, gradient norms, interval
                # extremes and spikes of the steps after the last flush step.
                with torch.no_grad():
                    self._stage(*self._unstaged)
                self._unstaged = None
                self._emit()
        finally:
            self._remove_hooks()
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> "Watch":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._staged = None  # do not hand a half-finished step to the sinks
            self._unstaged = None
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


def resolve_update_every(every: int, update_every) -> int:
    """Return the step interval of update ratios: `update_every`, or `every` when it is None.

    Raises ValueError unless `update_every` is None or a positive integer
    multiple of `every`, so that update ratios fall on flush steps.
    """
    if update_every is None:
        return every
    if isinstance(update_every, numbers.Integral) and not isinstance(update_every, bool):
        if update_every >= 1 and update_every % every == 0:
            return int(update_every)
    raise ValueError(
        f"update_every must be None or a positive integer that is a multiple of every ({every}), "
        f"got {update_every!r}"
    )


def _queue_callback(callback) -> None:
    """Run `callback` when the running backward pass ends, before `backward()` returns."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _stacked_squared_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Return the squared Frobenius norms of `tensors` as one float32 vector."""
    if not tensors:
        return torch.zeros(0, device=device)
    # One dot product per float32 tensor costs less on CPU than one
    # _foreach_norm call over the list (torch 2.13, a 9.6 M-parameter model).
    return torch.stack([stats.sum_of_squares(tensor).to(device, non_blocking=True) for tensor in tensors])


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    """Return the first tensor among positional arguments (or tuple outputs), then keyword values."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **options) -> Watch:
    """Attach a `Watch` to `model` and return it; use it as a context manager to detach.

    `options` are the keyword arguments of `Watch` (`name`, `every`,
    `update_every`, `sinks`, `log_dir`, `store`, `scaler`, `mapping`, spike
    settings, `keep_records`, `process_group`).
    """
    return Watch(model, optimizer, **options).attach()
