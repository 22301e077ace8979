"""Measurement kinds: QKV-Norm scale invariance and the early-training model update, on tiny reference models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stabiliscope.data import load_corpus, sample_batch
from stabiliscope.experiments.invariance import INVARIANCE_METRICS, measure_invariance
from stabiliscope.experiments.measurements import MEASUREMENTS_JSON, run_measurements
from stabiliscope.experiments.model_update import MODEL_UPDATE_METRICS, measure_model_update
from stabiliscope.experiments.probes import Experiment
from stabiliscope.models import ModelConfig, build_model
from stabiliscope.train import TrainConfig, train_model

WIDTH = 16
HEADS = 2
HEAD_DIM = WIDTH // HEADS


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None)


def tiny_model(strategy: str, depth: int = 2, seed: int = 0, norm: str = "rms"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(depth=depth, width=WIDTH, heads=HEADS, strategy=strategy, norm=norm, max_seq_len=16))


def tiny_batch(corpus, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_batch(corpus.train, 4, 16, torch.Generator().manual_seed(seed))


def loss_and_grad(model, inputs, targets, weight: torch.Tensor) -> tuple[float, torch.Tensor]:
    # An independent path to the gradient: backward into .grad, not autograd.grad.
    model.zero_grad(set_to_none=True)
    _, loss = model(inputs, targets)
    loss.backward()
    return float(loss.detach()), weight.grad.detach().clone()


# Invariance


@pytest.mark.parametrize("strategy", ["hybrid", "hybrid_star", "pre_qkv"])
def test_qkv_norm_is_scale_invariant(corpus, strategy: str, single_torch_thread: None) -> None:
    values = measure_invariance(tiny_model(strategy), *tiny_batch(corpus), weight_scale=4.0)

    assert set(values) == set(INVARIANCE_METRICS)
    for role in ("q", "k", "v"):
        assert values[f"invariance/loss_change.{role}"] < 1e-4
        assert values[f"invariance/cosine.{role}"] < 1e-3
        assert values[f"invariance/grad_exponent.{role}"] == pytest.approx(-1.0, abs=1e-3)
    assert values["invariance/q_grad_change.k"] < 1e-2
    assert values["invariance/q_grad_change.v"] < 1e-2


def test_pre_norm_is_not_scale_invariant(corpus, single_torch_thread: None) -> None:
    values = measure_invariance(tiny_model("pre"), *tiny_batch(corpus), weight_scale=4.0)

    assert values["invariance/cosine.q"] > 1e-3
    assert values["invariance/grad_exponent.q"] > -0.5
    # Scaling W_K by 4 scales the attention logits, and with them the W_Q gradient.
    assert values["invariance/q_grad_change.k"] > 0.5
    assert values["invariance/loss_change.v"] > 1e-4


def test_pre_qk_keeps_v_sensitivity(corpus, single_torch_thread: None) -> None:
    values = measure_invariance(tiny_model("pre_qk"), *tiny_batch(corpus), weight_scale=4.0)

    assert values["invariance/grad_exponent.q"] == pytest.approx(-1.0, abs=1e-3)
    assert values["invariance/q_grad_change.k"] < 1e-2
    assert values["invariance/q_grad_change.v"] > 0.5


def test_cosine_matches_backward_by_hand(corpus, single_torch_thread: None) -> None:
    model = tiny_model("pre")
    inputs, targets = tiny_batch(corpus)
    weight = model.blocks[0].attn.q.weight
    _, grad = loss_and_grad(model, inputs, targets, weight)
    head = slice(0, HEAD_DIM)
    cosine = float((grad[head] * weight.detach()[head]).sum() / (grad[head].norm() * weight.detach()[head].norm()))

    values = measure_invariance(model, inputs, targets, weight_scale=4.0)

    # The metric is the max over every head of every block, so it bounds block 0, head 0.
    assert values["invariance/cosine.q"] >= abs(cosine) - 1e-7


def test_grad_exponent_matches_scaling_by_hand(corpus, single_torch_thread: None) -> None:
    model = tiny_model("hybrid", depth=1)
    inputs, targets = tiny_batch(corpus)
    weight = model.blocks[0].attn.k.weight
    exponents = []
    for head in range(HEADS):
        rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        _, grad = loss_and_grad(model, inputs, targets, weight)
        with torch.no_grad():
            original = weight[rows].clone()
            weight[rows] *= 2.0
        _, scaled_grad = loss_and_grad(model, inputs, targets, weight)
        with torch.no_grad():
            weight[rows] = original
        exponents.append(math.log(float(scaled_grad[rows].norm() / grad[rows].norm())) / math.log(2.0))

    values = measure_invariance(model, inputs, targets, weight_scale=2.0)

    assert values["invariance/grad_exponent.k"] == pytest.approx(sum(exponents) / HEADS, abs=1e-5)


def test_invariance_restores_weights(corpus, single_torch_thread: None) -> None:
    model = tiny_model("hybrid")
    before = {name: param.detach().clone() for name, param in model.named_parameters()}

    measure_invariance(model, *tiny_batch(corpus), weight_scale=3.0)

    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name


@pytest.mark.parametrize("scale", [1.0, 0.0, -2.0, math.inf])
def test_invariance_rejects_bad_scale(corpus, scale: float) -> None:
    with pytest.raises(ValueError, match="weight_scale must be a positive number other than 1"):
        measure_invariance(tiny_model("hybrid"), *tiny_batch(corpus), weight_scale=scale)


# Model update


def head_input(model, inputs: torch.Tensor) -> torch.Tensor:
    # The last block's output goes through the final norm, when there is one, into the LM head.
    captured = []
    source = model.norm_final if model.norm_final is not None else model.blocks[-1]
    handle = source.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("strategy", ["post", "pre"])
def test_model_update_matches_trainer(corpus, strategy: str, single_torch_thread: None) -> None:
    model_config = ModelConfig(depth=2, width=WIDTH, heads=HEADS, strategy=strategy, max_seq_len=16)
    train_config = TrainConfig(steps=3, batch_size=2, seq_len=16, lr=1e-3, warmup=1, seed=0)
    probe_inputs = corpus.val[: 2 * 16].view(2, 16)
    initial = head_input(build_model_like(model_config, seed=0), probe_inputs)
    _, trained = train_model(model_config, train_config, corpus, watch_enabled=False)
    expected = float((head_input(trained, probe_inputs) - initial).pow(2).mean().sqrt())

    result = measure_model_update(model_config, train_config, corpus)

    assert len(result.updates) == 3
    assert len(result.losses) == 3
    assert result.updates[-1] == pytest.approx(expected, rel=1e-5)
    assert result.values["model_update/final"] == result.updates[-1]
    assert result.values["model_update/max"] == max(result.updates)
    assert set(result.values) == set(MODEL_UPDATE_METRICS)


def build_model_like(config: ModelConfig, seed: int):
    torch.manual_seed(seed)
    return build_model(config)


def test_model_update_reports_steps(corpus, single_torch_thread: None) -> None:
    model_config = ModelConfig(depth=1, width=WIDTH, heads=HEADS, strategy="deepnorm", max_seq_len=16)
    train_config = TrainConfig(steps=2, batch_size=2, seq_len=16, lr=1e-3, warmup=0, seed=1)
    seen = []

    result = measure_model_update(model_config, train_config, corpus, on_step=lambda step, loss: seen.append(step))

    assert seen == [0, 1]
    assert all(update > 0 for update in result.updates)


# The grid runner


def measurement_experiment(kind: str, **overrides) -> Experiment:
    values = dict(
        strategies=["hybrid", "pre"],
        depths=[1],
        width=WIDTH,
        heads=HEADS,
        steps=2 if kind == "model_update" else 0,
        lr=1e-3 if kind == "model_update" else 0.0,
        batch_size=2,
        seq_len=16,
        seeds=[0, 1],
        kind=kind,
    )
    values.update(overrides)
    return Experiment(**values)


def test_run_measurements_writes_json(tmp_path: Path, single_torch_thread: None) -> None:
    outcomes, measured = run_measurements(measurement_experiment("invariance"), tmp_path / "out")

    assert [outcome.run_id for outcome in outcomes] == ["hybrid-L01-s0", "hybrid-L01-s1", "pre-L01-s0", "pre-L01-s1"]
    assert all(outcome.status == "completed" for outcome in outcomes)
    assert set(measured) == {outcome.run_id for outcome in outcomes}
    document = json.loads((tmp_path / "out" / MEASUREMENTS_JSON).read_text())
    assert document["experiment"]["kind"] == "invariance"
    assert document["runs"]["pre-L01-s0"]["values"] == measured["pre-L01-s0"]
    assert document["runs"]["pre-L01-s0"]["depth"] == 1


def test_run_measurements_same_weights_as_sweep(tmp_path: Path, corpus, single_torch_thread: None) -> None:
    # A run seeds torch like the trainer, so seed 0 gives the trainer's initial model.
    _, measured = run_measurements(measurement_experiment("invariance", strategies=["pre"], seeds=[0]), tmp_path)
    model = tiny_model("pre", depth=1, seed=0)

    expected = measure_invariance(model, *sample_batch(corpus.train, 2, 16, torch.Generator().manual_seed(0)), 4.0)

    assert measured["pre-L01-s0"] == pytest.approx(expected)


def test_run_measurements_model_update(tmp_path: Path, single_torch_thread: None) -> None:
    outcomes, measured = run_measurements(measurement_experiment("model_update", seeds=[0]), tmp_path)

    document = json.loads((tmp_path / MEASUREMENTS_JSON).read_text())
    assert [outcome.status for outcome in outcomes] == ["completed", "completed"]
    assert len(document["runs"]["pre-L01-s0"]["model_update_by_step"]) == 2
    assert measured["pre-L01-s0"]["model_update/max"] == max(document["runs"]["pre-L01-s0"]["model_update_by_step"])


def test_run_measurements_rejects_sweep_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind 'sweep' is not a measurement kind"):
        run_measurements(measurement_experiment("sweep", steps=1, lr=1e-3), tmp_path)
