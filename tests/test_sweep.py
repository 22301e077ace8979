"""Tests for the sweep grid, resume and failure handling.

Runs use the real trainer on the built-in corpus with tiny models. Failures,
interrupts and divergence are injected by wrapping the trainer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from stabiliscope.errors import ConfigError, DataError
from stabiliscope.experiments import sweep as sweep_module
from stabiliscope.experiments.sweep import (
    RunOutcome,
    SweepConfig,
    SweepReporter,
    describe_differences,
    grid,
    make_run_id,
    run_sweep,
)
from stabiliscope.sinks.store import RunStore
from stabiliscope.train import RunResult

pytestmark = pytest.mark.usefixtures("single_torch_thread")

REAL_TRAIN = sweep_module.train


def _config(out: Path, **overrides: object) -> SweepConfig:
    values: dict[str, object] = {
        "norms": ["pre"],
        "depths": [2],
        "width": 16,
        "heads": 2,
        "steps": 3,
        "batch_size": 2,
        "seq_len": 16,
        "lr": 3e-3,
        "warmup": 1,
        "seeds": [0],
        "out": out,
    }
    values.update(overrides)
    return SweepConfig(**values)


class RecordingReporter(SweepReporter):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sweep_started(self, total_runs: int, runs_to_train: int) -> None:
        self.calls.append(("sweep_started", total_runs, runs_to_train))

    def run_skipped(self, outcome: RunOutcome) -> None:
        self.calls.append(("run_skipped", outcome.run_id))

    def run_started(self, run_id: str, steps: int) -> None:
        self.calls.append(("run_started", run_id, steps))

    def run_step(self, step: int, loss: float) -> None:
        self.calls.append(("run_step", step))

    def run_finished(self, outcome: RunOutcome) -> None:
        self.calls.append(("run_finished", outcome.run_id, outcome.status))


# Grid and configuration


def test_run_id_format() -> None:
    assert make_run_id("pre", 8, 0) == "pre-L08-s0"


def test_run_id_replaces_unsafe_characters() -> None:
    assert make_run_id("a/b c", 16, 2) == "a_b_c-L16-s2"


def test_grid_order_depth_norm_seed(tmp_path: Path) -> None:
    config = _config(tmp_path, norms=["pre", "post"], depths=[4, 2], seeds=[0, 1])
    assert [point.run_id for point in grid(config)] == [
        "pre-L04-s0",
        "pre-L04-s1",
        "post-L04-s0",
        "post-L04-s1",
        "pre-L02-s0",
        "pre-L02-s1",
        "post-L02-s0",
        "post-L02-s1",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norms": ["pre", "prenorm"]}, "'prenorm'"),
        ({"norms": []}, "norms is empty"),
        ({"depths": [2, 0]}, "depths must contain only positive integers, got 0"),
        ({"depths": [2, 2]}, "depths lists 2 more than once"),
        ({"seeds": [-1]}, "seeds must contain only integers >= 0, got -1"),
        ({"width": 30, "heads": 4}, "width 30 is not divisible by heads 4"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"lr": math.nan}, "lr must be a positive finite number"),
        ({"warmup": -1}, "warmup must be an integer >= 0, got -1"),
        ({"init": "orthogonal"}, "unknown init 'orthogonal'"),
        ({"norm": "batch"}, "unknown norm 'batch'"),
        ({"ffn": "moe"}, "unknown ffn 'moe'"),
        ({"grad_clip": 0.0}, "grad_clip (--grad-clip) must be a positive finite number"),
        ({"device": "tpu"}, "'tpu'"),
    ],
)
def test_validate_names_bad_value(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(tmp_path, **overrides).validate()


def test_validate_accepts_defaults(tmp_path: Path) -> None:
    _config(tmp_path).validate()


def test_describe_differences_names_leaf() -> None:
    old = {"train": {"lr": 0.003, "steps": 3}, "data": "builtin"}
    new = {"train": {"lr": 0.01, "steps": 3}, "data": "builtin"}
    assert describe_differences(old, new) == ["lr 0.003 vs 0.01"]


# Running


def test_sweep_records_completed_runs(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    outcomes = run_sweep(_config(out, norms=["pre", "post"]))
    assert [outcome.status for outcome in outcomes] == ["completed", "completed"]
    with RunStore.open(out) as store:
        runs = store.list_runs()
        assert [run.status for run in runs] == ["completed", "completed"]
        assert store.recorded_steps("pre-L02-s0", "grad/mlp.out") == [0, 1, 2]
    assert (out / "tb" / "pre-L02-s0").is_dir()
    assert json.loads((out / "sweep.json").read_text())["norms"] == ["pre", "post"]


def test_sweep_stores_run_config(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(_config(out))
    with RunStore.open(out) as store:
        config = store.get_run("pre-L02-s0").config
    assert config["train"]["lr"] == 3e-3
    assert config["model"]["depth"] == 2
    assert config["data"] == "builtin:pydoc_data.topics"


def test_sweep_reports_progress(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    run_sweep(_config(tmp_path / "sweep"), reporter)
    assert reporter.calls[0] == ("sweep_started", 1, 1)
    assert reporter.calls[1] == ("run_started", "pre-L02-s0", 3)
    assert [call for call in reporter.calls if call[0] == "run_step"] == [
        ("run_step", 0),
        ("run_step", 1),
        ("run_step", 2),
    ]
    assert reporter.calls[-1] == ("run_finished", "pre-L02-s0", "completed")


def test_rerun_skips_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(_config(out))
    with RunStore.open(out) as store:
        started_before = store.get_run("pre-L02-s0").started_at

    reporter = RecordingReporter()
    outcomes = run_sweep(_config(out), reporter)

    assert outcomes[0].skipped is True
    assert outcomes[0].status == "completed"
    assert reporter.calls == [("sweep_started", 1, 0), ("run_skipped", "pre-L02-s0")]
    with RunStore.open(out) as store:
        assert store.get_run("pre-L02-s0").started_at == started_before


def test_rerun_with_other_lr_rejected(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(_config(out))
    with pytest.raises(ConfigError, match=r"pre-L02-s0 .*\(lr 0.003 vs 0.01\); use another --out"):
        run_sweep(_config(out, lr=0.01))


def test_rerun_extends_grid(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(_config(out))
    outcomes = run_sweep(_config(out, seeds=[0, 1]))
    assert [(outcome.run_id, outcome.skipped) for outcome in outcomes] == [
        ("pre-L02-s0", True),
        ("pre-L02-s1", False),
    ]


def test_missing_data_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.txt"):
        run_sweep(_config(tmp_path / "sweep", data=tmp_path / "missing.txt"))


def test_short_data_raises_data_error(tmp_path: Path) -> None:
    data = tmp_path / "short.txt"
    data.write_text("too short")
    with pytest.raises(DataError, match="seq-len"):
        run_sweep(_config(tmp_path / "sweep", data=data))


def test_failed_run_recorded_and_sweep_continues(tmp_path: Path, monkeypatch) -> None:
    def train_failing_post(model_config, *args, **kwargs):
        if model_config.strategy == "post":
            raise RuntimeError("simulated failure")
        return REAL_TRAIN(model_config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train", train_failing_post)
    out = tmp_path / "sweep"
    outcomes = run_sweep(_config(out, norms=["post", "pre"]))

    assert [outcome.status for outcome in outcomes] == ["failed", "completed"]
    assert outcomes[0].error == "RuntimeError: simulated failure"
    with RunStore.open(out) as store:
        failed = store.get_run("post-L02-s0")
    assert failed.status == "failed"
    assert failed.error == "RuntimeError: simulated failure"


def test_failed_run_reruns(tmp_path: Path, monkeypatch) -> None:
    def train_failing(*args, **kwargs):
        raise RuntimeError("simulated failure")

    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep_module, "train", train_failing)
    run_sweep(_config(out))
    monkeypatch.setattr(sweep_module, "train", REAL_TRAIN)

    outcomes = run_sweep(_config(out))

    assert outcomes[0].skipped is False
    assert outcomes[0].status == "completed"


def test_interrupt_leaves_run_unfinished(tmp_path: Path, monkeypatch, make_records) -> None:
    def train_interrupted(model_config, train_config, corpus, *, sinks=(), on_step=None):
        for sink in sinks:
            sink.write(make_records(steps=1, depth=model_config.depth), [])
        raise KeyboardInterrupt

    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep_module, "train", train_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_config(out, norms=["pre", "post"]))

    with RunStore.open(out) as store:
        runs = store.list_runs()
    assert [(run.run_id, run.status) for run in runs] == [("pre-L02-s0", "running")]


def test_interrupted_run_reruns_clean(tmp_path: Path, monkeypatch, make_records) -> None:
    stale = make_records(steps=1, depth=2, overrides={(0, "grad/mlp.out", 0): 1234.0})

    def train_interrupted(model_config, train_config, corpus, *, sinks=(), on_step=None):
        for sink in sinks:
            sink.write(stale, [])
        raise KeyboardInterrupt

    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep_module, "train", train_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_config(out))
    monkeypatch.setattr(sweep_module, "train", REAL_TRAIN)

    outcomes = run_sweep(_config(out))

    assert outcomes[0].status == "completed"
    with RunStore.open(out) as store:
        profile = store.block_profile("pre-L02-s0", "grad/mlp.out", 0)
    assert 1234.0 not in profile
    assert len(list((out / "tb" / "pre-L02-s0").glob("events.out.tfevents.*"))) == 1


def test_diverged_run_recorded(tmp_path: Path, monkeypatch) -> None:
    def train_diverging(model_config, train_config, corpus, *, sinks=(), on_step=None):
        result = REAL_TRAIN(model_config, train_config, corpus, sinks=sinks, on_step=on_step)
        return replace(
            result,
            status="diverged",
            diverged_step=2,
            final_train_loss=math.inf,
            final_val_loss=None,
        )

    monkeypatch.setattr(sweep_module, "train", train_diverging)
    out = tmp_path / "sweep"
    outcomes = run_sweep(_config(out, norms=["post", "pre"]))

    assert [outcome.status for outcome in outcomes] == ["diverged", "diverged"]
    with RunStore.open(out) as store:
        run = store.get_run("post-L02-s0")
        events = store.events("post-L02-s0", kind="diverged")
    assert run.diverged_step == 2
    assert run.final_train_loss == math.inf
    assert events[0]["step"] == 2


def test_diverged_run_skipped_on_rerun(tmp_path: Path, monkeypatch) -> None:
    def train_diverging(*args, **kwargs):
        return RunResult(
            status="diverged",
            steps_done=1,
            diverged_step=0,
            final_train_loss=math.nan,
            final_val_loss=None,
            spike_count=0,
            wall_time_s=0.1,
            tokens_per_s=10.0,
        )

    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep_module, "train", train_diverging)
    run_sweep(_config(out))
    monkeypatch.setattr(sweep_module, "train", REAL_TRAIN)

    outcomes = run_sweep(_config(out))

    assert outcomes[0].skipped is True
    assert outcomes[0].status == "diverged"
