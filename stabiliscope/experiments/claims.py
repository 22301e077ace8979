"""Claim reducers and verdicts: turn a probe's runs into one number per seed, then PASS or FAIL.

Each claim is reduced once per seed from the run store, or, for the
measurement kinds, from the values computed per run. The measured value is
the mean over seeds, with a 95% confidence interval from Student's t
distribution (no interval for a single seed). A claim passes when the mean lies
inside its `expect` interval, ends included.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from stabiliscope.experiments.measurements import Measured, run_measurements
from stabiliscope.experiments.probes import (
    RUN_REDUCERS,
    Claim,
    Experiment,
    Probe,
    sweep_config,
    variant_folder,
)
from stabiliscope.experiments.sweep import RunOutcome, SweepReporter, make_run_id, run_sweep
from stabiliscope.experiments.shards import SweepReader
from stabiliscope.sinks.store import RunStore

CONFIDENCE = 0.95


class MissingDataError(Exception):
    """A run or metric value that a claim needs is not in the store or is not usable."""


@dataclass
class ClaimResult:
    """Measured value and verdict of one claim.

    `values` maps each seed to its reduced value. `ci` is the 95% confidence
    interval of the mean, or None with fewer than two seeds. `error` explains
    a claim that could not be measured, which counts as a failure.
    """

    claim: Claim
    values: dict[int, float] = field(default_factory=dict)
    mean: float = math.nan
    ci: tuple[float, float] | None = None
    error: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def passed(self) -> bool:
        low, high = self.claim.expect
        return self.error is None and math.isfinite(self.mean) and low <= self.mean <= high

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready values; NaN and infinities become null."""
        claim = self.claim
        return {
            "id": claim.id,
            "statement": claim.statement,
            "strategy": claim.strategy,
            "baseline": claim.baseline,
            "variant": claim.variant,
            "baseline_variant": claim.baseline_variant,
            "depth": claim.depth,
            "metric": claim.metric,
            "reduce": claim.reduce,
            "at": claim.at,
            "expect": [_json_number(claim.expect[0]), _json_number(claim.expect[1])],
            "values": {str(seed): _json_number(value) for seed, value in self.values.items()},
            "n": self.n,
            "mean": _json_number(self.mean),
            "ci": None if self.ci is None else [_json_number(self.ci[0]), _json_number(self.ci[1])],
            "verdict": self.verdict,
            "error": self.error,
        }


@dataclass
class ProbeResult:
    """Results of every claim of one probe file, with the runs behind them."""

    probe: Probe
    reduced: bool
    out: Path
    claims: list[ClaimResult]
    outcomes: list[RunOutcome] = field(default_factory=list)
    wall_time_s: float | None = None
    failed_runs: list[str] = field(default_factory=list)
    """Ids of failed runs, as `<variant>/<run id>` in a file with variants."""
    cpu_time_s: float | None = None
    """CPU time of this process over all its threads (`time.process_time`). It
    leaves out the time other programs take from a shared machine, and the
    runs that `workers > 1` trains in other processes."""

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.claims)

    def to_dict(self) -> dict[str, Any]:
        """Return the probe's results as JSON-ready values."""
        source = self.probe.source
        return {
            "probe": str(self.probe.path),
            "source": {
                "authors": source.authors,
                "year": source.year,
                "title": source.title,
                "where": source.where,
            },
            "kind": self.probe.experiment.kind,
            "variants": list(self.probe.variants),
            "reduced": self.reduced,
            "out": str(self.out),
            "runs": len(self.outcomes),
            "failed_runs": list(self.failed_runs),
            "wall_time_s": self.wall_time_s,
            "cpu_time_s": self.cpu_time_s,
            "passed": self.passed,
            "claims": [result.to_dict() for result in self.claims],
        }


def run_probe(
    probe: Probe,
    *,
    reduced: bool = False,
    out: Path | None = None,
    device: str = "cpu",
    reporter: SweepReporter | None = None,
    workers: int = 1,
) -> ProbeResult:
    """Train the probe's grid (skipping runs finished earlier in `out`) and check every claim.

    `out` defaults to `probe.default_out(reduced=reduced)`. Each `[[variant]]`
    runs into its own folder `out/<variant>`. `workers` trains that many runs
    at once (see `run_sweep`). Claims read every store of a sweep folder, so
    runs trained there by `--shard` invocations count. Measurement kinds
    (`invariance`, `model_update`) are computed again on every call and ignore
    `workers`. Raises ConfigError for an invalid grid or a sweep folder that
    contains runs of another configuration.
    """
    out = Path(out) if out is not None else probe.default_out(reduced=reduced)
    started = time.perf_counter()
    cpu_started = time.process_time()
    outcomes: list[RunOutcome] = []
    failed_runs: list[str] = []
    measured: dict[str | None, Measured] = {}
    for variant in probe.variant_names():
        experiment = probe.grid(reduced=reduced, variant=variant)
        folder = variant_folder(out, variant)
        if experiment.kind == "sweep":
            variant_outcomes = run_sweep(sweep_config(experiment, folder, device), reporter, workers=workers)
        else:
            variant_outcomes, measured[variant] = run_measurements(
                experiment, folder, device=device, reporter=reporter
            )
        outcomes.extend(variant_outcomes)
        prefix = "" if variant is None else f"{variant}/"
        failed_runs.extend(prefix + item.run_id for item in variant_outcomes if item.status == "failed")

    with ExitStack() as stack:
        sources: dict[str | None, ClaimSource] = {}
        for variant in probe.variant_names():
            experiment = probe.grid(reduced=reduced, variant=variant)
            if variant in measured:
                sources[variant] = ClaimSource(experiment, measured=measured[variant])
            else:
                store = stack.enter_context(SweepReader.open(variant_folder(out, variant)))
                sources[variant] = ClaimSource(experiment, store=store)
        results = [evaluate_claim_from(sources, claim) for claim in probe.claims]

    return ProbeResult(
        probe=probe,
        reduced=reduced,
        out=out,
        claims=results,
        outcomes=outcomes,
        wall_time_s=time.perf_counter() - started,
        cpu_time_s=time.process_time() - cpu_started,
        failed_runs=failed_runs,
    )


@dataclass
class ClaimSource:
    """Experiment of one variant, with the run store or the measured values that its claims read."""

    experiment: Experiment
    store: RunStore | SweepReader | None = None
    measured: Measured | None = None

    def reduce(self, claim: Claim, seed: int, strategy: str) -> float:
        """Return the claim's reduced value for `strategy` and `seed`. Raises MissingDataError when data is missing."""
        if self.measured is not None:
            return reduce_measured(self.measured, self.experiment, claim, seed, strategy=strategy)
        if self.store is None:
            raise ValueError("a ClaimSource needs a store or measured values")
        return reduce_for_seed(self.store, self.experiment, claim, seed, strategy=strategy)


def evaluate_claim(store: RunStore, experiment: Experiment, claim: Claim) -> ClaimResult:
    """Reduce `claim` for every seed of `experiment` and summarize the seeds (a file without variants)."""
    return evaluate_claim_from({None: ClaimSource(experiment, store=store)}, claim)


def evaluate_claim_from(sources: dict[str | None, ClaimSource], claim: Claim) -> ClaimResult:
    """Reduce `claim` for every seed, reading each variant from `sources[variant]`, and summarize the seeds.

    With a baseline (another strategy, another variant or both), each seed's
    value is divided by the baseline's value for the same seed.
    """
    result = ClaimResult(claim=claim)
    source = sources[claim.variant]
    baseline_source = sources[claim.baseline_variant or claim.variant]
    has_baseline = claim.baseline is not None or claim.baseline_variant is not None
    baseline_strategy = claim.baseline or claim.strategy
    try:
        for seed in source.experiment.seeds:
            value = source.reduce(claim, seed, claim.strategy)
            if has_baseline:
                baseline = baseline_source.reduce(claim, seed, baseline_strategy)
                if baseline == 0:
                    raise MissingDataError(f"baseline {_describe_baseline(claim)} reduces to 0 for seed {seed}")
                value = value / baseline
            result.values[seed] = value
    except MissingDataError as error:
        result.error = str(error)
        return result

    result.mean, result.ci = mean_confidence_interval(list(result.values.values()))
    return result


def _describe_baseline(claim: Claim) -> str:
    baseline = repr(claim.baseline or claim.strategy)
    if claim.baseline_variant is not None:
        baseline += f" in variant {claim.baseline_variant!r}"
    return baseline


def mean_confidence_interval(
    values: list[float], confidence: float = CONFIDENCE
) -> tuple[float, tuple[float, float] | None]:
    """Return the mean and its two-sided Student-t confidence interval (None for one value)."""
    if not values:
        return math.nan, None
    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if data.size < 2:
        return mean, None
    standard_error = float(data.std(ddof=1)) / math.sqrt(data.size)
    half_width = float(stats.t.ppf(0.5 + confidence / 2, df=data.size - 1)) * standard_error
    return mean, (mean - half_width, mean + half_width)


def reduce_for_seed(
    store: RunStore, experiment: Experiment, claim: Claim, seed: int, *, strategy: str | None = None
) -> float:
    """Return the claim's reduced value for one seed (of `strategy`, default the claim's).

    Raises MissingDataError when a run or value the claim needs is missing,
    unfinished or not usable.
    """
    strategy = strategy or claim.strategy
    if claim.reduce == "loglog_slope_vs_depth":
        return _loglog_slope_vs_depth(store, experiment, claim, strategy, seed)

    depth = claim.depth if claim.depth is not None else max(experiment.depths)
    run_id = _finished_run_id(store, strategy, depth, seed)
    if claim.reduce in RUN_REDUCERS:
        return _reduce_outcome(store, run_id, claim.reduce, experiment)

    profile = _profile(store, run_id, claim.metric, claim.at)
    if claim.reduce == "growth_from_init":
        initial = _profile(store, run_id, claim.metric, "init")
        return max(profile) / _nonzero(max(initial), run_id, claim.metric, "the max over layers at init")
    return reduce_profile(profile, claim.reduce, run_id=run_id, metric=claim.metric)


def reduce_profile(profile: list[float], reduce: str, *, run_id: str = "", metric: str = "") -> float:
    """Reduce one depth profile (one value per block, block 0 first) with a per-profile reducer."""
    if reduce == "last_over_first":
        return profile[-1] / _nonzero(profile[0], run_id, metric, "block 0")
    if reduce == "max_over_min":
        return max(profile) / _nonzero(min(profile), run_id, metric, "the min over layers")
    if reduce == "spearman_vs_layer":
        if len(set(profile)) == 1:
            raise MissingDataError(
                f"run {run_id}: {metric} is the same in every block, so its rank correlation is undefined"
            )
        return float(stats.spearmanr(np.arange(len(profile)), profile).statistic)
    if reduce == "loglog_slope_vs_layer":
        return _loglog_slope_vs_layer(profile, run_id, metric)
    raise ValueError(f"{reduce!r} is not a per-profile reducer")


def _loglog_slope_vs_layer(profile: list[float], run_id: str, metric: str) -> float:
    # Least-squares slope of log(value) against log(l + 1), the power-law
    # exponent of the profile. It is 0.5 for an RMS whose square grows linearly.
    if not all(value > 0 for value in profile):
        raise MissingDataError(f"run {run_id}: {metric} is not positive in every block, so its log is undefined")
    layers = np.arange(1, len(profile) + 1)
    slope, _ = np.polyfit(np.log(layers), np.log(profile), deg=1)
    return float(slope)


def reduce_measured(
    measured: Measured, experiment: Experiment, claim: Claim, seed: int, *, strategy: str | None = None
) -> float:
    """Return a measurement-kind claim's value for one seed (of `strategy`, default the claim's).

    `value` reads the run at `claim.depth` (default the deepest);
    `loglog_slope_vs_depth` fits log(value) against log(depth) over every
    depth. Raises MissingDataError when a run failed or a value is not finite.
    """
    strategy = strategy or claim.strategy
    if claim.reduce == "loglog_slope_vs_depth":
        log_depths, log_values = [], []
        for depth in experiment.depths:
            value = _measured_value(measured, strategy, depth, seed, claim.metric)
            if not value > 0:
                raise MissingDataError(
                    f"run {make_run_id(strategy, depth, seed)}: {claim.metric} is {value!r}; "
                    "a log-log slope needs positive values"
                )
            log_depths.append(math.log(depth))
            log_values.append(math.log(value))
        slope, _ = np.polyfit(log_depths, log_values, deg=1)
        return float(slope)
    if claim.reduce == "value":
        depth = claim.depth if claim.depth is not None else max(experiment.depths)
        return _measured_value(measured, strategy, depth, seed, claim.metric)
    raise ValueError(f"{claim.reduce!r} is not a reducer of measured values")


def _measured_value(measured: Measured, strategy: str, depth: int, seed: int, metric: str) -> float:
    run_id = make_run_id(strategy, depth, seed)
    values = measured.get(run_id)
    if values is None:
        raise MissingDataError(f"run {run_id} has no measured values (it failed or is not in the grid)")
    value = values.get(metric)
    if value is None:
        raise MissingDataError(f"run {run_id} measured no {metric}")
    if not math.isfinite(value):
        raise MissingDataError(f"run {run_id}: {metric} is {value!r}, not a finite number")
    return value


def _loglog_slope_vs_depth(
    store: RunStore, experiment: Experiment, claim: Claim, strategy: str, seed: int
) -> float:
    # Least-squares slope of log(value at `claim.layer`) against log(depth).
    log_depths, log_values = [], []
    for depth in experiment.depths:
        run_id = _finished_run_id(store, strategy, depth, seed)
        value = _profile(store, run_id, claim.metric, claim.at)[claim.layer]
        if not value > 0:
            raise MissingDataError(
                f"run {run_id}: {claim.metric} at block {claim.layer} is {value!r}; "
                "a log-log slope needs positive values"
            )
        log_depths.append(math.log(depth))
        log_values.append(math.log(value))
    slope, _ = np.polyfit(log_depths, log_values, deg=1)
    return float(slope)


def _reduce_outcome(store: RunStore, run_id: str, reduce: str, experiment: Experiment) -> float:
    run = store.get_run(run_id)
    assert run is not None  # checked by _finished_run_id
    if reduce == "diverged_step":
        # A run that never diverged counts as diverging after its last step.
        return float(run.diverged_step if run.diverged_step is not None else experiment.steps)
    return float(run.final_train_loss) if run.final_train_loss is not None else math.nan


def _finished_run_id(store: RunStore, strategy: str, depth: int, seed: int) -> str:
    run_id = make_run_id(strategy, depth, seed)
    run = store.get_run(run_id)
    if run is None:
        raise MissingDataError(f"run {run_id} is not in the store")
    if not run.finished:
        detail = f": {run.error}" if run.error else ""
        raise MissingDataError(f"run {run_id} is {run.status}{detail}")
    return run_id


def _profile(store: RunStore, run_id: str, metric: str, at: str | int) -> list[float]:
    if at == "init":
        step = 0
    elif at == "final":
        step = store.last_step(run_id, metric)
        if step is None:
            raise MissingDataError(f"run {run_id} recorded no {metric}")
    else:
        step = int(at)
    profile = store.block_profile(run_id, metric, step)
    if not profile:
        raise MissingDataError(f"run {run_id} recorded no {metric} at step {step}")
    if not all(math.isfinite(value) for value in profile):
        raise MissingDataError(f"run {run_id}: {metric} at step {step} is not finite in every block")
    return profile


def _nonzero(value: float, run_id: str, metric: str, location: str) -> float:
    if value == 0:
        raise MissingDataError(f"run {run_id}: {metric} is 0 at {location}, so the ratio is undefined")
    return value


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None
