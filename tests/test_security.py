"""Security: loopback-only dashboard by default, no pickle loading, names that stay inside folders."""

from __future__ import annotations

import ast
import json
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from stabiliscope import cli
from stabiliscope.experiments.sweep import make_run_id
from stabiliscope.models import STRATEGIES
from sweep_processes import SOURCE_ROOT, read_log, start_cli, stop_dashboard, wait_until

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SCANNED_FOLDERS = ("stabiliscope", "examples", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _listening_addresses(port: int) -> set[str]:
    """Return the IPv4 and IPv6 addresses with a listening TCP socket on `port`, from /proc/net."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                addresses.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                # /proc lists IPv6 addresses as four little-endian 32-bit words.
                words = b"".join(raw[index : index + 4][::-1] for index in range(0, 16, 4))
                addresses.add(socket.inet_ntop(socket.AF_INET6, words))
    return addresses


def _serve_dashboard(sweep: Path, tmp_path: Path, port: int, *options: str):
    """Start `stabiliscope dashboard` and wait until its data API responds on `host`."""
    host = options[options.index("--host") + 1] if "--host" in options else "127.0.0.1"
    process = start_cli(["dashboard", str(sweep), "--port", str(port), *options], tmp_path, "dashboard")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def responds() -> bool:
        try:
            with opener.open(f"http://{host}:{port}/data/runs", timeout=5) as response:
                return isinstance(json.loads(response.read()), list)
        except OSError:
            return False

    try:
        wait_until(responds, process)
    except BaseException:
        stop_dashboard(process, tmp_path, "dashboard")
        raise
    return process


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("security") / "sweep"
    arguments = ["sweep", "--norms", "pre", "--depths", "2", "--width", "16", "--heads", "2", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--out", str(out)]
    result = CliRunner().invoke(cli.main, arguments)
    assert result.exit_code == 0, result.output
    return out


# Dashboard binding


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net")
def test_dashboard_listens_on_loopback_only(tiny_sweep: Path, tmp_path: Path, free_port: int) -> None:
    process = _serve_dashboard(tiny_sweep, tmp_path, free_port)
    try:
        assert _listening_addresses(free_port) == {"127.0.0.1"}
    finally:
        stop_dashboard(process, tmp_path, "dashboard")
    assert "Warning" not in read_log(tmp_path, "dashboard", "err")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net")
def test_dashboard_other_host_warns(tiny_sweep: Path, tmp_path: Path, free_port: int) -> None:
    # 127.0.0.2 is another loopback address, so the test server stays unreachable from outside.
    process = _serve_dashboard(tiny_sweep, tmp_path, free_port, "--host", "127.0.0.2")
    try:
        assert _listening_addresses(free_port) == {"127.0.0.2"}
    finally:
        stop_dashboard(process, tmp_path, "dashboard")
    stderr = read_log(tmp_path, "dashboard", "err")
    assert "Warning: TensorBoard listens on 127.0.0.2, not 127.0.0.1" in stderr
    assert "reachable from other machines" in stderr


def test_dashboard_default_host_is_loopback() -> None:
    host = next(param for param in cli.dashboard.params if param.name == "host")
    assert host.default == "127.0.0.1"


# Deserialization


def _python_files() -> list[Path]:
    files = []
    for folder in SCANNED_FOLDERS:
        files.extend(sorted((SOURCE_ROOT / folder).rglob("*.py")))
    return files


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Return a description of each pickle import or pickle-capable load call in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names if alias.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            name = ast.unparse(node.func)
            if name == "torch.load":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                allow = keywords.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"line {node.lineno}: {name} with allow_pickle")
            elif name in ("pd.read_pickle", "pandas.read_pickle", "yaml.load", "yaml.unsafe_load"):
                found.append(f"line {node.lineno}: {name}")
    return found


def test_scan_covers_package() -> None:
    names = {path.name for path in _python_files()}
    assert {"store.py", "sweep.py", "workers.py", "cli.py"} <= names


def test_scanner_flags_torch_load_without_weights_only() -> None:
    tree = ast.parse("import torch\nstate = torch.load('model.pt')\nimport pickle\n")
    assert sorted(_unsafe_loads(tree)) == ["import pickle", "line 2: torch.load without weights_only=True"]


def test_no_pickle_loading_in_sources() -> None:
    problems = {
        str(path.relative_to(SOURCE_ROOT)): found
        for path in _python_files()
        if (found := _unsafe_loads(ast.parse(path.read_text(), filename=str(path))))
    }
    assert problems == {}


# Names that become paths


def test_sweep_name_is_folder_inside_out(tmp_path: Path) -> None:
    arguments = ["sweep", "--norms", "pre", "--depths", "2", "--width", "16", "--heads", "2", "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--out", str(tmp_path / "runs"),
                 "--name", "depth-sweep"]
    result = CliRunner().invoke(cli.main, arguments)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "depth-sweep" / "store.sqlite").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]


@pytest.mark.parametrize("name", ["../escape", "/tmp/absolute", "a/b", "..", "a\\b"])
def test_sweep_name_escaping_out_rejected(tmp_path: Path, name: str) -> None:
    out = tmp_path / "runs" / "inner"
    result = CliRunner().invoke(cli.main, ["sweep", "--out", str(out), "--name", name])
    assert result.exit_code == 2
    assert repr(name) in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize("strategy", [*STRATEGIES, "../../etc", "a/b", "..", "x\\y"])
def test_run_ids_are_plain_file_names(strategy: str) -> None:
    run_id = make_run_id(strategy, 4, 0)
    assert "/" not in run_id
    assert "\\" not in run_id
    assert run_id not in (".", "..")
    assert Path(run_id).name == run_id
