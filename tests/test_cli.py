"""Tests for the `stabiliscope` command line through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stabiliscope import cli
from stabiliscope.experiments import sweep as sweep_module
from stabiliscope.models import STRATEGIES
from stabiliscope.sinks.store import RunStore

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# A sweep small enough to finish in about a second on one CPU thread.
TINY_SWEEP = [
    "sweep",
    "--norms",
    "pre,post",
    "--depths",
    "2,3",
    "--width",
    "32",
    "--heads",
    "4",
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--warmup",
    "1",
]


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def _error_lines(result) -> list[str]:
    return result.stderr.strip().splitlines()


# Bad input: exit status 2 and one line that names the value


BAD_SWEEP_OPTIONS = [
    (["--depths", "2,x"], "'x' is not a positive integer (expected a comma list such as 2,4,8)."),
    (["--depths", "2,0"], "'0' is not a positive integer"),
    (["--depths", "4,4"], "'4' is listed more than once"),
    (["--seeds", "0,-1"], "'-1' is not a non-negative integer"),
    (["--norms", "pre,prenorm"], "'prenorm' is not a known norm strategy (known: "),
    (["--width", "30", "--heads", "4"], "width 30 is not divisible by heads 4"),
    (["--width", "0"], "Invalid value for '--width': 0 is not in the range x>=1"),
    (["--heads", "-2"], "Invalid value for '--heads': -2"),
    (["--steps", "0"], "Invalid value for '--steps': 0"),
    (["--batch-size", "0"], "Invalid value for '--batch-size': 0"),
    (["--seq-len", "-1"], "Invalid value for '--seq-len': -1"),
    (["--lr", "0"], "Invalid value for '--lr': 0"),
    (["--lr", "fast"], "Invalid value for '--lr': 'fast'"),
    (["--warmup", "-5"], "Invalid value for '--warmup': -5"),
    (["--init", "orthogonal"], "Invalid value for '--init': 'orthogonal'"),
    (["--norm-type", "batch"], "Invalid value for '--norm-type': 'batch'"),
    (["--ffn", "moe"], "Invalid value for '--ffn': 'moe'"),
    (["--grad-clip", "-1"], "Invalid value for '--grad-clip': -1"),
    (["--data", "no/such/file.txt"], "Invalid value for '--data': Path 'no/such/file.txt' does not exist."),
    (["--device", "tpu"], "Invalid value for '--device': invalid device 'tpu'"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_SWEEP_OPTIONS)
def test_sweep_bad_option_exit_code(arguments: list[str], message: str, tmp_path: Path) -> None:
    # The tiny grid comes first so that, should a bad value be accepted, the
    # test trains a few steps into tmp_path instead of the default sweep.
    result = _invoke(*TINY_SWEEP, "--out", str(tmp_path / "sweep"), *arguments)
    assert result.exit_code == 2


@pytest.mark.parametrize(("arguments", "message"), BAD_SWEEP_OPTIONS)
def test_sweep_bad_option_one_line(arguments: list[str], message: str, tmp_path: Path) -> None:
    result = _invoke(*TINY_SWEEP, "--out", str(tmp_path / "sweep"), *arguments)
    lines = _error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith("Error: ")
    assert message in lines[0]


def test_sweep_cuda_unavailable_message() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here, so --device cuda is valid")
    result = _invoke("sweep", "--device", "cuda")
    assert result.exit_code == 2
    assert _error_lines(result) == [
        "Error: Invalid value for '--device': device 'cuda' requested but CUDA is not "
        "available; use --device cpu"
    ]


def test_sweep_odd_head_size_rejected() -> None:
    result = _invoke("sweep", "--width", "36", "--heads", "4")
    assert result.exit_code == 2
    assert len(_error_lines(result)) == 1
    assert "9" in result.stderr


def test_sweep_out_is_file_rejected(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = _invoke("sweep", "--out", str(target))
    assert result.exit_code == 2
    assert str(target) in result.stderr


def test_unknown_command_one_line() -> None:
    result = _invoke("swep")
    assert result.exit_code == 2
    assert len(_error_lines(result)) == 1
    assert _error_lines(result)[0].startswith("Error: No such command 'swep'.")


def test_sweep_help_documents_units() -> None:
    result = _invoke("sweep", "--help")
    help_text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "Training length of each run, in optimizer steps." in help_text
    assert "Sequence length, in tokens" in help_text


# report


def test_report_without_store_exit_code(tmp_path: Path) -> None:
    result = _invoke("report", str(tmp_path))
    assert result.exit_code == 2
    assert _error_lines(result) == [
        f"Error: '{tmp_path}' contains no run store (store.sqlite); "
        "pass a folder written by 'stabiliscope sweep'"
    ]


def test_report_missing_folder_exit_code(tmp_path: Path) -> None:
    result = _invoke("report", str(tmp_path / "absent"))
    assert result.exit_code == 2
    assert len(_error_lines(result)) == 1


def test_report_bad_format(tmp_path: Path) -> None:
    result = _invoke("report", str(tmp_path), "--format", "xml")
    assert result.exit_code == 2
    assert "'xml'" in result.stderr


def test_report_corrupt_store_one_line(tmp_path: Path) -> None:
    (tmp_path / "store.sqlite").write_bytes(b"not a database" * 100)
    result = _invoke("report", str(tmp_path))
    assert result.exit_code == 2
    assert len(_error_lines(result)) == 1
    assert "store.sqlite" in result.stderr


def test_report_empty_store(tmp_path: Path) -> None:
    RunStore.open(tmp_path).close()
    result = _invoke("report", str(tmp_path))
    assert result.exit_code == 0
    assert "No runs recorded" in result.stdout


def test_report_empty_store_json(tmp_path: Path) -> None:
    RunStore.open(tmp_path).close()
    result = _invoke("report", str(tmp_path), "--format", "json")
    assert json.loads(result.stdout) == []


# norms


def test_norms_lists_every_strategy() -> None:
    result = _invoke("norms")
    assert result.exit_code == 0
    for name in STRATEGIES:
        assert name in result.stdout


def test_norms_shows_equation() -> None:
    result = _invoke("norms")
    assert STRATEGIES["pre"].equation in result.stdout


# dashboard


def test_dashboard_without_tb_folder(tmp_path: Path) -> None:
    result = _invoke("dashboard", str(tmp_path))
    assert result.exit_code == 2
    assert _error_lines(result) == [
        f"Error: '{tmp_path}' contains no TensorBoard folder (tb/); "
        "pass a folder written by 'stabiliscope sweep'"
    ]


def test_dashboard_bad_port(tmp_path: Path) -> None:
    result = _invoke("dashboard", str(tmp_path), "--port", "70000")
    assert result.exit_code == 2
    assert "70000" in result.stderr


class _StubServer:
    """Stands in for TensorBoardServer; binds nothing and stops at the first wait."""

    instances: list[_StubServer] = []

    def __init__(self, logdir: Path, *, host: str, port: int) -> None:
        self.logdir = logdir
        self.host = host
        self.port = port
        self.stopped = False
        _StubServer.instances.append(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        pass

    def wait(self) -> int:
        raise KeyboardInterrupt

    def stop(self) -> None:
        self.stopped = True


def test_dashboard_other_host_warns(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tb").mkdir()
    monkeypatch.setattr(cli, "TensorBoardServer", _StubServer)
    result = _invoke("dashboard", str(tmp_path), "--host", "0.0.0.0", "--port", "6123")
    assert result.exit_code == 0
    assert "reachable from other machines" in result.stderr


def test_dashboard_stops_server_on_interrupt(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tb").mkdir()
    _StubServer.instances.clear()
    monkeypatch.setattr(cli, "TensorBoardServer", _StubServer)
    result = _invoke("dashboard", str(tmp_path), "--port", "6123")
    assert result.exit_code == 0
    assert "http://127.0.0.1:6123/" in result.stdout
    assert _StubServer.instances[0].stopped is True
    assert _StubServer.instances[0].logdir == tmp_path / "tb"
    assert "reachable from other machines" not in result.stderr


# End to end on the built-in corpus


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "sweep"
    result = _invoke(*TINY_SWEEP, "--out", str(out))
    torch.set_num_threads(previous_threads)
    return out, result


def test_sweep_end_to_end_exit_code(finished_sweep) -> None:
    out, result = finished_sweep
    assert result.exit_code == 0, result.output


def test_sweep_end_to_end_prints_table(finished_sweep) -> None:
    out, result = finished_sweep
    assert "Depth sweep summary" in result.stdout
    assert "pre-L03-s0 completed" in result.stdout


def test_sweep_end_to_end_prints_paths(finished_sweep) -> None:
    out, result = finished_sweep
    assert f"Run store: {out / 'store.sqlite'}" in result.stdout
    assert f"TensorBoard logs: {out / 'tb'}" in result.stdout
    assert f"stabiliscope dashboard {out}" in result.stdout


def test_sweep_end_to_end_tb_folders(finished_sweep) -> None:
    out, _ = finished_sweep
    assert sorted(path.name for path in (out / "tb").iterdir()) == [
        "post-L02-s0",
        "post-L03-s0",
        "pre-L02-s0",
        "pre-L03-s0",
    ]


def test_report_json_after_sweep(finished_sweep) -> None:
    out, _ = finished_sweep
    result = _invoke("report", str(out), "--format", "json")
    rows = json.loads(result.stdout)
    assert [(row["strategy"], row["depth"]) for row in rows] == [
        ("pre", 2),
        ("pre", 3),
        ("post", 2),
        ("post", 3),
    ]
    assert len(rows[1]["init_profile"]) == 3
    assert rows[0]["final_steps"] == [2]


def test_report_csv_after_sweep(finished_sweep) -> None:
    out, _ = finished_sweep
    result = _invoke("report", str(out), "--format", "csv")
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("strategy,depth,")
    assert len(lines) == 5


def test_report_table_after_sweep(finished_sweep) -> None:
    out, _ = finished_sweep
    result = _invoke("report", str(out))
    assert result.exit_code == 0
    assert "Depth sweep summary" in result.stdout


def test_sweep_rerun_skips_every_run(finished_sweep) -> None:
    out, _ = finished_sweep
    with RunStore.open(out) as store:
        started_before = {run.run_id: run.started_at for run in store.list_runs()}

    result = _invoke(*TINY_SWEEP, "--out", str(out))

    assert result.exit_code == 0, result.output
    assert "4 of 4 runs finished in an earlier invocation" in result.stdout
    with RunStore.open(out) as store:
        assert {run.run_id: run.started_at for run in store.list_runs()} == started_before


def test_sweep_rerun_other_lr_one_line(finished_sweep) -> None:
    out, _ = finished_sweep
    result = _invoke(*TINY_SWEEP, "--out", str(out), "--lr", "0.01")
    assert result.exit_code == 2
    assert _error_lines(result) == [
        f"Error: sweep folder '{out}' already contains run pre-L02-s0 with a different "
        "configuration (lr 0.003 vs 0.01); use another --out"
    ]


def test_sweep_interrupt_exit_code(tmp_path: Path, monkeypatch) -> None:
    def interrupted_sweep(config, reporter, **execution_options):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_sweep", interrupted_sweep)
    result = _invoke(*TINY_SWEEP, "--out", str(tmp_path / "sweep"))
    assert result.exit_code == cli.EXIT_INTERRUPTED
    assert "Repeat the command" in result.stdout


def test_sweep_failed_run_exit_code(tmp_path: Path, monkeypatch) -> None:
    def train_failing(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(sweep_module, "train", train_failing)
    result = _invoke(*TINY_SWEEP, "--depths", "2", "--out", str(tmp_path / "sweep"))
    assert result.exit_code == 1
    assert "2 run(s) failed: pre-L02-s0, post-L02-s0" in result.stderr
    assert "RuntimeError: simulated failure" in result.stdout


def test_version_option() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0
    assert "stabiliscope, version" in result.output


def test_report_leaves_foreign_database_untouched(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "sweep").mkdir()
    path = tmp_path / "sweep" / "store.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE other (x INTEGER)")
    before = path.read_bytes()
    result = _invoke("report", str(tmp_path / "sweep"))
    assert result.exit_code == 2
    assert "not a stabiliscope run store" in result.stderr
    assert path.read_bytes() == before
