"""Model update in early training: how far the model's output moves from its value at initialization.

DeepNet (Wang et al. 2022) defines the model update as `||F(x; θ_t) - F(x; θ_0)||`,
the change of the model output for a fixed input, and argues that under
Post-LN it grows with depth while DeepNorm's residual scaling and init keep it
bounded. Here `F` is the hidden state that enters the LM head (after the final
norm when the strategy has one), and the update is its root mean square over
every element of one fixed validation batch. Post-LN and DeepNorm end every
block with a norm, so `F` has RMS about 1 and the update reads as a relative change.

The training loop is the trainer's (`stabiliscope.train.train_model`): the same
seeds, batches, AdamW groups, warmup and cosine schedule and clipping, without
a watch attached.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stabiliscope.data import Corpus, iter_eval_batches, sample_batch
from stabiliscope.models import ModelConfig, TransformerLM, build_model
from stabiliscope.train import TrainConfig, lr_at, make_optimizer

logger = logging.getLogger(__name__)

MODEL_UPDATE_METRICS = ("model_update/max", "model_update/final")
"""`max`: the largest update over the trained steps; `final`: the update after the last step."""


@dataclass
class ModelUpdateResult:
    """Values of `MODEL_UPDATE_METRICS`, with the update and the training loss of every step."""

    values: dict[str, float]
    updates: list[float]
    losses: list[float]


def measure_model_update(
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: Corpus,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> ModelUpdateResult:
    """Train for `train_config.steps` steps and measure the model update after each one.

    `on_step(step, loss)` is called after every optimizer step.

    Unlike the trainer, a loss that grows past `diverge_factor` times the
    first loss does not stop the run, since a growing update is what is
    measured. Training stops early only at a non-finite loss. The updates
    measured until then are kept, NaN marks the update of a step whose output
    is not finite, and `model_update/max` is NaN when no step gives a finite update.
    """
    model_config.validate()
    train_config.validate()

    torch.manual_seed(train_config.seed)
    model = build_model(model_config).to(train_config.device)
    model.train()
    optimizer = make_optimizer(model, train_config)
    generator = torch.Generator().manual_seed(train_config.seed)
    probe_inputs, _ = next(
        iter_eval_batches(corpus.val, train_config.batch_size, train_config.seq_len, 1, train_config.device)
    )

    initial_output = _head_input(model, probe_inputs)
    updates: list[float] = []
    losses: list[float] = []
    for step in range(train_config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train_config)

        inputs, targets = sample_batch(
            corpus.train, train_config.batch_size, train_config.seq_len, generator, train_config.device
        )
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = loss.item()
        losses.append(loss_value)
        if not math.isfinite(loss_value):
            logger.info("model update run stopped at step %d: the loss is not finite", step)
            break
        if train_config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()

        change = _head_input(model, probe_inputs) - initial_output
        updates.append(float(change.pow(2).mean().sqrt()))
        if on_step is not None:
            on_step(step, loss_value)

    finite = [value for value in updates if math.isfinite(value)]
    values = {
        "model_update/max": max(finite) if finite else math.nan,
        "model_update/final": updates[-1] if updates else math.nan,
    }
    return ModelUpdateResult(values=values, updates=updates, losses=losses)


@torch.no_grad()
def _head_input(model: TransformerLM, inputs: torch.Tensor) -> torch.Tensor:
    # The LM head reads the final norm's output, or the last block's when the
    # strategy has no final norm; a forward hook captures it unchanged.
    source = model.norm_final if model.norm_final is not None else model.blocks[-1]
    captured: list[torch.Tensor] = []
    handle = source.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        model(inputs)
    finally:
        handle.remove()
    return captured[0].float()
