"""Probe files: schema validation, claim reducers on a hand-built store, confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from stabiliscope.errors import ConfigError
from stabiliscope.experiments.claims import (
    evaluate_claim,
    mean_confidence_interval,
    reduce_for_seed,
)
from stabiliscope.experiments.probes import (
    Claim,
    Experiment,
    find_probe_files,
    load_probe,
    sweep_config,
    train_steps,
)
from stabiliscope.experiments.sweep import make_run_id
from stabiliscope.sinks.store import RunStore
from stabiliscope.watch.records import StepRecord

VALID_PROBE = """
[source]
authors = "Doe et al."
year = 2020
title = "A Paper"
where = "Figure 1"

[experiment]
strategies = ["pre", "post"]
depths = [2, 4]
width = 32
heads = 2
steps = 0
lr = 1e-3
batch_size = 2
seq_len = 16
seeds = [0, 1]

[reduced]
depths = [2, 3]
seeds = [0]

[[claim]]
id = "pre-slope"
statement = "The gradient shrinks with depth."
metric = "grad/mlp.out"
reduce = "loglog_slope_vs_depth"
strategy = "pre"
expect = [-1.0, 0.0]
"""


def write_probe(tmp_path: Path, text: str, name: str = "probe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def replace_line(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in the probe text"
    return text.replace(old, new, 1)


# Schema


def test_valid_probe_loads(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, VALID_PROBE))

    assert probe.name == "probe"
    assert probe.source.year == 2020
    assert probe.experiment.strategies == ["pre", "post"]
    assert probe.experiment.steps == 0
    assert probe.reduced == {"depths": [2, 3], "seeds": [0]}
    claim = probe.claims[0]
    assert claim.at == "init"
    assert claim.layer == -1
    assert claim.expect == (-1.0, 0.0)


def test_reduced_grid_replaces_values(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, VALID_PROBE))

    reduced = probe.grid(reduced=True)

    assert reduced.depths == [2, 3]
    assert reduced.seeds == [0]
    assert reduced.width == 32
    assert probe.grid().depths == [2, 4]
    assert probe.default_out(reduced=True, root=Path("r")) == Path("r/probe-reduced")


def test_zero_steps_trains_one_step(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, VALID_PROBE))

    config = sweep_config(probe.experiment, tmp_path / "out")

    assert train_steps(probe.experiment) == 1
    assert config.steps == 1
    assert config.norms == ["pre", "post"]
    config.validate()


BAD_CASES = [
    # (old text, new text, expected words in the message)
    ('reduce = "loglog_slope_vs_depth"', 'reduce = "slope"', "claim 'pre-slope': unknown reduce 'slope' (expected one of: loglog_slope_vs_depth"),
    ('strategy = "pre"\nexpect', 'strategy = "mix"\nexpect', "claim 'pre-slope': strategy 'mix' is not in [experiment] strategies"),
    ("expect = [-1.0, 0.0]", "expect = [0.0, -1.0]", "claim 'pre-slope': expect must be [low, high]"),
    ("expect = [-1.0, 0.0]", "expect = [1.0]", "claim 'pre-slope': expect must be [low, high]"),
    ('metric = "grad/mlp.out"\n', "", "claim 'pre-slope': missing key 'metric'"),
    ('metric = "grad/mlp.out"', 'metric = "loss"', "claim 'pre-slope': reduce 'loglog_slope_vs_depth' needs a per-layer metric"),
    ('id = "pre-slope"\n', 'id = "pre-slope"\nat = "middle"\n', "claim 'pre-slope': unknown at 'middle'"),
    ('id = "pre-slope"\n', 'id = "pre-slope"\nat = 3\n', "claim 'pre-slope': at step 3 is after the last trained step 0"),
    ('id = "pre-slope"\n', 'id = "pre-slope"\ncolour = 1\n', "claim 'pre-slope': unknown key 'colour'"),
    ('id = "pre-slope"\n', 'id = "pre-slope"\ndepth = 2\n', "claim 'pre-slope': depth does not apply"),
    ('id = "pre-slope"\n', 'id = "pre-slope"\nlayer = 5\n', "claim 'pre-slope': layer 5 does not exist at depth 2"),
    ('strategies = ["pre", "post"]', 'strategies = ["pre", "nope"]', "[experiment]: unknown strategies entry 'nope'"),
    ("depths = [2, 4]", "depths = [2, 0]", "[experiment]: each of depths must be an integer >= 1, got 0"),
    ("depths = [2, 4]", "depths = [2, 2]", "[experiment]: depths lists a value more than once"),
    ("width = 32", "width = 33", "[experiment]: width 33 is not divisible by heads 2"),
    ("heads = 2", "heads = 32", "[experiment]: width / heads = 1 is odd"),
    ("steps = 0", "steps = -1", "[experiment]: steps must be an integer >= 0, got -1"),
    ("lr = 1e-3", "lr = 0.0", "[experiment]: lr must be a positive number"),
    ("lr = 1e-3", 'lr = "fast"', "[experiment]: lr must be a finite number, got 'fast'"),
    ("seq_len = 16", "seq_len = 16\ninit = \"glorot\"", "[experiment]: unknown init 'glorot'"),
    ("seq_len = 16", "seq_len = 16\nembed_scale = \"huge\"", "[experiment]: unknown embed_scale 'huge'"),
    ("seq_len = 16", "seq_len = 16\ndata = \"missing.txt\"", "[experiment]: data path"),
    ("seeds = [0, 1]\n", "", "[experiment]: missing key 'seeds'"),
    ("year = 2020", "year = \"2020\"", "[source]: year must be a four-digit integer"),
    ('title = "A Paper"\n', "", "[source]: missing key 'title'"),
    ("[reduced]\ndepths = [2, 3]", "[reduced]\ndepths = [2, 3]\nsteps = 5", "[reduced]: steps 5 and [experiment] steps 0 must both be 0"),
    ("[reduced]\ndepths = [2, 3]", "[reduced]\nwidths = [2, 3]", "[reduced]: unknown key 'widths'"),
]


@pytest.mark.parametrize(("old", "new", "expected"), BAD_CASES)
def test_invalid_value_names_file_and_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write_probe(tmp_path, replace_line(VALID_PROBE, old, new))

    with pytest.raises(ConfigError) as raised:
        load_probe(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_duplicate_claim_id_rejected(tmp_path: Path) -> None:
    claim = VALID_PROBE[VALID_PROBE.index("[[claim]]") :]
    path = write_probe(tmp_path, VALID_PROBE + "\n" + claim)

    with pytest.raises(ConfigError, match="claim 'pre-slope': id is used by an earlier claim"):
        load_probe(path)


def test_missing_claims_rejected(tmp_path: Path) -> None:
    path = write_probe(tmp_path, VALID_PROBE[: VALID_PROBE.index("[[claim]]")])

    with pytest.raises(ConfigError, match="the top level: missing key 'claim'"):
        load_probe(path)


def test_baseline_must_be_another_strategy(tmp_path: Path) -> None:
    text = replace_line(VALID_PROBE, 'strategy = "pre"\n', 'strategy = "pre"\nbaseline = "pre"\n')

    with pytest.raises(ConfigError, match="claim 'pre-slope': baseline 'pre' must be another strategy"):
        load_probe(write_probe(tmp_path, text))


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_probe(tmp_path, VALID_PROBE.replace("width = 32", "width = = 32"))

    with pytest.raises(ConfigError) as raised:
        load_probe(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 11" in message


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="probe file not found"):
        load_probe(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="probe file not found"):
        find_probe_files([tmp_path / "absent.toml"])


def test_folder_lists_toml_files(tmp_path: Path) -> None:
    write_probe(tmp_path, VALID_PROBE, "b.toml")
    write_probe(tmp_path, VALID_PROBE, "a.toml")
    (tmp_path / "notes.txt").write_text("not a probe")

    assert find_probe_files([tmp_path]) == [tmp_path / "a.toml", tmp_path / "b.toml"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="folder contains no"):
        find_probe_files([empty])


def test_shipped_probes_are_valid() -> None:
    folder = Path(__file__).resolve().parent.parent / "probes"
    files = find_probe_files([folder])

    assert len(files) >= 4
    for path in files:
        probe = load_probe(path)
        assert probe.claims
        assert probe.reduced


# Reducers on a hand-built store

# Per-layer profiles written to the synthetic store: PROFILES[(strategy, depth, seed)].
PROFILES = {
    ("pre", 2, 0): [4.0, 2.0],
    ("pre", 4, 0): [8.0, 4.0, 2.0, 1.0],
    ("pre", 2, 1): [3.0, 6.0],
    ("pre", 4, 1): [1.0, 3.0, 2.0, 4.0],
    ("post", 2, 0): [1.0, 1.0],
    ("post", 4, 0): [2.0, 1.0, 4.0, 3.0],
    ("post", 2, 1): [1.0, 2.0],
    ("post", 4, 1): [1.0, 2.0, 2.0, 8.0],
}
FINAL_LOSS = {0: 3.0, 1: 4.0}
METRIC = "grad/mlp.out"


@pytest.fixture
def synthetic_store(tmp_path: Path) -> Iterator[RunStore]:
    """A store with the PROFILES at step 0, twice PROFILES at step 1, and pre-L04-s1 diverged at step 1."""
    store = RunStore.open(tmp_path / "sweep")
    for (strategy, depth, seed), profile in PROFILES.items():
        run_id = make_run_id(strategy, depth, seed)
        store.begin_run(run_id, {}, strategy=strategy, depth=depth, width=8, seed=seed)
        records = [
            StepRecord(step=0, scalars={"loss": 5.0}, blocks={METRIC: profile}),
            StepRecord(step=1, scalars={"loss": FINAL_LOSS[seed]}, blocks={METRIC: [2 * v for v in profile]}),
        ]
        store.write_records(run_id, records)
        diverged = run_id == "pre-L04-s1"
        store.finish_run(
            run_id,
            status="diverged" if diverged else "completed",
            diverged_step=1 if diverged else None,
            final_train_loss=FINAL_LOSS[seed],
            final_val_loss=None,
            spike_count=0,
            wall_time_s=1.0,
            tokens_per_s=1.0,
        )
    yield store
    store.close()


@pytest.fixture
def experiment(tmp_path: Path) -> Experiment:
    return load_probe(write_probe(tmp_path, replace_line(VALID_PROBE, "steps = 0", "steps = 2"))).experiment


def make_claim(reduce: str, **values) -> Claim:
    fields = {"id": "c", "statement": "s", "metric": METRIC, "strategy": "pre", "expect": (-10.0, 10.0)}
    fields.update(values)
    return Claim(reduce=reduce, **fields)


def test_loglog_slope_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("loglog_slope_vs_depth")

    # Last block: seed 0 goes from 2 (depth 2) to 1 (depth 4), so the slope is log(1/2)/log(2) = -1.
    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(-1.0)
    # Seed 1 goes from 6 to 4: log(4/6)/log(2).
    assert reduce_for_seed(synthetic_store, experiment, claim, 1) == pytest.approx(math.log(4 / 6) / math.log(2))


def test_loglog_slope_first_layer(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("loglog_slope_vs_depth", layer=0)

    # Block 0 of seed 0 goes from 4 to 8: slope +1.
    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(1.0)


def test_last_over_first_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("last_over_first")

    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(1.0 / 8.0)
    assert reduce_for_seed(synthetic_store, experiment, claim, 1) == pytest.approx(4.0)
    shallow = make_claim("last_over_first", depth=2)
    assert reduce_for_seed(synthetic_store, experiment, shallow, 0) == pytest.approx(0.5)


def test_max_over_min_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("max_over_min", strategy="post")

    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(4.0)
    assert reduce_for_seed(synthetic_store, experiment, claim, 1) == pytest.approx(8.0)


def test_spearman_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("spearman_vs_layer")

    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(-1.0)
    # Ranks of [1, 3, 2, 4] against [1, 2, 3, 4]: d^2 sums to 2, so rho = 1 - 6*2/(4*15) = 0.8.
    assert reduce_for_seed(synthetic_store, experiment, claim, 1) == pytest.approx(0.8)


def test_spearman_of_flat_profile_fails(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("spearman_vs_layer", strategy="post", depth=2)

    result = evaluate_claim(synthetic_store, experiment, claim)

    assert result.error is not None
    assert "same in every block" in result.error
    assert result.verdict == "FAIL"


def test_growth_from_init_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("growth_from_init", at="final")

    # Every profile doubles from step 0 to step 1.
    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(2.0)


def test_at_step_reads_that_step(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("max_over_min", strategy="post", at=1)

    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(4.0)


def test_diverged_step_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("diverged_step", metric="loss")

    # Seed 0 never diverged, so it counts as the experiment's 2 steps.
    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == 2.0
    assert reduce_for_seed(synthetic_store, experiment, claim, 1) == 1.0


def test_final_loss_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("final_loss", metric="loss", strategy="post")

    result = evaluate_claim(synthetic_store, experiment, claim)

    assert result.values == {0: 3.0, 1: 4.0}
    assert result.mean == pytest.approx(3.5)


def test_baseline_ratio_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("max_over_min", baseline="post")

    result = evaluate_claim(synthetic_store, experiment, claim)

    assert result.values[0] == pytest.approx(8.0 / 4.0)
    assert result.values[1] == pytest.approx(4.0 / 8.0)


def test_missing_run_fails_claim(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("max_over_min", depth=3)

    result = evaluate_claim(synthetic_store, experiment, claim)

    assert result.error == "run pre-L03-s0 is not in the store"
    assert result.verdict == "FAIL"
    assert result.to_dict()["mean"] is None


# Verdicts and confidence intervals


def test_confidence_interval_matches_t_by_hand() -> None:
    values = [1.0, 2.0, 4.0]

    mean, interval = mean_confidence_interval(values)

    standard_error = np.std(values, ddof=1) / math.sqrt(3)
    half_width = stats.t.ppf(0.975, df=2) * standard_error
    assert mean == pytest.approx(7.0 / 3.0)
    assert interval is not None
    assert interval[0] == pytest.approx(7.0 / 3.0 - half_width)
    assert interval[1] == pytest.approx(7.0 / 3.0 + half_width)
    # The t quantile with 2 degrees of freedom is about 4.303.
    assert stats.t.ppf(0.975, df=2) == pytest.approx(4.3027, abs=1e-4)


def test_single_seed_has_no_interval() -> None:
    mean, interval = mean_confidence_interval([0.3])

    assert mean == 0.3
    assert interval is None


def test_verdict_uses_mean_inside_expect(synthetic_store: RunStore, experiment: Experiment) -> None:
    # Seed values 0.125 and 4.0 have mean 2.0625.
    inside = evaluate_claim(synthetic_store, experiment, make_claim("last_over_first", expect=(2.0, 2.1)))
    outside = evaluate_claim(synthetic_store, experiment, make_claim("last_over_first", expect=(0.0, 2.0)))

    assert inside.mean == pytest.approx(2.0625)
    assert inside.verdict == "PASS"
    assert outside.verdict == "FAIL"
    assert inside.n == 2
    assert inside.to_dict()["ci"] is not None
