"""The trainer used by sweeps and probes.

It attaches a watch the way any user would: `watch(model, optimizer, ...)`,
then `w.step(loss)` once per optimizer step, after the backward pass and
before clipping.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from stabiliscope.data import Corpus, check_sequence_fits, iter_eval_batches, sample_batch
from stabiliscope.errors import ConfigError
from stabiliscope.models import ModelConfig, TransformerLM, build_model
from stabiliscope.watch import Sink, SpikeEvent, StepRecord, watch

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimizer, schedule and stopping rule of one training run."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    warmup: int = 20  # steps of linear warmup from 0 to `lr`
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = None  # max global gradient norm; None disables clipping
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    seed: int = 0
    device: str = "cpu"
    eval_batches: int = 8  # validation batches of `batch_size` sequences
    # A run has diverged when its loss is not finite or exceeds this multiple
    # of the first step's loss.
    diverge_factor: float = 2.0
    watch_every: int = 1

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what is accepted."""
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "watch_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be a non-negative integer number of steps, got {self.warmup!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.diverge_factor > 1:
            raise ConfigError(f"diverge_factor must be greater than 1, got {self.diverge_factor!r}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {self.betas!r}")
        check_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    """Outcome of one training run."""

    status: str  # "completed" or "diverged"
    steps_done: int
    diverged_step: int | None
    final_train_loss: float
    final_val_loss: float | None  # None when the run diverged
    spike_count: int
    wall_time_s: float
    tokens_per_s: float
    records: list[StepRecord] = field(default_factory=list)
    spikes: list[SpikeEvent] = field(default_factory=list)


def check_device(device: str) -> None:
    """Raise ConfigError unless `device` names a usable torch device."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"invalid device {device!r}; expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; expected cpu, cuda or cuda:N")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of `step`: linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    decay_steps = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and none on norm gains and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, config: TrainConfig) -> float:
    """Mean cross-entropy (nats per token) over the first `eval_batches` windows of `tokens`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in iter_eval_batches(tokens, config.batch_size, config.seq_len, config.eval_batches, config.device):
            _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: Corpus,
    *,
    sinks: Sequence[Sink] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train one reference model on `corpus` and return its outcome (see `train_model`)."""
    result, _ = train_model(model_config, train_config, corpus, sinks=sinks, on_step=on_step)
    return result


def train_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: Corpus,
    *,
    sinks: Sequence[Sink] = (),
    on_step: Callable[[int, float], None] | None = None,
    watch_enabled: bool = True,
) -> tuple[RunResult, TransformerLM]:
    """Train one reference model on `corpus`; return its outcome and the trained model.

    The model is built on the CPU from `train_config.seed`, so a seed gives the
    same initial weights on every device. The run stops early, with status
    "diverged", at the first step whose loss is not finite or exceeds
    `diverge_factor` times the first loss. `on_step(step, loss)` is called
    after every optimizer step. `watch_enabled=False` trains without hooks,
    which exists to check that watching does not change the numbers.
    """
    model_config.validate()
    train_config.validate()
    check_sequence_fits(corpus, train_config.seq_len)
    if model_config.vocab_size < corpus.vocab_size:
        raise ConfigError(
            f"model vocab_size {model_config.vocab_size} is smaller than the data's {corpus.vocab_size} token ids"
        )
    if model_config.max_seq_len < train_config.seq_len:
        raise ConfigError(f"seq_len {train_config.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")

    torch.manual_seed(train_config.seed)
    model = build_model(model_config).to(train_config.device)
    model.train()
    optimizer = make_optimizer(model, train_config)
    generator = torch.Generator().manual_seed(train_config.seed)

    watcher = watch(model, optimizer, sinks=sinks, every=train_config.watch_every) if watch_enabled else None
    start = time.perf_counter()
    first_loss = math.nan
    loss_value = math.nan
    diverged_step = None
    steps_done = 0
    try:
        for step in range(train_config.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, train_config)

            x, y = sample_batch(corpus.train, train_config.batch_size, train_config.seq_len, generator, train_config.device)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if watcher is not None:
                watcher.step(loss)

            loss_value = loss.item()
            if step == 0:
                first_loss = loss_value
            steps_done = step + 1
            if on_step is not None:
                on_step(step, loss_value)
            if not math.isfinite(loss_value) or loss_value > train_config.diverge_factor * first_loss:
                diverged_step = step
                logger.info("run diverged at step %d: loss %.4g (first loss %.4g)", step, loss_value, first_loss)
                break

            if train_config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
    finally:
        if watcher is not None:
            watcher.close()
    wall_time = time.perf_counter() - start

    final_val_loss = None if diverged_step is not None else evaluate(model, corpus.val, train_config)
    tokens = steps_done * train_config.batch_size * train_config.seq_len
    return RunResult(
        status="diverged" if diverged_step is not None else "completed",
        steps_done=steps_done,
        diverged_step=diverged_step,
        final_train_loss=loss_value,
        final_val_loss=final_val_loss,
        spike_count=len(watcher.spikes) if watcher is not None else 0,
        wall_time_s=wall_time,
        tokens_per_s=tokens / wall_time if wall_time > 0 else math.nan,
        records=watcher.records if watcher is not None else [],
        spikes=watcher.spikes if watcher is not None else [],
    ), model
