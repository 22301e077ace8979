"""Trainer: schedule, optimizer groups, determinism, divergence and validation."""

import math

import pytest
import torch

from stabiliscope.data import load_corpus
from stabiliscope.errors import ConfigError
from stabiliscope.models import ModelConfig, build_model
from stabiliscope.train import TrainConfig, lr_at, make_optimizer, train, train_model

MODEL = ModelConfig(depth=2, width=32, heads=4, strategy="pre")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def small_config(**overrides):
    options = dict(steps=6, batch_size=4, seq_len=32, warmup=2, eval_batches=2)
    options.update(overrides)
    return TrainConfig(**options)


def test_lr_warmup_is_linear():
    config = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)


def test_lr_cosine_decay_by_hand():
    config = TrainConfig(steps=110, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    halfway = 10 + 50
    assert lr_at(halfway, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, config) == pytest.approx(1e-4)


def test_lr_without_warmup_starts_at_peak():
    config = TrainConfig(steps=10, lr=2e-3, warmup=0)
    assert lr_at(0, config) == pytest.approx(2e-3)


def test_weight_decay_only_on_matrices():
    model = build_model(MODEL)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_same_seed_same_losses(corpus):
    first, second = [], []
    train(MODEL, small_config(seed=3), corpus, on_step=lambda step, loss: first.append(loss))
    train(MODEL, small_config(seed=3), corpus, on_step=lambda step, loss: second.append(loss))
    assert first == second


def test_other_seed_other_losses(corpus):
    first, second = [], []
    train(MODEL, small_config(seed=1), corpus, on_step=lambda step, loss: first.append(loss))
    train(MODEL, small_config(seed=2), corpus, on_step=lambda step, loss: second.append(loss))
    assert first != second


def test_completed_run_has_validation_loss(corpus):
    result = train(MODEL, small_config(), corpus)
    assert result.status == "completed"
    assert result.steps_done == 6
    assert math.isfinite(result.final_val_loss)
    assert [r.step for r in result.records] == list(range(6))


def test_high_lr_diverges_and_stops(corpus):
    result = train(MODEL, small_config(steps=40, lr=50.0, warmup=0), corpus)
    assert result.status == "diverged"
    assert result.diverged_step is not None
    assert result.steps_done == result.diverged_step + 1
    assert result.final_val_loss is None


def test_clipping_changes_update(corpus):
    # AdamW's step is almost scale-free, but a clip to 1e-6 brings the
    # gradient near eps = 1e-8, so the first update shrinks visibly.
    config = small_config(steps=1, warmup=0)
    bare = train_model(MODEL, config, corpus)[1]
    clipped = train_model(MODEL, small_config(steps=1, warmup=0, grad_clip=1e-6), corpus)[1]
    torch.manual_seed(config.seed)
    initial = build_model(MODEL)
    bare_step = (bare.blocks[0].mlp.fc_out.weight - initial.blocks[0].mlp.fc_out.weight).norm()
    clipped_step = (clipped.blocks[0].mlp.fc_out.weight - initial.blocks[0].mlp.fc_out.weight).norm()
    assert clipped_step < 0.9 * bare_step


def test_records_grad_before_clipping(corpus):
    unclipped = train(MODEL, small_config(steps=1, warmup=0), corpus)
    clipped = train(MODEL, small_config(steps=1, warmup=0, grad_clip=1e-6), corpus)
    assert clipped.records[0].scalars["grad/total"] == unclipped.records[0].scalars["grad/total"]
    assert clipped.records[0].scalars["grad/total"] > 1e-6


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"warmup": -1}, "warmup"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
        ({"device": "tpu"}, "tpu"),
    ],
)
def test_invalid_train_config_rejected(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**overrides).validate()


def test_sequence_longer_than_model_rejected(corpus):
    model = ModelConfig(depth=1, width=32, heads=4, max_seq_len=16)
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(model, small_config(seq_len=32), corpus)
