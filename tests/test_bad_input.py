"""Bad input across CLI options, data files, stores and probe files.

Every case must end with exit status 2 and exactly one `Error: ...` line on
stderr that names the bad value and what is accepted, with no traceback. It
must also leave the files of an earlier sweep, and every other file in the
workspace, byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stabiliscope import cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY = [
    "--norms",
    "pre",
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
]

VALID_PROBE = """
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
id = "ratio"
statement = "A max/min ratio is at least one."
metric = "grad/mlp.out"
reduce = "max_over_min"
strategy = "pre"
expect = [1.0, 1e30]
"""

BAD_PROBES = {
    "missing_key.toml": VALID_PROBE.replace("lr = 1e-3\n", ""),
    "wrong_type.toml": VALID_PROBE.replace("width = 16", 'width = "16"'),
    "unknown_reducer.toml": VALID_PROBE.replace('reduce = "max_over_min"', 'reduce = "median"'),
    "bad_syntax.toml": VALID_PROBE.replace("width = 16", "width = = 16"),
    "reversed.toml": VALID_PROBE.replace("expect = [1.0, 1e30]", "expect = [2.0, 1.0]"),
    "unknown_strategy.toml": VALID_PROBE.replace('strategies = ["pre"]', 'strategies = ["prenorm"]'),
    "zero_heads.toml": VALID_PROBE.replace("heads = 2", "heads = 0"),
    "odd_width.toml": VALID_PROBE.replace("width = 16", "width = 18").replace("heads = 2", "heads = 4"),
}


@dataclass(frozen=True)
class BadInput:
    """One bad invocation: arguments with `{root}` for the workspace, and two expected substrings."""

    name: str
    arguments: tuple[str, ...]
    value: str
    accepted: str


def _sweep(*arguments: str) -> tuple[str, ...]:
    # The prior sweep's folder is the target, so an accepted bad value would change it.
    return ("sweep", *TINY, "--out", "{root}/prior", *arguments)


CASES = [
    # Sizes and numbers
    BadInput("depths zero", _sweep("--depths", "0"), "'0'", "positive integer (expected a comma list such as 2,4,8)"),
    BadInput("depths negative", _sweep("--depths", "2,-4"), "'-4'", "positive integer"),
    BadInput("depths empty item", _sweep("--depths", "2,,4"), "''", "expected a comma list such as 2,4,8"),
    BadInput("depths not a number", _sweep("--depths", "a"), "'a'", "positive integer"),
    BadInput("depths repeated", _sweep("--depths", "4,4"), "'4' is listed more than once", "2,4,8"),
    BadInput("width zero", _sweep("--width", "0"), "0", "x>=1"),
    BadInput("heads negative", _sweep("--heads", "-1"), "-1", "x>=1"),
    BadInput("steps zero", _sweep("--steps", "0"), "'--steps': 0", "x>=1"),
    BadInput("batch size zero", _sweep("--batch-size", "0"), "'--batch-size': 0", "x>=1"),
    BadInput("sequence length negative", _sweep("--seq-len", "-5"), "-5", "x>=1"),
    BadInput("learning rate zero", _sweep("--lr", "0"), "'--lr': 0", "x>0"),
    BadInput("learning rate negative", _sweep("--lr", "-0.1"), "-0.1", "x>0"),
    BadInput("learning rate nan", _sweep("--lr", "nan"), "nan", "positive finite number"),
    BadInput("warmup negative", _sweep("--warmup", "-1"), "-1", "x>=0"),
    BadInput("seeds negative", _sweep("--seeds", "0,-1"), "'-1'", "non-negative integer"),
    BadInput("grad clip negative", _sweep("--grad-clip", "-1"), "-1", "x>=0"),
    BadInput("width not divisible by heads", _sweep("--width", "30", "--heads", "4"), "width 30", "multiple of the number of heads"),
    # Names and choices
    BadInput("unknown strategy", _sweep("--norms", "pre,prenorm"), "'prenorm'", "known: post, pre, pre_qk"),
    BadInput("unknown init", _sweep("--init", "orthogonal"), "'orthogonal'", "'megatron'"),
    BadInput("unknown norm type", _sweep("--norm-type", "batch"), "'batch'", "'rms'"),
    BadInput("unknown ffn", _sweep("--ffn", "moe"), "'moe'", "'swiglu'"),
    BadInput("unknown device", _sweep("--device", "tpu"), "'tpu'", "cpu, cuda or cuda:N"),
    # Workers and shards
    BadInput("workers zero", _sweep("--workers", "0"), "0", "x>=1"),
    BadInput("workers negative", _sweep("--workers", "-1"), "-1", "x>=1"),
    BadInput("workers not a number", _sweep("--workers", "many"), "'many'", "integer"),
    BadInput("threads per worker zero", _sweep("--threads-per-worker", "0"), "0", "x>=1"),
    BadInput("shard index zero", _sweep("--shard", "0/2"), "'0/2'", "1 <= K <= N"),
    BadInput("shard index above count", _sweep("--shard", "3/2"), "'3/2'", "1 <= K <= N"),
    BadInput("shard count zero", _sweep("--shard", "1/0"), "'1/0'", "1 <= K <= N"),
    BadInput("shard not K/N", _sweep("--shard", "x"), "'x'", "expected K/N"),
    # Paths and names
    BadInput("sweep name with slash", _sweep("--name", "a/b"), "'a/b'", "plain name"),
    BadInput("sweep name dot dot", _sweep("--name", ".."), "'..'", "plain name"),
    BadInput("sweep name escapes", _sweep("--name", "../escape"), "'../escape'", "cannot point outside"),
    BadInput("output is a file", _sweep("--out", "{root}/a_file"), "a_file", "is a file"),
    BadInput("output below a file", _sweep("--out", "{root}/a_file/sweep"), "a_file/sweep", "a folder you can write to"),
    BadInput("output not writable", _sweep("--out", "{unwritable}/sweep"), "{unwritable}/sweep", "a folder you can write to"),
    # Data files
    BadInput("data missing", _sweep("--data", "{root}/absent.txt"), "absent.txt", "does not exist"),
    BadInput("data empty file", _sweep("--data", "{root}/empty.txt"), "empty.txt", "non-empty file or folder"),
    BadInput("data empty folder", _sweep("--data", "{root}/empty_folder"), "empty_folder", "a text file, a folder of text files or a .bin file"),
    BadInput("data binary", _sweep("--data", "{root}/checkpoint.pt"), "checkpoint.pt", "text without NUL bytes"),
    BadInput("data bin of odd length", _sweep("--data", "{root}/odd.bin"), "3 bytes", "even byte count"),
    BadInput("data bin too short", _sweep("--data", "{root}/short.bin"), "short.bin", "needs at least 17"),
    BadInput("data text too short", _sweep("--data", "{root}/short.txt"), "short.txt", "smaller --seq-len"),
    # Stores
    BadInput("rerun with other lr", _sweep("--lr", "0.01"), "lr 0.003 vs 0.01", "use another --out"),
    BadInput("sweep into corrupt store", ("sweep", *TINY, "--out", "{root}/corrupt"), "store.sqlite", "move it away"),
    BadInput("sweep into unrelated sqlite", ("sweep", *TINY, "--out", "{root}/foreign"), "store.sqlite", "not a stabiliscope run store"),
    BadInput("report missing folder", ("report", "{root}/absent"), "absent", "does not exist"),
    BadInput("report folder without store", ("report", "{root}/empty_folder"), "empty_folder", "a folder written by 'stabiliscope sweep'"),
    BadInput("report corrupt store", ("report", "{root}/corrupt"), "store.sqlite", "not a readable SQLite database"),
    BadInput("report unrelated sqlite", ("report", "{root}/foreign"), "store.sqlite", "not a stabiliscope run store"),
    BadInput("report unknown format", ("report", "{root}/prior", "--format", "xml"), "'xml'", "'table'"),
    BadInput("report on a file", ("report", "{root}/a_file"), "a_file", "is a file"),
    # Dashboard
    BadInput("dashboard without runs", ("dashboard", "{root}/empty_folder"), "empty_folder", "a folder written by 'stabiliscope sweep'"),
    BadInput("dashboard port too high", ("dashboard", "{root}/prior", "--port", "70000"), "70000", "1<=x<=65535"),
    BadInput("dashboard port zero", ("dashboard", "{root}/prior", "--port", "0"), "0", "1<=x<=65535"),
    # Probe files
    BadInput("probe missing key", ("probe", "{root}/probes/missing_key.toml"), "missing key 'lr'", "required keys: strategies"),
    BadInput("probe wrong type", ("probe", "{root}/probes/wrong_type.toml"), "'16'", "integer >= 1"),
    BadInput("probe unknown reducer", ("probe", "{root}/probes/unknown_reducer.toml"), "'median'", "expected one of: loglog_slope_vs_depth"),
    BadInput("probe bad syntax", ("probe", "{root}/probes/bad_syntax.toml"), "invalid TOML", "at line 11, column 9"),
    BadInput("probe expect reversed", ("probe", "{root}/probes/reversed.toml"), "[2.0, 1.0]", "low <= high"),
    BadInput("probe unknown strategy", ("probe", "{root}/probes/unknown_strategy.toml"), "'prenorm'", "expected one of: post"),
    BadInput("probe zero heads", ("probe", "{root}/probes/zero_heads.toml"), "heads must be an integer >= 1", "got 0"),
    BadInput("probe width not divisible", ("probe", "{root}/probes/odd_width.toml"), "width 18", "heads 4"),
    BadInput("probe file missing", ("probe", "{root}/probes/absent.toml"), "absent.toml", "probe file not found"),
    BadInput("probe folder without files", ("probe", "{root}/empty_folder"), "empty_folder", "*.toml"),
    BadInput("probe file not text", ("probe", "{root}/probes/binary.toml"), "binary.toml", "not UTF-8 text"),
    BadInput("probe file stem dot dot", ("probe", "{root}/dotted/...toml"), "'..'", "plain name"),
    BadInput("probe workers zero", ("probe", "{root}/probes/valid.toml", "--workers", "0"), "0", "x>=1"),
    BadInput("probe bad shard", ("probe", "{root}/probes/valid.toml", "--shard", "2/1"), "'2/1'", "1 <= K <= N"),
]


def _unwritable_folder(root: Path) -> Path:
    """Return a folder this process cannot create entries in."""
    folder = root / "read_only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.mkdir()
    except OSError:
        return folder
    probe.rmdir()
    folder.chmod(0o755)
    # Root ignores file modes; sysfs rejects new entries even from root.
    candidate = Path("/sys/stabiliscope-unwritable")
    try:
        candidate.mkdir()
    except OSError:
        return candidate
    candidate.rmdir()
    pytest.skip("no folder here rejects writes from this user")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")

    prior = CliRunner().invoke(cli.main, ["sweep", *TINY, "--out", str(root / "prior")])
    assert prior.exit_code == 0, prior.output

    (root / "a_file").write_text("not a folder\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "empty_folder").mkdir()
    (root / "checkpoint.pt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00" + bytes(range(256)) * 4)
    (root / "odd.bin").write_bytes(b"\x01\x00\x02")
    (root / "short.bin").write_bytes(np.arange(12, dtype="<u2").tobytes())
    (root / "short.txt").write_text("too short")

    (root / "corrupt").mkdir()
    (root / "corrupt" / "store.sqlite").write_bytes(b"this is not a database\n" * 300)
    (root / "foreign").mkdir()
    with sqlite3.connect(root / "foreign" / "store.sqlite") as connection:
        connection.execute("CREATE TABLE measurements (x REAL)")
        connection.execute("INSERT INTO measurements VALUES (1.5)")

    probes = root / "probes"
    probes.mkdir()
    (probes / "valid.toml").write_text(VALID_PROBE)
    for name, text in BAD_PROBES.items():
        (probes / name).write_text(text)
    (probes / "binary.toml").write_bytes(b"\xff\xfe\x00w\x00i\x00d\x00t\x00h")
    (root / "dotted").mkdir()
    (root / "dotted" / "...toml").write_text(VALID_PROBE)

    return {"root": root, "unwritable": _unwritable_folder(root)}


def _snapshot(root: Path) -> dict[str, str]:
    """Return {relative path: sha256} of every file under `root`.

    SQLite's shared-memory index (`-shm`) and an empty write-ahead log are
    transient files that a read-only connection may leave or a writer may
    remove, so they are left out. A non-empty `-wal` would hold changes and
    is kept.
    """
    files = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith("-shm"):
            continue
        if path.name.endswith("-wal") and path.stat().st_size == 0:
            continue
        files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _invoke(case: BadInput, workspace: dict[str, Path]):
    values = {"root": str(workspace["root"]), "unwritable": str(workspace["unwritable"])}
    arguments = [argument.format(**values) for argument in case.arguments]
    return CliRunner().invoke(cli.main, arguments)


def test_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_rejected(case: BadInput, workspace: dict[str, Path]) -> None:
    before = _snapshot(workspace["root"])

    result = _invoke(case, workspace)

    values = {"root": str(workspace["root"]), "unwritable": str(workspace["unwritable"])}
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert case.value.format(**values) in lines[0]
    assert case.accepted in lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert _snapshot(workspace["root"]) == before


def test_prior_sweep_still_reports(workspace: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli.main, ["report", str(workspace["root"] / "prior"), "--format", "csv"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].startswith("pre,2,0,")


def test_binary_free_text_in_any_encoding_accepted(tmp_path: Path) -> None:
    data = tmp_path / "latin1.txt"
    data.write_bytes("Größe, naïve café. ".encode("latin-1") * 40)
    result = CliRunner().invoke(cli.main, ["sweep", *TINY, "--data", str(data), "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_unwritable_case_leaves_no_folder(workspace: dict[str, Path]) -> None:
    assert not (workspace["unwritable"] / "sweep").exists()
