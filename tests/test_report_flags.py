"""`report` shows runs that diverged, saw NaN or Inf, failed or did not finish.

A NaN is injected into the attention output of block 1 at step 2 of a real
sweep run, through a forward hook added when the model is built. The watch
locates it, the store records it, and the report shows where it was.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from stabiliscope import cli
from stabiliscope import train as train_module
from stabiliscope.experiments.sweep import SweepConfig, run_sweep
from stabiliscope.sinks.store import RunStore, StoreSink
from stabiliscope.watch.records import NonfiniteEvent, StepRecord

pytestmark = pytest.mark.usefixtures("single_torch_thread")

NAN_STEP = 2
NAN_BLOCK = 1
GRID = {
    "norms": ["pre"],
    "depths": [2],
    "width": 16,
    "heads": 2,
    "steps": 5,
    "batch_size": 2,
    "seq_len": 16,
    "lr": 3e-3,
    "warmup": 1,
}


def _build_model_with_nan(real_build_model):
    def build(config):
        model = real_build_model(config)
        calls = {"train": 0}

        def inject(module, inputs, output):
            if not module.training:
                return None
            step = calls["train"]
            calls["train"] += 1
            if step != NAN_STEP:
                return None
            poisoned = output.clone()
            poisoned[0, 0, 0] = math.nan
            return poisoned

        model.blocks[NAN_BLOCK].attn.register_forward_hook(inject)
        return model

    return build


@pytest.fixture(scope="module")
def poisoned_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "sweep"
    patch = pytest.MonkeyPatch()
    patch.setattr(train_module, "build_model", _build_model_with_nan(train_module.build_model))
    try:
        run_sweep(SweepConfig(**GRID, out=out))
    finally:
        patch.undo()
    return out


def _report(out: Path, *options: str):
    return CliRunner().invoke(cli.main, ["report", str(out), *options])


def test_poisoned_run_diverges_at_nan_step(poisoned_sweep: Path) -> None:
    with RunStore(poisoned_sweep / "store.sqlite", read_only=True) as store:
        run = store.get_run("pre-L02-s0")
    assert run.status == "diverged"
    assert run.diverged_step == NAN_STEP


def test_store_records_nonfinite_event(poisoned_sweep: Path) -> None:
    with RunStore(poisoned_sweep / "store.sqlite", read_only=True) as store:
        events = store.events("pre-L02-s0", kind="nonfinite")
    assert len(events) == 1
    assert events[0]["step"] == NAN_STEP
    assert events[0]["detail"] == {"block": NAN_BLOCK, "position": "attn_out", "direction": "forward", "count": 1}


def test_report_table_locates_nan(poisoned_sweep: Path) -> None:
    result = _report(poisoned_sweep)
    assert result.exit_code == 0, result.output
    assert "Runs that diverged, saw NaN or Inf, failed or are unfinished" in result.stdout
    assert f"step {NAN_STEP}, block {NAN_BLOCK}, attn_out (forward)" in result.stdout


def test_report_table_shows_diverged_step(poisoned_sweep: Path) -> None:
    lines = [line for line in _report(poisoned_sweep).stdout.splitlines() if "pre-L02-s0" in line]
    assert len(lines) == 1
    assert "diverged" in lines[0]
    assert f"step {NAN_STEP}" in lines[0]


def test_report_json_lists_first_nonfinite(poisoned_sweep: Path) -> None:
    rows = json.loads(_report(poisoned_sweep, "--format", "json").stdout)
    assert rows[0]["first_nonfinite"] == [
        {"seed": 0, "step": NAN_STEP, "block": NAN_BLOCK, "position": "attn_out", "direction": "forward", "count": 1}
    ]
    assert rows[0]["diverged_steps"] == [NAN_STEP]


def test_report_csv_lists_first_nonfinite(poisoned_sweep: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(_report(poisoned_sweep, "--format", "csv").stdout)))
    assert rows[0]["first_nonfinite"] == f"seed 0: step {NAN_STEP}, block {NAN_BLOCK}, attn_out (forward)"


def test_clean_sweep_has_no_flagged_table(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(SweepConfig(**{**GRID, "steps": 2}, out=out))
    result = _report(out)
    assert result.exit_code == 0
    assert "Runs that diverged" not in result.stdout


def test_report_flags_backward_failed_and_unfinished(sweep_dir: Path, make_records) -> None:
    backward = NonfiniteEvent(step=1, block=0, position="resid_post", direction="backward", count=12)
    records = make_records(steps=2, depth=2)
    records[1] = StepRecord(records[1].step, records[1].scalars, records[1].blocks, first_nonfinite=backward)
    with RunStore.open(sweep_dir) as store:
        for run_id, strategy in (("pre-L02-s0", "pre"), ("post-L02-s0", "post"), ("hybrid-L02-s0", "hybrid")):
            store.begin_run(run_id, {}, strategy=strategy, depth=2, width=16, seed=0)
        StoreSink(store, "pre-L02-s0").write(records, [])
        store.finish_run(
            "pre-L02-s0",
            status="completed",
            diverged_step=None,
            final_train_loss=3.0,
            final_val_loss=3.1,
            spike_count=0,
            wall_time_s=1.0,
            tokens_per_s=1.0,
        )
        store.fail_run("post-L02-s0", "RuntimeError: out of memory")

    result = _report(sweep_dir)

    lines = {line.split()[1]: line for line in result.stdout.splitlines() if "-L02-s0" in line}
    assert "step 1, block 0, resid_post (backward)" in lines["pre-L02-s0"]
    assert "12" in lines["pre-L02-s0"]
    assert "failed" in lines["post-L02-s0"]
    assert "RuntimeError: out of memory" in lines["post-L02-s0"]
    assert "unfinished" in lines["hybrid-L02-s0"]
