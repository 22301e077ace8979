"""The results page matches the probe run behind it and the probe files as they are now."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from stabiliscope.experiments.probes import load_probe

REPOSITORY = Path(__file__).resolve().parent.parent
DOCS = REPOSITORY / "docs"


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return json.loads((DOCS / "reproductions.json").read_text())


def _page_module():
    spec = importlib.util.spec_from_file_location("make_reproductions", DOCS / "make_reproductions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_renders_from_run(results) -> None:
    page = _page_module().render_page(results)
    assert page == (DOCS / "reproductions.md").read_text()


def test_run_used_full_grid(results) -> None:
    assert [item["probe"] for item in results if item["reduced"]] == []


def test_run_covers_every_probe_file(results) -> None:
    run_files = sorted(Path(item["probe"]).name for item in results)
    assert run_files == sorted(path.name for path in (REPOSITORY / "probes").glob("*.toml"))


def test_run_matches_current_claims(results) -> None:
    """A probe file edited after the run (a claim added, removed or its interval moved) fails here."""
    for item in results:
        probe = load_probe(REPOSITORY / "probes" / Path(item["probe"]).name)
        expected = {claim.id: [_plain(bound) for bound in claim.expect] for claim in probe.claims}
        measured = {claim["id"]: [_plain(bound) for bound in claim["expect"]] for claim in item["claims"]}
        assert measured == expected, Path(item["probe"]).name


def test_run_within_budget(results) -> None:
    total = sum(item["wall_time_s"] for item in results)
    assert total < 15 * 60
    assert max(item["wall_time_s"] for item in results) < 5 * 60


def _plain(bound: float) -> float | str:
    return "inf" if math.isinf(bound) else float(bound)
