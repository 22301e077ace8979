"""Measurement kinds of probe experiments: one set of values per (strategy, depth, seed), computed directly.

The sweep kind trains runs with a watch into a run store. The kinds here
compute their values on the reference model itself, because what they measure
is not a watch metric:

- `invariance`: scale invariance of the attention projections at
  initialization (`stabiliscope.experiments.invariance`);
- `model_update`: the change of the model output over the first training
  steps (`stabiliscope.experiments.model_update`).

Each run builds its model from its seed exactly as the sweep does, so the
same (strategy, depth, seed) starts from the same weights in every kind. The
values are written to `measurements.json` in the folder, with the
experiment, for inspection; they are recomputed on every invocation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from stabiliscope.data import Corpus, check_sequence_fits, load_corpus, sample_batch
from stabiliscope.experiments.invariance import measure_invariance
from stabiliscope.experiments.model_update import measure_model_update
from stabiliscope.experiments.probes import Experiment, model_config
from stabiliscope.experiments.sweep import RunOutcome, SweepReporter, make_run_id
from stabiliscope.models import build_model
from stabiliscope.train import TrainConfig, check_device

logger = logging.getLogger(__name__)

MEASUREMENTS_JSON = "measurements.json"

Measured = dict[str, dict[str, float]]
"""Values of each run: `measured[run_id][metric]`."""


def run_measurements(
    experiment: Experiment,
    out: Path,
    *,
    device: str = "cpu",
    reporter: SweepReporter | None = None,
) -> tuple[list[RunOutcome], Measured]:
    """Compute the values of a measurement-kind experiment for every run of its grid.

    Runs go in the sweep's order (depth, then strategy, then seed) and are
    reported to `reporter` like sweep runs. A run that raises is recorded as
    `failed` with the error text, and its values are missing, so the claims
    that read it report it. Writes `out/measurements.json`. Raises ConfigError
    for an unusable device and for data too short for one sequence.
    """
    if experiment.kind not in ("invariance", "model_update"):
        raise ValueError(f"kind {experiment.kind!r} is not a measurement kind")
    reporter = reporter or SweepReporter()
    check_device(device)
    corpus = load_corpus(experiment.data)
    check_sequence_fits(corpus, experiment.seq_len)

    points = [
        (strategy, depth, seed)
        for depth in experiment.depths
        for strategy in experiment.strategies
        for seed in experiment.seeds
    ]
    reporter.sweep_started(len(points), len(points))
    outcomes: list[RunOutcome] = []
    measured: Measured = {}
    runs: dict[str, Any] = {}
    for strategy, depth, seed in points:
        run_id = make_run_id(strategy, depth, seed)
        reporter.run_started(run_id, max(experiment.steps, 1))
        started = time.perf_counter()
        try:
            values, details = _measure_one(experiment, strategy, depth, seed, corpus, device, reporter)
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
            error_text = f"{type(error).__name__}: {error}"
            logger.error("measurement run %s failed: %s", run_id, error_text)
            outcome = RunOutcome(
                run_id=run_id, strategy=strategy, depth=depth, seed=seed, status="failed", error=error_text
            )
            runs[run_id] = {"strategy": strategy, "depth": depth, "seed": seed, "error": error_text}
        else:
            measured[run_id] = values
            runs[run_id] = {"strategy": strategy, "depth": depth, "seed": seed, "values": values, **details}
            outcome = RunOutcome(
                run_id=run_id,
                strategy=strategy,
                depth=depth,
                seed=seed,
                status="completed",
                final_train_loss=details.get("loss"),
                wall_time_s=time.perf_counter() - started,
            )
        reporter.run_finished(outcome)
        outcomes.append(outcome)
    reporter.sweep_finished(outcomes)

    out.mkdir(parents=True, exist_ok=True)
    document = {"experiment": _experiment_dict(experiment), "runs": _json_ready(runs)}
    (out / MEASUREMENTS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    return outcomes, measured


def _measure_one(
    experiment: Experiment,
    strategy: str,
    depth: int,
    seed: int,
    corpus: Corpus,
    device: str,
    reporter: SweepReporter,
) -> tuple[dict[str, float], dict[str, Any]]:
    config = model_config(experiment, strategy, depth, vocab_size=corpus.vocab_size)
    if experiment.kind == "invariance":
        torch.manual_seed(seed)
        model = build_model(config).to(device)
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = sample_batch(corpus.train, experiment.batch_size, experiment.seq_len, generator, device)
        values = measure_invariance(model, inputs, targets, experiment.weight_scale)
        with torch.no_grad():
            _, loss = model(inputs, targets)
        return values, {"loss": float(loss)}

    train_config = TrainConfig(
        steps=experiment.steps,
        batch_size=experiment.batch_size,
        seq_len=experiment.seq_len,
        lr=experiment.lr,
        warmup=experiment.warmup,
        grad_clip=experiment.grad_clip,
        seed=seed,
        device=device,
    )
    result = measure_model_update(config, train_config, corpus, on_step=reporter.run_step)
    loss = result.losses[-1] if result.losses else math.nan
    return result.values, {"loss": loss, "model_update_by_step": result.updates, "loss_by_step": result.losses}


def _experiment_dict(experiment: Experiment) -> dict[str, Any]:
    values = dataclasses.asdict(experiment)
    values["data"] = None if experiment.data is None else str(experiment.data)
    return values


def _json_ready(value: Any) -> Any:
    # JSON has no NaN or infinity, so they are written as null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value
