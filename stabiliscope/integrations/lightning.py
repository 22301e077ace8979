"""Lightning callback that watches a LightningModule during `Trainer.fit`.

    from stabiliscope.integrations.lightning import StabiliscopeCallback

    callback = StabiliscopeCallback(every=10)
    lightning.Trainer(callbacks=[callback]).fit(module, loader)
    profile = callback.watch.arrays()["grad/mlp.out"]

The callback works with `lightning.pytorch` (the `lightning` package, 2.2 or
newer). Its `Trainer` rejects callbacks of the standalone `pytorch_lightning`
package and the other way round, so this one is for `lightning.pytorch` only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from stabiliscope.errors import DiscoveryError
from stabiliscope.watch import Sink, Watch
from stabiliscope.watch.core import resolve_update_every
from stabiliscope.integrations.common import close_watch_and_sinks

try:
    import lightning.pytorch as pl
except ImportError as error:
    raise ImportError(
        "StabiliscopeCallback needs Lightning 2.2 or newer; install it with "
        "`pip install 'lightning>=2.2'` (the `lightning` extra)"
    ) from error

__all__ = ["StabiliscopeCallback"]


class StabiliscopeCallback(pl.Callback):
    """Attach a `Watch` to the LightningModule for the length of each `fit`.

    The watch is created in `on_fit_start`, after Lightning has set up the
    optimizers, and closed (hooks removed, sinks closed) in `on_fit_end`, or
    in `on_exception` when the fit fails or is interrupted. It stays
    readable as `callback.watch` afterwards.

    Steps: `Watch.step` runs in `on_before_optimizer_step`, which Lightning
    calls once per optimizer step, after the backward pass of the last
    micro-batch of an `accumulate_grad_batches` window and before gradient
    clipping. So there is one record per optimizer step, and gradient norms
    are those of the accumulated gradient before clipping. Record steps count
    the optimizer steps of this fit from 0. They equal `trainer.global_step`
    before its optimizer step only for a fit that does not resume from a
    checkpoint.

    Loss: `on_before_backward` receives each micro-batch's loss as it enters
    the backward pass. In automatic optimization that is the `training_step`
    loss divided by `accumulate_grad_batches`, so the recorded loss is the
    mean `training_step` loss over the micro-batches of the step. In manual
    optimization it is the sum of the losses passed to `manual_backward`
    since the previous step. A loss scaled by an AMP GradScaler
    (`precision="16-mixed"`) is divided by the scale again, and that scaler
    is passed to the watch so that gradient norms are unscaled as well.

    Model: the watch attaches to the LightningModule, where discovery finds
    the transformer's blocks inside it (such as in a `self.model`), or to
    the submodule at the dotted path `module` when it is given. Use `module`
    when the LightningModule contains several transformers.

    `every`, `sinks` and `watch_options` (such as `spike_threshold` or
    `mapping`) are passed to `Watch`. `name` defaults to the LightningModule's
    class name. In multi-process runs every process records, but only the
    process of global rank 0 writes to `sinks`, and the callback closes
    them on the other processes.
    NOTE: multi-process runs are untested. The sinks are closed when the fit ends, so
    a callback with sinks serves one fit; create a new one for the next.
    """

    def __init__(
        self,
        every: int = 1,
        sinks: Sequence[Sink] = (),
        name: str | None = None,
        *,
        module: str | None = None,
        **watch_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer number of steps, got {every!r}")
        resolve_update_every(every, watch_options.get("update_every"))  # fail here, not when training starts
        self.every = every
        self.sinks = list(sinks)
        self.name = name
        self.module = module
        self.watch_options = watch_options
        self.watch: Watch | None = None

        self._optimizer: torch.optim.Optimizer | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._loss_sum: torch.Tensor | None = None
        self._backward_count = 0
        self._sinks_closed = False

    # --------------------------------------------------------------- attach

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sinks_closed and self.sinks:
            raise RuntimeError(
                "this StabiliscopeCallback closed its sinks when its previous fit ended; "
                "create a new callback with new sinks for each fit"
            )
        self._close()

        options = dict(self.watch_options)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            options.setdefault("scaler", scaler)
        self._scaler = options.get("scaler")
        self._optimizer = trainer.optimizers[0] if trainer.optimizers else None

        target = _find_watched_module(pl_module, self.module)
        self.watch = Watch(
            target,
            self._optimizer,
            name=self.name or type(pl_module).__name__,
            every=self.every,
            sinks=self.sinks if trainer.is_global_zero else (),
            **options,
        ).attach()
        self._loss_sum = None
        self._backward_count = 0

    # ----------------------------------------------------------------- steps

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.watch is None or not self.watch.attached:
            return
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._backward_count += 1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.watch is None or not self.watch.attached:
            return
        # With several optimizers (manual optimization), the watch follows
        # the first one, so the steps of the others are not recorded.
        if self._optimizer is not None and _unwrap_optimizer(optimizer) is not self._optimizer:
            return
        self.watch.step(self._step_loss(trainer, pl_module))
        self._loss_sum = None
        self._backward_count = 0

    def _step_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        if self._loss_sum is None:
            return None
        loss = self._loss_sum
        if self._scaler is not None and self._scaler.is_enabled():
            # The scale stays fixed from the backward passes until
            # `scaler.update()` after the optimizer step. The private async
            # getter returns it as a device tensor without waiting for the device.
            scale = self._scaler._get_scale_async()
            if scale is not None:
                loss = loss / scale.float()
        if pl_module.automatic_optimization:
            # Each backward loss is the training_step loss divided by
            # accumulate_grad_batches, also in a shorter last window of an epoch
            # (Lightning 2.6).
            loss = loss * (trainer.accumulate_grad_batches / self._backward_count)
        return loss

    # ---------------------------------------------------------------- detach

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self.watch is None:
            return
        try:
            close_watch_and_sinks(self.watch, self.sinks)
        finally:
            self._sinks_closed = True


def _unwrap_optimizer(optimizer: Any) -> Any:
    """Return the torch optimizer inside a LightningOptimizer, or `optimizer` itself."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _find_watched_module(pl_module: nn.Module, path: str | None) -> nn.Module:
    """Return the LightningModule, or its submodule at the dotted `path`."""
    if path is None:
        return pl_module
    try:
        return pl_module.get_submodule(path)
    except AttributeError as error:
        raise DiscoveryError(
            f"{type(pl_module).__name__} has no submodule {path!r} (the callback's `module` option): {error}"
        ) from None
