"""Hugging Face `Trainer` callback that watches the model during `Trainer.train`.

    from stabiliscope.integrations.huggingface import StabiliscopeTrainerCallback

    callback = StabiliscopeTrainerCallback(every=10)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    profile = callback.watch.arrays()["grad/mlp.out"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn

from stabiliscope.watch import Sink, Watch
from stabiliscope.watch.core import resolve_update_every
from stabiliscope.integrations.common import close_watch_and_sinks

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError(
        "StabiliscopeTrainerCallback needs Hugging Face transformers 4.40 or newer; install it with "
        "`pip install 'transformers>=4.40' accelerate` (the `hf` extra)"
    ) from error

__all__ = ["StabiliscopeTrainerCallback"]


class StabiliscopeTrainerCallback(TrainerCallback):
    """Attach a `Watch` to the Trainer's model for the length of `Trainer.train`.

    The watch is created in `on_train_begin` from the `model` and `optimizer`
    the Trainer passes to its callbacks, and closed (hooks removed, sinks
    closed) in `on_train_end`. It stays readable as `callback.watch`
    afterwards. The Trainer sends no event when training raises, so after a
    failed `train()` call `close()` to remove the hooks.

    Steps: `Watch.step` runs in `on_pre_optimizer_step`, which the Trainer
    sends once per optimizer step, after the backward pass of the last of
    the `gradient_accumulation_steps` micro-batches and before the optimizer
    steps. So there is one record per optimizer step, and gradient norms are
    those of the accumulated gradient before clipping. With a version of
    transformers that does not send that event, the watch steps in
    `on_step_end`, after the optimizer step. Record steps count the optimizer steps of this
    `train()` call from 0, so they equal `state.global_step - 1` only for a
    run that does not resume from a checkpoint.

    Loss: the Trainer does not pass the training loss to callbacks. A
    forward hook on the model takes the `loss` from the output of each
    training forward (model in training mode, gradients enabled). When the
    Trainer passed `num_items_in_batch`, the model divided its summed loss by
    the token count of the whole accumulated batch, and the step's loss is
    the sum of its micro-batch losses. Otherwise each is a per-micro-batch
    mean and the step's loss is their mean. In a single process, both match
    the loss the Trainer logs. The loss is NaN when the model returns none, as happens when the
    Trainer computes the loss itself (`label_smoothing_factor` or
    `compute_loss_func`).

    `every`, `sinks` and `watch_options` (such as `name` or
    `spike_threshold`) are passed to `Watch`. `name` defaults to the model's
    class name. An AMP GradScaler held by the Trainer's optimizer is passed to
    the watch as its `scaler`. In multi-process runs every process records,
    but only the process of world rank 0 writes to `sinks`, and the callback
    closes them on the other processes.
    NOTE: multi-process runs are untested. The sinks are closed when training
    ends, so a callback with sinks serves one `train()` call; create a new
    one for the next.
    """

    def __init__(self, every: int = 1, sinks: Sequence[Sink] = (), **watch_options: Any) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer number of steps, got {every!r}")
        resolve_update_every(every, watch_options.get("update_every"))  # fail here, not when training starts
        self.every = every
        self.sinks = list(sinks)
        self.watch_options = watch_options
        self.watch: Watch | None = None

        self._loss_hook = None
        self._losses: list[torch.Tensor] = []
        self._losses_share_count = False
        self._has_pre_optimizer_event = False
        self._sinks_closed = False

    # --------------------------------------------------------------- attach

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs) -> None:
        if model is None:
            raise ValueError("StabiliscopeTrainerCallback needs the Trainer's model, but on_train_begin received model=None")
        if self._sinks_closed and self.sinks:
            raise RuntimeError(
                "this StabiliscopeTrainerCallback closed its sinks when its previous training run ended; "
                "create a new callback with new sinks for each train() call"
            )
        self.close()

        options = dict(self.watch_options)
        options.setdefault("name", type(model).__name__)
        # accelerate wraps the optimizer, and its GradScaler under fp16, in
        # an AcceleratedOptimizer. The watch registers step hooks, which the
        # wrapper does not support (accelerate 1.16), so it gets the torch
        # optimizer inside.
        scaler = getattr(optimizer, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler):
            options.setdefault("scaler", scaler)
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner

        sinks = self.sinks if state.is_world_process_zero else ()
        self.watch = Watch(model, optimizer, every=self.every, sinks=sinks, **options).attach()
        self._loss_hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)
        self._losses = []
        self._losses_share_count = False

    def _capture_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _output_loss(output)
        if loss is None:
            return
        self._losses.append(loss.detach().float())
        if kwargs.get("num_items_in_batch") is not None:
            self._losses_share_count = True

    # ----------------------------------------------------------------- steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self._has_pre_optimizer_event = True
        self._step(args)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if not self._has_pre_optimizer_event:
            self._step(args)

    def _step(self, args) -> None:
        if self.watch is None or not self.watch.attached:
            return
        self.watch.step(self._step_loss(args))
        self._losses = []
        self._losses_share_count = False

    def _step_loss(self, args) -> torch.Tensor | None:
        if not self._losses:
            return None
        losses = torch.stack(self._losses)
        if not self._losses_share_count:
            return losses.mean()

        loss = losses.sum()
        if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
            # The Trainer summed the token count over all processes, and it
            # multiplies the loss by the process count to undo that.
            # NOTE: with tensor parallelism the Trainer divides that factor
            # by the tensor-parallel size, which is not done here.
            loss = loss * args.world_size
        return loss

    # ---------------------------------------------------------------- detach

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks from the model and close the sinks. Safe to call more than once."""
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.watch is None:
            return
        try:
            close_watch_and_sinks(self.watch, self.sinks)
        finally:
            self._sinks_closed = True


def _output_loss(output: Any) -> torch.Tensor | None:
    """Return the scalar loss of a model output: a ModelOutput, a dict, or a tuple led by the loss."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    return None
