"""`--shard K/N`: a deterministic split of the grid, one store file per shard, read as one sweep."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from stabiliscope import cli
from stabiliscope.errors import ConfigError
from stabiliscope.experiments.shards import Shard, SweepReader, find_store_files
from stabiliscope.experiments.sweep import SweepConfig, SweepPoint, grid, run_sweep
from stabiliscope.sinks.store import RunStore
from sweep_processes import start_cli, stop_dashboard, wait_until

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GRID = {
    "norms": ["pre", "post"],
    "depths": [2, 3],
    "width": 16,
    "heads": 2,
    "steps": 3,
    "batch_size": 2,
    "seq_len": 16,
    "lr": 3e-3,
    "warmup": 1,
}
RUN_IDS = ["pre-L02-s0", "post-L02-s0", "pre-L03-s0", "post-L03-s0"]


def _points(norms: list[str], depths: list[int], seeds: list[int]) -> list[SweepPoint]:
    config = SweepConfig(**{**GRID, "norms": norms, "depths": depths, "seeds": seeds}, out=Path("unused"))
    return grid(config)


# Parsing and selection


@pytest.mark.parametrize(("text", "index", "count"), [("1/1", 1, 1), ("2/4", 2, 4), (" 3 / 3 ", 3, 3)])
def test_shard_parse_valid(text: str, index: int, count: int) -> None:
    assert Shard.parse(text) == Shard(index, count)


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "-1/2", "x", "1/2/3", "1.5/2", "", "1/", "/2"])
def test_shard_parse_invalid(text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"invalid shard {text!r}") + ".*1 <= K <= N"):
        Shard.parse(text)


def test_shard_store_filename() -> None:
    assert Shard(2, 4).store_filename == "store-2-of-4.sqlite"


@pytest.mark.parametrize("count", [1, 2, 3, 5, 12, 13])
def test_shards_partition_grid(count: int) -> None:
    points = _points(["pre", "post", "hybrid"], [2, 4, 8, 16], [0])
    parts = [Shard(index, count).select(points) for index in range(1, count + 1)]

    assert sorted(point.run_id for part in parts for point in part) == sorted(point.run_id for point in points)
    assert max(len(part) for part in parts) - min(len(part) for part in parts) <= 1


def test_shard_selection_ignores_list_order() -> None:
    forward = _points(["pre", "post"], [2, 4, 8], [0, 1])
    backward = _points(["post", "pre"], [8, 4, 2], [1, 0])
    for index in (1, 2, 3):
        shard = Shard(index, 3)
        assert {p.run_id for p in shard.select(forward)} == {p.run_id for p in shard.select(backward)}


def test_shard_spreads_depths() -> None:
    # Sorted by depth first, every other point goes to each of 2 shards.
    points = _points(["pre", "post"], [2, 16], [0])
    assert [point.run_id for point in Shard(1, 2).select(points)] == ["post-L02-s0", "post-L16-s0"]
    assert [point.run_id for point in Shard(2, 2).select(points)] == ["pre-L02-s0", "pre-L16-s0"]


def test_shard_keeps_grid_order() -> None:
    points = _points(["pre", "post"], [3, 2], [0, 1])
    chosen = Shard(1, 2).select(points)
    assert chosen == [point for point in points if point in chosen]


# Sharded sweeps


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "sweep"
    for index in (1, 2):
        run_sweep(SweepConfig(**GRID, out=out), shard=Shard(index, 2))
    return out


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "whole"
    run_sweep(SweepConfig(**GRID, out=out))
    return out


@pytest.fixture
def sharded_copy(sharded: Path, tmp_path: Path) -> Path:
    """A copy of the sharded sweep folder, for tests that write into it."""
    copy = tmp_path / "sweep"
    shutil.copytree(sharded, copy)
    return copy


def _run_ids(store_path: Path) -> list[str]:
    with sqlite3.connect(store_path) as connection:
        return sorted(row[0] for row in connection.execute("SELECT run_id FROM runs"))


def test_each_shard_writes_own_store(sharded: Path) -> None:
    assert [path.name for path in find_store_files(sharded)] == ["store-1-of-2.sqlite", "store-2-of-2.sqlite"]


def test_shard_stores_split_runs(sharded: Path) -> None:
    first = _run_ids(sharded / "store-1-of-2.sqlite")
    second = _run_ids(sharded / "store-2-of-2.sqlite")
    assert first == ["post-L02-s0", "post-L03-s0"]
    assert second == ["pre-L02-s0", "pre-L03-s0"]


def test_shards_share_tensorboard_folder(sharded: Path) -> None:
    assert sorted(path.name for path in (sharded / "tb").iterdir()) == sorted(RUN_IDS)


def test_reader_lists_runs_of_every_shard(sharded: Path) -> None:
    with SweepReader.open(sharded) as reader:
        assert sorted(run.run_id for run in reader.list_runs()) == sorted(RUN_IDS)
        assert reader.get_run("pre-L03-s0").status == "completed"
        assert reader.recorded_steps("post-L02-s0", "grad/mlp.out") == [0, 1, 2]


def test_report_of_shards_equals_unsharded(sharded: Path, unsharded: Path) -> None:
    runner = CliRunner()
    sharded_report = runner.invoke(cli.main, ["report", str(sharded), "--format", "json"])
    whole_report = runner.invoke(cli.main, ["report", str(unsharded), "--format", "json"])
    assert sharded_report.exit_code == 0, sharded_report.output
    assert json.loads(sharded_report.stdout) == json.loads(whole_report.stdout)


def test_report_names_unrun_shard_runs(sharded_copy: Path) -> None:
    (sharded_copy / "store-2-of-2.sqlite").unlink()
    result = CliRunner().invoke(cli.main, ["report", str(sharded_copy), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [row["strategy"] for row in json.loads(result.stdout)] == ["post", "post"]
    assert "Not recorded yet: 2 runs of the sweep's grid (pre-L02-s0, pre-L03-s0)" in result.stderr


def test_report_of_whole_grid_names_nothing(sharded: Path) -> None:
    result = CliRunner().invoke(cli.main, ["report", str(sharded)])
    assert result.exit_code == 0, result.output
    assert "Not recorded yet" not in result.stderr


def test_unsharded_rerun_skips_shard_runs(sharded_copy: Path) -> None:
    outcomes = run_sweep(SweepConfig(**GRID, out=sharded_copy))
    assert [outcome.skipped for outcome in outcomes] == [True] * 4


def test_other_split_skips_finished_runs(sharded_copy: Path) -> None:
    outcomes = run_sweep(SweepConfig(**GRID, out=sharded_copy), shard=Shard(1, 3))
    assert outcomes
    assert all(outcome.skipped for outcome in outcomes)


def test_shard_with_other_config_rejected(sharded_copy: Path) -> None:
    config = SweepConfig(**{**GRID, "lr": 0.01}, out=sharded_copy)
    with pytest.raises(ConfigError, match=r"post-L02-s0 \(in store-1-of-2.sqlite\) with a different configuration"):
        run_sweep(config, shard=Shard(1, 3))


def test_rejected_shard_creates_no_files(sharded_copy: Path) -> None:
    before = sorted(path.name for path in sharded_copy.iterdir())
    with pytest.raises(ConfigError, match="with a different configuration"):
        run_sweep(SweepConfig(**{**GRID, "lr": 0.01}, out=sharded_copy))
    assert sorted(path.name for path in sharded_copy.iterdir()) == before
    assert "store.sqlite" not in before


def test_reader_prefers_finished_copy(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, filename="store-1-of-2.sqlite") as stale:
        stale.begin_run("pre-L02-s0", {"lr": 1}, strategy="pre", depth=2, width=16, seed=0)
    with RunStore.open(tmp_path, filename="store.sqlite") as fresh:
        fresh.begin_run("pre-L02-s0", {"lr": 1}, strategy="pre", depth=2, width=16, seed=0)
        fresh.finish_run(
            "pre-L02-s0",
            status="completed",
            diverged_step=None,
            final_train_loss=3.0,
            final_val_loss=3.1,
            spike_count=0,
            wall_time_s=1.0,
            tokens_per_s=1.0,
        )
    with SweepReader.open(tmp_path) as reader:
        assert reader.get_run("pre-L02-s0").status == "completed"
        assert reader.path_of("pre-L02-s0").name == "store.sqlite"


def test_reader_skips_store_without_tables(tmp_path: Path) -> None:
    (tmp_path / "store-2-of-2.sqlite").write_bytes(b"")
    RunStore.open(tmp_path, filename="store-1-of-2.sqlite").close()
    with SweepReader.open(tmp_path) as reader:
        assert [path.name for path in reader.paths] == ["store-1-of-2.sqlite"]


def test_find_store_files_ignores_other_names(tmp_path: Path) -> None:
    for name in ("store.sqlite", "store-1-of-2.sqlite", "store-0-of-2.sqlite", "store.sqlite-wal", "other.sqlite"):
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in find_store_files(tmp_path)] == ["store.sqlite", "store-1-of-2.sqlite"]


# CLI


def test_sweep_cli_shard_writes_shard_store(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    arguments = [
        "sweep",
        "--norms",
        "pre,post",
        "--depths",
        "2",
        "--width",
        "16",
        "--heads",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--shard",
        "2/2",
    ]
    result = CliRunner().invoke(cli.main, arguments)
    assert result.exit_code == 0, result.output
    assert f"Run store: {out / 'store-2-of-2.sqlite'}" in result.stdout
    assert _run_ids(out / "store-2-of-2.sqlite") == ["pre-L02-s0"]


PROBE = """
[source]
authors = "Doe et al."
year = 2020
title = "A Paper"
where = "Figure 1"

[experiment]
strategies = ["pre"]
depths = [2, 3]
width = 16
heads = 2
steps = 0
lr = 1e-3
batch_size = 2
seq_len = 16
seeds = [0]

[[claim]]
id = "ratio-at-least-one"
statement = "A max/min ratio is at least one."
metric = "grad/mlp.out"
reduce = "max_over_min"
strategy = "pre"
expect = [1.0, 1e30]
"""


def test_probe_reads_shards_as_one_sweep(tmp_path: Path) -> None:
    probe_file = tmp_path / "tiny.toml"
    probe_file.write_text(PROBE)
    out = tmp_path / "probes"
    runner = CliRunner()

    for shard in ("1/2", "2/2"):
        result = runner.invoke(cli.main, ["probe", str(probe_file), "--out", str(out), "--shard", shard])
        assert result.exit_code == 0, result.output
        assert "repeat the command without --shard" in " ".join(result.stdout.split())

    checked = runner.invoke(cli.main, ["probe", str(probe_file), "--out", str(out), "--json"])

    assert checked.exit_code == 0, checked.output
    document = json.loads(checked.stdout)
    assert document[0]["claims"][0]["verdict"] == "PASS"
    assert [path.name for path in find_store_files(out / "tiny")] == [
        "store.sqlite",
        "store-1-of-2.sqlite",
        "store-2-of-2.sqlite",
    ]
    assert _run_ids(out / "tiny" / "store.sqlite") == []


def test_dashboard_serves_runs_of_every_shard(sharded: Path, tmp_path: Path, free_port: int) -> None:
    process = start_cli(["dashboard", str(sharded), "--port", str(free_port)], tmp_path, "dashboard")
    url = f"http://127.0.0.1:{free_port}/data/runs"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def runs_listed() -> bool:
        try:
            with opener.open(url, timeout=5) as response:
                return sorted(json.loads(response.read())) == sorted(RUN_IDS)
        except OSError:
            return False

    try:
        wait_until(runs_listed, process)
    finally:
        stop_dashboard(process, tmp_path, "dashboard")
