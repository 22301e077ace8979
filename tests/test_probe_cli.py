"""`stabiliscope probe`: tiny probe files trained at initialization, verdicts and exit statuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from stabiliscope import cli

# Two runs per seed (depths 2 and 3) of a width-32 Pre-Norm model, trained for
# one step because steps = 0 requests the gradients at initialization.
TINY_PROBE = """
[source]
authors = "Doe et al."
year = 2020
title = "A Paper"
where = "Figure 1"

[experiment]
strategies = ["pre"]
depths = [2, 3]
width = 32
heads = 2
steps = 0
lr = 1e-3
batch_size = 2
seq_len = 16
seeds = [0, 1]

[reduced]
seeds = [0]

[[claim]]
id = "ratio-at-least-one"
statement = "A max/min ratio is at least one."
metric = "grad/mlp.out"
reduce = "max_over_min"
strategy = "pre"
expect = [{low}, {high}]
"""

PASSING = {"low": 1.0, "high": 1e30}
IMPOSSIBLE = {"low": 0.0, "high": 0.5}


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sweep parent folder shared by the tests, so each grid trains once."""
    return tmp_path_factory.mktemp("probe-runs")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The tiny models gain nothing from more threads on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_tiny_probe(folder: Path, bounds: dict[str, float]) -> Path:
    # Every variant has the same file name, so all use the sweep folder `tiny`.
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(TINY_PROBE.format(**bounds))
    return path


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli.main, [str(arg) for arg in args])


def test_passing_claim_exits_zero(tmp_path: Path, shared_out: Path) -> None:
    path = write_tiny_probe(tmp_path / "pass", PASSING)

    result = invoke("probe", path, "--out", shared_out)

    assert result.exit_code == 0, result.output
    assert "ratio-at-least-one" in result.stdout
    assert "PASS" in result.stdout
    assert "(n=2)" in result.stdout
    assert "1 of 1 claims passed." in result.stdout
    assert (shared_out / "tiny" / "store.sqlite").is_file()


def test_impossible_interval_exits_one(tmp_path: Path, shared_out: Path) -> None:
    path = write_tiny_probe(tmp_path / "fail", IMPOSSIBLE)

    result = invoke("probe", path, "--out", shared_out)

    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout
    assert "[0, 0.5]" in result.stdout
    assert "0 of 1 claims passed." in result.stdout


def test_json_output(tmp_path: Path, shared_out: Path) -> None:
    path = write_tiny_probe(tmp_path / "json", PASSING)

    result = invoke("probe", path, "--json", "--out", shared_out)

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert len(document) == 1
    probe = document[0]
    assert probe["probe"] == str(path)
    assert probe["passed"] is True
    assert probe["runs"] == 4
    claim = probe["claims"][0]
    assert claim["id"] == "ratio-at-least-one"
    assert claim["verdict"] == "PASS"
    assert claim["n"] == 2
    assert set(claim["values"]) == {"0", "1"}
    assert claim["ci"][0] <= claim["mean"] <= claim["ci"][1]
    assert claim["expect"] == [1.0, 1e30]


def test_table_names_quantity_and_rule(tmp_path: Path, shared_out: Path) -> None:
    path = write_tiny_probe(tmp_path / "rule", PASSING)

    result = invoke("probe", path, "--out", shared_out)

    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "max_over_min of grad/mlp.out at init" in text
    assert "A claim passes when the mean lies in the expected interval." in text


def test_reduced_without_table_says_full(tmp_path: Path, shared_out: Path) -> None:
    folder = tmp_path / "noreduced"
    folder.mkdir()
    path = folder / "tiny.toml"
    path.write_text(TINY_PROBE.format(**PASSING).replace("[reduced]\nseeds = [0]\n", ""))

    result = invoke("probe", path, "--reduced", "--out", shared_out)

    assert result.exit_code == 0, result.output
    assert "full grid: the file has no [reduced] table" in " ".join(result.stdout.split())


def test_reduced_grid_single_seed(tmp_path: Path, shared_out: Path) -> None:
    path = write_tiny_probe(tmp_path / "reduced", PASSING)

    result = invoke("probe", path, "--reduced", "--json", "--out", shared_out)

    assert result.exit_code == 0, result.output
    probe = json.loads(result.stdout)[0]
    assert probe["reduced"] is True
    assert probe["out"] == str(shared_out / "tiny-reduced")
    assert probe["claims"][0]["n"] == 1
    assert probe["claims"][0]["ci"] is None


def test_missing_file_exits_two(tmp_path: Path) -> None:
    result = invoke("probe", tmp_path / "absent.toml", "--out", tmp_path / "out")

    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {tmp_path / 'absent.toml'}: probe file not found"


def test_malformed_toml_exits_two(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[source\nauthors = 1\n")

    result = invoke("probe", path, "--out", tmp_path / "out")

    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert f"{path}: invalid TOML:" in result.output
    assert "line 1" in result.output
    assert not (tmp_path / "out").exists()


def test_invalid_claim_exits_two(tmp_path: Path) -> None:
    path = write_tiny_probe(tmp_path, PASSING)
    path.write_text(path.read_text().replace('reduce = "max_over_min"', 'reduce = "slope"'))

    result = invoke("probe", path, "--out", tmp_path / "out")

    assert result.exit_code == 2
    assert "claim 'ratio-at-least-one': unknown reduce 'slope'" in result.output


@pytest.mark.slow
def test_shipped_probes_reduced(tmp_path: Path) -> None:
    folder = Path(__file__).resolve().parent.parent / "probes"

    result = invoke("probe", folder, "--reduced", "--out", tmp_path / "runs")

    # Some shipped claims may not reproduce at this scale, which is exit status 1.
    assert result.exit_code in (0, 1), result.output
    for path in sorted(folder.glob("*.toml")):
        assert path.name in result.stdout.replace("\n", "")


VARIANT_PROBE = """
[source]
authors = "Doe et al."
year = 2020
title = "A Paper"
where = "Figure 2"

[experiment]
strategies = ["pre"]
depths = [2]
width = 32
heads = 2
steps = 2
lr = 1e-3
batch_size = 2
seq_len = 16
seeds = [0]

[[variant]]
name = "warm"
warmup = 2

[[variant]]
name = "cold"
warmup = 0

[[claim]]
id = "loss-ratio"
statement = "A ratio of two losses is positive."
reduce = "final_loss"
strategy = "pre"
variant = "cold"
baseline_variant = "warm"
expect = [0.0, 1e30]
"""

INVARIANCE_PROBE = """
[source]
authors = "Doe et al."
year = 2025
title = "A Paper"
where = "Section 3"

[experiment]
kind = "invariance"
strategies = ["hybrid", "pre"]
depths = [1]
width = 16
heads = 2
batch_size = 2
seq_len = 8
seeds = [0, 1]

[[claim]]
id = "exponent"
statement = "QKV-Norm makes the W_Q gradient scale like 1/c."
metric = "invariance/grad_exponent.q"
reduce = "value"
strategy = "hybrid"
expect = [-1.01, -0.99]

[[claim]]
id = "pre-cosine"
statement = "Pre-Norm's W_Q gradient is not orthogonal to W_Q."
metric = "invariance/cosine.q"
reduce = "value"
strategy = "pre"
expect = [1e-3, 1.0]
"""


def test_variants_run_into_own_folders(tmp_path: Path) -> None:
    path = tmp_path / "files" / "variants.toml"
    path.parent.mkdir()
    path.write_text(VARIANT_PROBE)

    result = invoke("probe", path, "--json", "--out", tmp_path / "runs")

    assert result.exit_code == 0, result.output
    probe = json.loads(result.stdout)[0]
    assert probe["variants"] == ["warm", "cold"]
    assert probe["runs"] == 2
    assert probe["cpu_time_s"] > 0
    claim = probe["claims"][0]
    assert claim["variant"] == "cold"
    assert claim["baseline_variant"] == "warm"
    assert claim["verdict"] == "PASS"
    assert (tmp_path / "runs" / "variants" / "warm" / "store.sqlite").is_file()
    assert (tmp_path / "runs" / "variants" / "cold" / "store.sqlite").is_file()


def test_variant_table_names_variants(tmp_path: Path) -> None:
    path = tmp_path / "variants.toml"
    path.write_text(VARIANT_PROBE)

    result = invoke("probe", path, "--out", tmp_path / "runs")

    assert result.exit_code == 0, result.output
    assert "pre [cold] / pre [warm]" in result.stdout


def test_invariance_kind_through_cli(tmp_path: Path) -> None:
    path = tmp_path / "invariance.toml"
    path.write_text(INVARIANCE_PROBE)

    result = invoke("probe", path, "--json", "--out", tmp_path / "runs")

    assert result.exit_code == 0, result.output
    probe = json.loads(result.stdout)[0]
    assert probe["kind"] == "invariance"
    assert probe["runs"] == 4
    assert [claim["verdict"] for claim in probe["claims"]] == ["PASS", "PASS"]
    assert probe["claims"][0]["n"] == 2
    assert (tmp_path / "runs" / "invariance" / "measurements.json").is_file()


def test_shard_trains_each_variant(tmp_path: Path) -> None:
    path = tmp_path / "variants.toml"
    path.write_text(VARIANT_PROBE)

    result = invoke("probe", path, "--shard", "1/1", "--out", tmp_path / "runs")

    assert result.exit_code == 0, result.output
    for variant in ("warm", "cold"):
        assert list((tmp_path / "runs" / "variants" / variant).glob("store*.sqlite")), variant
