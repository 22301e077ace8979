"""Depth-scaling sweep: train every (depth, strategy, seed) point of a grid.

Runs execute in this order: for each depth (as listed), for each strategy, for
each seed. Each run gets a filesystem-safe id such as `pre-L08-s0`.

A sweep folder contains:

- `store.sqlite`: the run store (configuration, status, metrics, events), or
  `store-K-of-N.sqlite` for shard K of N (see `stabiliscope.experiments.shards`);
- `sweep.json`: the sweep configuration of the latest invocation;
- `tb/<run_id>/`: TensorBoard event files, one folder per run.

Rerunning a sweep into the same folder skips runs that already finished
(`completed` or `diverged`) with the same configuration, in any store of the
folder, and reruns runs that failed or were left `running` by a crash or an
interrupt. A run is recorded as finished in one transaction after its last
step, so a sweep killed at any moment loses no finished run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stabiliscope.data import (
    BUILTIN_CORPUS_NAME,
    BYTE_VOCAB_SIZE,
    Corpus,
    check_sequence_fits,
    load_corpus,
)
from stabiliscope.errors import ConfigError
from stabiliscope.models import EMBED_SCALES, FFN_TYPES, INITS, NORM_TYPES, STRATEGIES, ModelConfig
from stabiliscope.experiments.folders import prepare_sweep_folder, write_json_atomic
from stabiliscope.experiments.locking import StoreLock
from stabiliscope.experiments.shards import Shard, finished_runs_in_other_stores, store_filename
from stabiliscope.experiments.workers import train_in_workers
from stabiliscope.sinks.store import (
    SWEEP_CONFIG_KEY,
    EventRow,
    RunRow,
    RunStore,
    StoreSink,
    check_existing_store,
)
from stabiliscope.sinks.dashboard import run_hparams
from stabiliscope.sinks.tensorboard import TensorBoardSink
from stabiliscope.train import TrainConfig, check_device, train

logger = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
TB_FOLDER = "tb"


@dataclass
class SweepConfig:
    """Grid and shared settings of a depth-scaling sweep.

    `norms` are strategy names from `stabiliscope.models.STRATEGIES`; `norm`
    is the norm type (`rms` or `layer`) used by every strategy. `data` is a
    text file, folder or `.bin` token file, or None for the built-in corpus.
    `out` is the sweep folder. `grad_clip` is a max gradient norm, or None to
    train without clipping.
    """

    norms: list[str]
    depths: list[int]
    width: int
    heads: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    seeds: list[int] = field(default_factory=lambda: [0])
    init: str = "auto"  # "auto": each strategy's default (deepnet for deepnorm, else megatron)
    data: Path | None = None
    out: Path = Path("runs/sweep")
    device: str = "cpu"
    norm: str = "rms"
    ffn: str = "swiglu"
    grad_clip: float | None = None
    # "sqrt_d" scales token embeddings to squared norm about `width` (Xiong et al. 2020).
    embed_scale: str = "default"

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value and what is accepted."""
        _check_names("norms", self.norms, tuple(STRATEGIES))
        _check_int_list("depths", self.depths, minimum=1)
        _check_int_list("seeds", self.seeds, minimum=0)
        for name in ("width", "heads", "steps", "batch_size", "seq_len"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("warmup", self.warmup, minimum=0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ConfigError(
                f"grad_clip (--grad-clip) must be a positive finite number, or None (--grad-clip 0) for no clipping; got {self.grad_clip!r}"
            )
        if self.width % self.heads != 0:
            raise ConfigError(
                f"width {self.width} is not divisible by heads {self.heads}; "
                "use a width that is a multiple of the number of heads"
            )
        _check_choice("init", self.init, ("auto", *INITS))
        _check_choice("norm", self.norm, tuple(NORM_TYPES))
        _check_choice("ffn", self.ffn, tuple(FFN_TYPES))
        _check_choice("embed_scale", self.embed_scale, EMBED_SCALES)
        check_device(self.device)

        # The shape checks do not depend on the vocabulary, so byte tokens stand
        # in for the corpus, which is loaded only when the sweep runs.
        for point in grid(self):
            model_config, train_config = point_configs(self, point, vocab_size=BYTE_VOCAB_SIZE)
            model_config.validate()
            train_config.validate()

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as JSON-ready values (paths become strings)."""
        values = asdict(self)
        values["data"] = None if self.data is None else str(self.data)
        values["out"] = str(self.out)
        return values


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid."""

    strategy: str
    depth: int
    seed: int

    @property
    def run_id(self) -> str:
        """Filesystem-safe id such as `pre-L08-s0`."""
        return make_run_id(self.strategy, self.depth, self.seed)


@dataclass(frozen=True)
class RunOutcome:
    """Outcome of one run in a sweep invocation.

    `skipped` is True when the run had already finished in an earlier
    invocation, and the numbers are then read from the store. `status` is
    `completed`, `diverged` or `failed`.
    """

    run_id: str
    strategy: str
    depth: int
    seed: int
    status: str
    skipped: bool = False
    diverged_step: int | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    spike_count: int | None = None
    wall_time_s: float | None = None
    error: str | None = None


class SweepReporter:
    """Receiver of sweep progress; every method does nothing by default.

    The CLI passes a rich progress display. Library callers can subclass this
    and override only what they need.
    """

    def sweep_started(self, total_runs: int, runs_to_train: int) -> None:
        """Called once, before the first run, with the grid size and the runs left."""

    def run_skipped(self, outcome: RunOutcome) -> None:
        """Called for each run that finished in an earlier invocation."""

    def run_started(self, run_id: str, steps: int) -> None:
        """Called before a run trains for `steps` optimizer steps."""

    def run_step(self, step: int, loss: float) -> None:
        """Called after every optimizer step of the current run."""

    def run_progress(self, run_id: str, step: int, loss: float) -> None:
        """Called after every optimizer step of `run_id`; calls `run_step` unless overridden.

        With `workers > 1` several runs train at once, so a display of
        concurrent runs overrides this method rather than `run_step`.
        """
        self.run_step(step, loss)

    def run_finished(self, outcome: RunOutcome) -> None:
        """Called after a run completed, diverged or failed."""

    def sweep_finished(self, outcomes: list[RunOutcome]) -> None:
        """Called once after the last run."""


def make_run_id(strategy: str, depth: int, seed: int) -> str:
    """Return a run id such as `pre-L08-s0`, keeping only `[A-Za-z0-9_.]` of the strategy."""
    safe_strategy = re.sub(r"[^A-Za-z0-9_.]", "_", strategy)
    return f"{safe_strategy}-L{depth:02d}-s{seed}"


def grid(config: SweepConfig) -> list[SweepPoint]:
    """Return the runs in execution order: depth, then strategy, then seed."""
    return [
        SweepPoint(strategy=strategy, depth=depth, seed=seed)
        for depth in config.depths
        for strategy in config.norms
        for seed in config.seeds
    ]


def point_configs(
    config: SweepConfig, point: SweepPoint, *, vocab_size: int
) -> tuple[ModelConfig, TrainConfig]:
    """Return the model and training configuration of one run."""
    model_config = ModelConfig(
        depth=point.depth,
        width=config.width,
        heads=config.heads,
        strategy=point.strategy,
        norm=config.norm,
        ffn=config.ffn,
        init=config.init,
        vocab_size=vocab_size,
        max_seq_len=config.seq_len,
        embed_scale=config.embed_scale,
    )
    # Store the scheme "auto" resolves to, so a run's config names its init.
    model_config.init = model_config.resolved_init
    train_config = TrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        lr=config.lr,
        warmup=config.warmup,
        grad_clip=config.grad_clip,
        seed=point.seed,
        device=config.device,
    )
    return model_config, train_config


def varying_hparams(config: SweepConfig) -> list[str]:
    """Return the names of the HParams whose values differ between runs of the grid."""
    values = [run_hparams(*point_configs(config, point, vocab_size=BYTE_VOCAB_SIZE)) for point in grid(config)]
    if not values:
        return []
    return [name for name in values[0] if len({each[name] for each in values}) > 1]


def run_config(model_config: ModelConfig, train_config: TrainConfig, data_name: str) -> dict[str, Any]:
    """Return the JSON-ready configuration stored with a run and compared on reruns."""
    values = {"model": asdict(model_config), "train": asdict(train_config), "data": data_name}
    # A JSON round trip turns tuples into lists, as they come back from the store.
    return json.loads(json.dumps(values))


def run_sweep(
    config: SweepConfig,
    reporter: SweepReporter | None = None,
    *,
    workers: int = 1,
    threads_per_worker: int | None = None,
    shard: Shard | None = None,
) -> list[RunOutcome]:
    """Train the runs of the grid that have not finished yet, and return every outcome.

    Each run is written to the sweep folder (`config.out`) as it trains: its
    metrics and status to the run store, its scalars to `tb/<run_id>/`. A run
    that raises an exception is recorded as `failed` with the error text, and
    the sweep continues. A diverged run is recorded as `diverged` at its step,
    and the sweep continues. On KeyboardInterrupt the current runs stay
    `running` (so the next invocation reruns them), the store is closed, and
    the interrupt propagates.

    `workers > 1` trains that many runs at once in worker processes (see
    `stabiliscope.experiments.workers`), each with `threads_per_worker`
    intra-op threads, 1 by default. With one worker the runs train in this
    process, with torch's thread count unless `threads_per_worker` is given.
    `shard` trains only that shard's part of the grid, into the shard's own
    store file. Outcomes are returned in grid order either way. Workers
    start with the "spawn" method, which imports the caller's main module
    again, so a script that calls this with `workers > 1` needs an
    `if __name__ == "__main__":` guard.

    Raises ConfigError for an invalid configuration or sweep folder, for data
    too short for one sequence, when another sweep holds the store's lock,
    and when the sweep folder already contains a finished run with the same
    id but a different configuration. Raises WorkerError when a worker
    process fails outside a run.
    """
    reporter = reporter or SweepReporter()
    config.validate()
    check_execution(workers, threads_per_worker)

    corpus = load_corpus(config.data)
    check_sequence_fits(corpus, config.seq_len)
    data_name = BUILTIN_CORPUS_NAME if config.data is None else str(Path(config.data).resolve())

    out = Path(config.out)
    prepare_sweep_folder(out)
    filename = store_filename(shard)
    points = grid(config) if shard is None else shard.select(grid(config))
    if not points:
        logger.warning("shard %s of a grid of %d runs contains no runs", shard, len(grid(config)))

    # Bad store files are rejected before the lock file is created next to them.
    check_existing_store(out / filename)
    finished_elsewhere = finished_runs_in_other_stores(out, filename)
    if not (out / filename).exists():
        # Check against the other stores first, so a rejected sweep creates no store or lock file.
        for point in points:
            _plan_run(None, finished_elsewhere, config, point, corpus, data_name)

    with StoreLock(out / filename), RunStore.open(out, filename=filename) as store:
        plans = [_plan_run(store, finished_elsewhere, config, point, corpus, data_name) for point in points]

        store.set_meta(SWEEP_CONFIG_KEY, config.to_dict())
        write_json_atomic(out / SWEEP_JSON, config.to_dict())

        to_train = [plan for plan in plans if plan.finished_run is None]
        logger.info(
            "sweep %s: %d runs, %d already finished, %d to train",
            out,
            len(plans),
            len(plans) - len(to_train),
            len(to_train),
        )
        reporter.sweep_started(len(plans), len(to_train))

        # Parallel runs get one thread each unless told otherwise; a serial
        # sweep keeps torch's thread count.
        threads = threads_per_worker
        if threads is None and workers > 1:
            threads = 1
        if workers > 1 and len(to_train) > 1:
            outcomes = _run_in_workers(store, filename, config, plans, workers, threads, reporter)
        else:
            with _torch_threads(threads):
                outcomes = _run_here(store, out, config, plans, corpus, reporter)

    reporter.sweep_finished(outcomes)
    return outcomes


def check_execution(workers: int, threads_per_worker: int | None) -> None:
    """Raise ConfigError unless `workers` and `threads_per_worker` are positive integers."""
    _check_int("workers (--workers)", workers, minimum=1)
    if threads_per_worker is not None:
        _check_int("threads_per_worker (--threads-per-worker)", threads_per_worker, minimum=1)


def _run_here(
    store: RunStore,
    out: Path,
    config: SweepConfig,
    plans: list[_RunPlan],
    corpus: Corpus,
    reporter: SweepReporter,
) -> list[RunOutcome]:
    outcomes: list[RunOutcome] = []
    for plan in plans:
        if plan.finished_run is not None:
            outcome = _outcome_from_row(plan.finished_run, skipped=True)
            reporter.run_skipped(outcome)
        else:
            outcome = _train_one(store, out, config, plan, corpus, reporter)
            reporter.run_finished(outcome)
        outcomes.append(outcome)
    return outcomes


def _run_in_workers(
    store: RunStore,
    filename: str,
    config: SweepConfig,
    plans: list[_RunPlan],
    workers: int,
    threads: int,
    reporter: SweepReporter,
) -> list[RunOutcome]:
    skipped: dict[str, RunOutcome] = {}
    for plan in plans:
        if plan.finished_run is not None:
            skipped[plan.point.run_id] = _outcome_from_row(plan.finished_run, skipped=True)
            reporter.run_skipped(skipped[plan.point.run_id])

    to_train = [plan for plan in plans if plan.finished_run is None]
    trained = train_in_workers(
        to_train,
        config=config,
        store=store,
        store_filename=filename,
        workers=workers,
        threads=threads,
        reporter=reporter,
    )
    by_id = {**skipped, **{outcome.run_id: outcome for outcome in trained}}
    return [by_id[plan.point.run_id] for plan in plans]


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the enclosed block, when `threads` is given."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _RunPlan:
    point: SweepPoint
    model_config: ModelConfig
    train_config: TrainConfig
    config: dict[str, Any]
    finished_run: RunRow | None
    """The finished run to skip, or None when the run must be trained."""


def _plan_run(
    store: RunStore | None,
    finished_elsewhere: dict[str, tuple[RunRow, Path]],
    config: SweepConfig,
    point: SweepPoint,
    corpus: Corpus,
    data_name: str,
) -> _RunPlan:
    model_config, train_config = point_configs(config, point, vocab_size=corpus.vocab_size)
    new_config = run_config(model_config, train_config, data_name)

    existing = None if store is None else store.get_run(point.run_id)
    where = ""
    if (existing is None or not existing.finished) and point.run_id in finished_elsewhere:
        # Finished by another shard layout or an unsharded run of this folder.
        existing, path = finished_elsewhere[point.run_id]
        where = f" (in {path.name})"
    if existing is None or not existing.finished:
        return _RunPlan(point, model_config, train_config, new_config, finished_run=None)

    differences = describe_differences(existing.config, new_config)
    if differences:
        raise ConfigError(
            f"sweep folder {str(config.out)!r} already contains run {point.run_id}{where} with a "
            f"different configuration ({'; '.join(differences)}); use another --out"
        )
    return _RunPlan(point, model_config, train_config, new_config, finished_run=existing)


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Return `name old vs new` for each leaf value that differs between two run configs."""
    old_leaves = _flatten(old)
    new_leaves = _flatten(new)
    differences = []
    for key in sorted(set(old_leaves) | set(new_leaves)):
        old_value = old_leaves.get(key, "<absent>")
        new_value = new_leaves.get(key, "<absent>")
        if old_value != new_value:
            name = key.rsplit(".", 1)[-1]
            differences.append(f"{name} {_format_value(old_value)} vs {_format_value(new_value)}")
    return differences


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(_flatten(value, prefix=f"{name}."))
        else:
            leaves[name] = value
    return leaves


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _train_one(
    store: RunStore,
    out: Path,
    config: SweepConfig,
    plan: _RunPlan,
    corpus: Corpus,
    reporter: SweepReporter,
) -> RunOutcome:
    point = plan.point
    run_id = point.run_id

    tb_dir = out / TB_FOLDER / run_id
    if tb_dir.exists():
        # Event files of an earlier, unfinished attempt would overlap the new run's steps.
        logger.info("removing TensorBoard files of an earlier attempt of %s", run_id)
        shutil.rmtree(tb_dir)

    store.begin_run(
        run_id,
        plan.config,
        strategy=point.strategy,
        depth=point.depth,
        width=config.width,
        seed=point.seed,
    )
    # Every run carries the layout of the whole grid and its own hparams. The
    # watch closes the sink inside train(), before the outcome is known.
    tb_sink = TensorBoardSink(
        tb_dir,
        await_outcome=True,
        total_steps=config.steps,
        layout_depths=config.depths,
        hparams=run_hparams(plan.model_config, plan.train_config),
        hparams_differ=varying_hparams(config),
        description=f"```json\n{json.dumps(plan.config, indent=2)}\n```",
    )
    sinks = [StoreSink(store, run_id), tb_sink]

    def report_step(step: int, loss: float) -> None:
        reporter.run_progress(run_id, step, loss)

    logger.info("run %s started", run_id)
    reporter.run_started(run_id, config.steps)
    try:
        result = train(plan.model_config, plan.train_config, corpus, sinks=sinks, on_step=report_step)
    except KeyboardInterrupt:
        logger.warning("run %s interrupted; it stays unfinished and reruns next time", run_id)
        store.mark_interrupted(run_id)
        raise
    except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
        error_text = f"{type(error).__name__}: {error}"
        logger.error("run %s failed: %s", run_id, error_text)
        logger.debug("traceback of the failure of run %s", run_id, exc_info=True)
        store.fail_run(run_id, error_text)
        tb_sink.set_outcome("failed")
        return failed_outcome(point, error_text)
    else:
        tb_sink.set_outcome(
            result.status, diverged_step=result.diverged_step, final_val_loss=result.final_val_loss
        )
    finally:
        tb_sink.close()

    events = []
    if result.status == "diverged":
        events.append(
            EventRow(
                result.diverged_step if result.diverged_step is not None else result.steps_done,
                "diverged",
                metric="loss",
                value=result.final_train_loss,
                detail={"steps_done": result.steps_done},
            )
        )
    # The TensorBoard files are closed above, so a run marked finished has all its files.
    store.finish_run(
        run_id,
        status=result.status,
        diverged_step=result.diverged_step,
        final_train_loss=result.final_train_loss,
        final_val_loss=result.final_val_loss,
        spike_count=result.spike_count,
        wall_time_s=result.wall_time_s,
        tokens_per_s=result.tokens_per_s,
        events=events,
    )
    if result.status == "diverged":
        logger.info("run %s diverged at step %s", run_id, result.diverged_step)
    else:
        logger.info("run %s %s in %.1f s", run_id, result.status, result.wall_time_s)

    return RunOutcome(
        run_id=run_id,
        strategy=point.strategy,
        depth=point.depth,
        seed=point.seed,
        status=result.status,
        diverged_step=result.diverged_step,
        final_train_loss=result.final_train_loss,
        final_val_loss=result.final_val_loss,
        spike_count=result.spike_count,
        wall_time_s=result.wall_time_s,
    )


def failed_outcome(point: SweepPoint, error_text: str) -> RunOutcome:
    """Return the outcome of a run of `point` that failed with `error_text`."""
    return RunOutcome(
        run_id=point.run_id,
        strategy=point.strategy,
        depth=point.depth,
        seed=point.seed,
        status="failed",
        error=error_text,
    )


def _outcome_from_row(row: RunRow, *, skipped: bool) -> RunOutcome:
    return RunOutcome(
        run_id=row.run_id,
        strategy=row.strategy,
        depth=row.depth,
        seed=row.seed,
        status=row.status,
        skipped=skipped,
        diverged_step=row.diverged_step,
        final_train_loss=row.final_train_loss,
        final_val_loss=row.final_val_loss,
        spike_count=row.spike_count,
        wall_time_s=row.wall_time_s,
        error=row.error,
    )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def _check_int_list(name: str, values: list[int], *, minimum: int) -> None:
    if not values:
        raise ConfigError(f"{name} is empty; give at least one value")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
            raise ConfigError(f"{name} must contain only {kind}, got {value!r}")
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ConfigError(f"{name} lists {duplicates[0]} more than once; give each value once")


def _check_names(name: str, values: list[str], accepted: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError(f"{name} is empty; give at least one of: {', '.join(accepted)}")
    for value in values:
        if value not in accepted:
            raise ConfigError(
                f"unknown norm strategy {value!r} in {name}; expected one of: {', '.join(accepted)}"
            )
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ConfigError(f"{name} lists {duplicates[0]!r} more than once; give each value once")


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"unknown {name} {value!r}; expected one of: {', '.join(accepted)}")
