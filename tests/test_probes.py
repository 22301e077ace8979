"""Probe files: schema validation, claim reducers on a hand-built store, confidence intervals."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from stabiliscope.errors import ConfigError
from stabiliscope.experiments.claims import (
    ClaimSource,
    MissingDataError,
    evaluate_claim,
    evaluate_claim_from,
    mean_confidence_interval,
    reduce_for_seed,
    reduce_measured,
    reduce_profile,
)
from stabiliscope.experiments.probes import (
    Claim,
    Experiment,
    find_probe_files,
    load_probe,
    sweep_config,
    sweep_configs,
    train_steps,
    variant_folder,
)
from stabiliscope.experiments.sweep import grid, make_run_id, point_configs, run_sweep
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
    ('metric = "grad/mlp.out"', 'metric = "grad/mlp_out"', "claim 'pre-slope': unknown metric 'grad/mlp_out' (expected grad/<role>"),
    ('metric = "grad/mlp.out"', 'metric = "grad/mlp_out"', "did you mean 'grad/mlp.out'?"),
    ('metric = "grad/mlp.out"', 'metric = "act/resid_rms"', "position one of resid_pre, attn_out, resid_mid, mlp_out, resid_post"),
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


# Variants

VARIANT_PROBE = """
[source]
authors = "Doe et al."
year = 2020
title = "A Paper"
where = "Figure 2"

[experiment]
strategies = ["pre", "post"]
depths = [2]
width = 32
heads = 2
steps = 4
lr = 1e-3
batch_size = 2
seq_len = 16
seeds = [0, 1]

[[variant]]
name = "warm"
warmup = 2

[[variant]]
name = "cold"
warmup = 0
lr = 2e-3

[reduced]
seeds = [0]

[[claim]]
id = "post-cold-vs-warm"
statement = "Post-Norm ends worse without warmup."
reduce = "final_loss"
strategy = "post"
variant = "cold"
baseline_variant = "warm"
expect = [1.0, 1e30]
"""


def test_variants_load_in_file_order(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, VARIANT_PROBE))

    assert list(probe.variants) == ["warm", "cold"]
    assert probe.variant_names() == ["warm", "cold"]
    assert probe.grid(variant="warm").warmup == 2
    assert probe.grid(variant="warm").lr == 1e-3
    assert probe.grid(variant="cold").warmup == 0
    assert probe.grid(variant="cold").lr == 2e-3
    assert probe.grid(reduced=True, variant="cold").seeds == [0]
    assert probe.grid(reduced=True, variant="cold").lr == 2e-3


def test_variant_claim_fields(tmp_path: Path) -> None:
    claim = load_probe(write_probe(tmp_path, VARIANT_PROBE)).claims[0]

    assert claim.variant == "cold"
    assert claim.baseline_variant == "warm"
    assert claim.baseline is None
    assert claim.describe_subject() == "post [cold] / post [warm]"


def test_variant_folders(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, VARIANT_PROBE))

    configs = sweep_configs(probe, tmp_path / "out")

    assert variant_folder(tmp_path / "out", "warm") == tmp_path / "out" / "warm"
    assert variant_folder(tmp_path / "out", None) == tmp_path / "out"
    assert [config.out for config in configs] == [tmp_path / "out" / "warm", tmp_path / "out" / "cold"]
    assert [config.warmup for config in configs] == [2, 0]


def test_file_without_variants_has_one_grid(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, VALID_PROBE))

    assert probe.variants == {}
    assert probe.variant_names() == [None]
    assert probe.claims[0].describe_subject() == "pre"


VARIANT_BAD_CASES = [
    # (old text, new text, expected words in the message)
    ('name = "cold"\nwarmup = 0\nlr = 2e-3\n', 'name = "cold"\n', "variant 'cold': changes no setting"),
    ('name = "cold"', 'name = "warm"', "variant 'warm': name is used by an earlier variant"),
    ('name = "cold"', 'name = "../cold"', "variant '../cold': name must contain only letters"),
    ('name = "cold"\n', "", "variant 2: missing key 'name'"),
    ("warmup = 0\nlr = 2e-3", "warmup = 0\ndepths = [4]", "variant 'cold': unknown key 'depths'"),
    ("warmup = 0\nlr = 2e-3", "warmup = -1", "variant 'cold': warmup must be an integer >= 0, got -1"),
    ("warmup = 0\nlr = 2e-3", 'init = "glorot"', "variant 'cold': unknown init 'glorot'"),
    ('variant = "cold"\n', "", "claim 'post-cold-vs-warm': missing key 'variant'"),
    ('variant = "cold"', 'variant = "hot"', "claim 'post-cold-vs-warm': unknown variant 'hot' (expected one of: warm, cold)"),
    ('baseline_variant = "warm"', 'baseline_variant = "cold"', "baseline_variant 'cold' must be another variant"),
]


@pytest.mark.parametrize(("old", "new", "expected"), VARIANT_BAD_CASES)
def test_invalid_variant_names_file_and_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write_probe(tmp_path, replace_line(VARIANT_PROBE, old, new))

    with pytest.raises(ConfigError) as raised:
        load_probe(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_variant_key_needs_variants(tmp_path: Path) -> None:
    text = replace_line(VALID_PROBE, 'strategy = "pre"\n', 'strategy = "pre"\nvariant = "cold"\n')

    with pytest.raises(ConfigError, match="claim 'pre-slope': variant needs \\[\\[variant\\]\\] entries"):
        load_probe(write_probe(tmp_path, text))


def test_baseline_variant_allows_same_strategy(tmp_path: Path) -> None:
    text = replace_line(VARIANT_PROBE, 'strategy = "post"\n', 'strategy = "post"\nbaseline = "post"\n')

    claim = load_probe(write_probe(tmp_path, text)).claims[0]

    assert claim.baseline == "post"
    assert claim.describe_subject() == "post [cold] / post [warm]"


# Embedding scale


def test_embed_scale_reaches_sweep(tmp_path: Path) -> None:
    text = replace_line(VALID_PROBE, "seq_len = 16", 'seq_len = 16\nembed_scale = "sqrt_d"')
    probe = load_probe(write_probe(tmp_path, text))

    config = sweep_config(probe.experiment, tmp_path / "out")
    model, _ = point_configs(config, grid(config)[0], vocab_size=256)

    assert probe.experiment.embed_scale == "sqrt_d"
    assert config.embed_scale == "sqrt_d"
    assert model.embed_scale == "sqrt_d"


def test_sweep_rejects_unknown_embed_scale(tmp_path: Path) -> None:
    config = sweep_config(load_probe(write_probe(tmp_path, VALID_PROBE)).experiment, tmp_path / "out")
    config.embed_scale = "huge"

    with pytest.raises(ConfigError, match="unknown embed_scale 'huge'; expected one of: default, sqrt_d"):
        config.validate()


def test_embed_scale_recorded_in_run(tmp_path: Path, single_torch_thread: None) -> None:
    text = replace_line(VALID_PROBE, "seq_len = 16", 'seq_len = 16\nembed_scale = "sqrt_d"')
    probe = load_probe(write_probe(tmp_path, text))
    experiment = dataclasses.replace(probe.experiment, strategies=["pre"], depths=[2], seeds=[0])

    run_sweep(sweep_config(experiment, tmp_path / "out"))

    with RunStore(tmp_path / "out" / "store.sqlite", read_only=True) as store:
        run = store.get_run(make_run_id("pre", 2, 0))
    assert run is not None
    assert run.config["model"]["embed_scale"] == "sqrt_d"


# Measurement kinds

INVARIANCE_PROBE = """
[source]
authors = "Doe et al."
year = 2025
title = "A Paper"
where = "Section 3"

[experiment]
kind = "invariance"
strategies = ["hybrid", "pre"]
depths = [1, 2]
width = 16
heads = 2
batch_size = 2
seq_len = 8
seeds = [0]

[[claim]]
id = "cosine"
statement = "The gradient is orthogonal to the weight."
metric = "invariance/cosine.q"
reduce = "value"
strategy = "hybrid"
expect = [0.0, 1e-3]
"""


def test_invariance_probe_loads(tmp_path: Path) -> None:
    probe = load_probe(write_probe(tmp_path, INVARIANCE_PROBE))

    assert probe.experiment.kind == "invariance"
    assert probe.experiment.steps == 0
    assert probe.experiment.weight_scale == 4.0
    assert probe.claims[0].at == "init"
    assert sweep_configs(probe, tmp_path / "out") == []


KIND_BAD_CASES = [
    ("seeds = [0]\n", "seeds = [0]\nlr = 1e-3\n", "[experiment]: unknown key 'lr'"),
    ("seeds = [0]\n", "seeds = [0]\nsteps = 3\n", "[experiment]: unknown key 'steps'"),
    ('kind = "invariance"', 'kind = "magic"', "[experiment]: unknown kind 'magic' (expected one of: sweep, invariance, model_update)"),
    ("seeds = [0]\n", "seeds = [0]\nweight_scale = 1.0\n", "weight_scale must be a positive number other than 1, got 1.0"),
    ("seeds = [0]\n", "seeds = [0]\n\n[reduced]\nsteps = 0\n", "[reduced]: steps does not apply to kind 'invariance'"),
    ('metric = "invariance/cosine.q"', 'metric = "grad/mlp.out"', "claim 'cosine': unknown metric 'grad/mlp.out' for kind 'invariance'"),
    ('reduce = "value"', 'reduce = "max_over_min"', "claim 'cosine': reduce 'max_over_min' does not apply to kind 'invariance'"),
    ('id = "cosine"\n', 'id = "cosine"\nat = "final"\n', "claim 'cosine': at does not apply to kind 'invariance'"),
    ('id = "cosine"\n', 'id = "cosine"\ndepth = 3\n', "claim 'cosine': depth 3 is not in [experiment] depths [1, 2]"),
]


@pytest.mark.parametrize(("old", "new", "expected"), KIND_BAD_CASES)
def test_invalid_kind_names_file_and_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write_probe(tmp_path, replace_line(INVARIANCE_PROBE, old, new))

    with pytest.raises(ConfigError) as raised:
        load_probe(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_value_reducer_needs_measurement_kind(tmp_path: Path) -> None:
    text = replace_line(VALID_PROBE, 'reduce = "loglog_slope_vs_depth"', 'reduce = "value"')

    with pytest.raises(ConfigError, match="claim 'pre-slope': reduce 'value' applies only to measurement kinds"):
        load_probe(write_probe(tmp_path, text))


def test_model_update_needs_steps(tmp_path: Path) -> None:
    text = replace_line(VALID_PROBE, "seq_len = 16", 'seq_len = 16\nkind = "model_update"')

    with pytest.raises(ConfigError, match=r"\[experiment\]: steps must be an integer >= 1, got 0"):
        load_probe(write_probe(tmp_path, text))


def test_model_update_claim_reads_final(tmp_path: Path) -> None:
    text = replace_line(VALID_PROBE, "seq_len = 16", 'seq_len = 16\nkind = "model_update"')
    text = replace_line(text, "steps = 0", "steps = 3")
    text = replace_line(text, "[reduced]\ndepths = [2, 3]", "[reduced]\ndepths = [2, 3]\nsteps = 2")
    text = replace_line(text, 'metric = "grad/mlp.out"', 'metric = "model_update/max"')

    probe = load_probe(write_probe(tmp_path, text))

    assert probe.experiment.kind == "model_update"
    assert probe.claims[0].at == "final"
    assert probe.grid(reduced=True).steps == 2


# New reducers by hand


def test_loglog_slope_vs_layer_by_hand(synthetic_store: RunStore, experiment: Experiment) -> None:
    claim = make_claim("loglog_slope_vs_layer", depth=2)

    # Seed 0, depth 2: [4, 2] against layers 1, 2 gives log(2/4)/log(2) = -1.
    assert reduce_for_seed(synthetic_store, experiment, claim, 0) == pytest.approx(-1.0)
    # Seed 1, depth 2: [3, 6] gives +1.
    assert reduce_for_seed(synthetic_store, experiment, claim, 1) == pytest.approx(1.0)


def test_loglog_slope_vs_layer_power_law() -> None:
    # 3 * (l + 1)^0.5 over four blocks is an exact power law with exponent 0.5.
    profile = [3.0 * math.sqrt(layer + 1) for layer in range(4)]

    assert reduce_profile(profile, "loglog_slope_vs_layer") == pytest.approx(0.5)


def test_loglog_slope_vs_layer_rejects_zero() -> None:
    with pytest.raises(MissingDataError, match="not positive in every block"):
        reduce_profile([1.0, 0.0, 2.0], "loglog_slope_vs_layer", run_id="r", metric="m")


MEASURED = {
    make_run_id("hybrid", 1, 0): {"invariance/cosine.q": 1e-5, "model_update/max": 0.2},
    make_run_id("hybrid", 2, 0): {"invariance/cosine.q": 2e-5, "model_update/max": 0.2},
    make_run_id("pre", 1, 0): {"invariance/cosine.q": 0.05, "model_update/max": 0.1},
    make_run_id("pre", 2, 0): {"invariance/cosine.q": 0.04, "model_update/max": 0.4},
    make_run_id("hybrid", 1, 1): {"invariance/cosine.q": math.nan, "model_update/max": 0.2},
}


@pytest.fixture
def measured_experiment(tmp_path: Path) -> Experiment:
    return load_probe(write_probe(tmp_path, INVARIANCE_PROBE)).experiment


def test_measured_value_by_hand(measured_experiment: Experiment) -> None:
    claim = make_claim("value", metric="invariance/cosine.q", strategy="hybrid")
    shallow = make_claim("value", metric="invariance/cosine.q", strategy="pre", depth=1)

    # Without a depth the deepest run (depth 2) is read.
    assert reduce_measured(MEASURED, measured_experiment, claim, 0) == 2e-5
    assert reduce_measured(MEASURED, measured_experiment, shallow, 0) == 0.05


def test_measured_loglog_slope_by_hand(measured_experiment: Experiment) -> None:
    claim = make_claim("loglog_slope_vs_depth", metric="model_update/max", strategy="pre")
    flat = make_claim("loglog_slope_vs_depth", metric="model_update/max", strategy="hybrid")

    # 0.1 at depth 1 and 0.4 at depth 2: log(4)/log(2) = 2.
    assert reduce_measured(MEASURED, measured_experiment, claim, 0) == pytest.approx(2.0)
    assert reduce_measured(MEASURED, measured_experiment, flat, 0) == pytest.approx(0.0)


def test_measured_missing_and_nan(measured_experiment: Experiment) -> None:
    missing = make_claim("value", metric="invariance/cosine.q", strategy="pre")
    not_finite = make_claim("value", metric="invariance/cosine.q", strategy="hybrid", depth=1)

    with pytest.raises(MissingDataError, match="run pre-L02-s1 has no measured values"):
        reduce_measured(MEASURED, measured_experiment, missing, 1)
    with pytest.raises(MissingDataError, match="run hybrid-L01-s1: invariance/cosine.q is nan"):
        reduce_measured(MEASURED, measured_experiment, not_finite, 1)


def test_measured_baseline_ratio_by_hand(measured_experiment: Experiment) -> None:
    experiment = dataclasses.replace(measured_experiment, seeds=[0])
    claim = make_claim("value", metric="invariance/cosine.q", strategy="hybrid", baseline="pre")

    result = evaluate_claim_from({None: ClaimSource(experiment, measured=MEASURED)}, claim)

    assert result.values == {0: pytest.approx(2e-5 / 0.04)}
    assert result.ci is None


def test_baseline_variant_ratio_by_hand(tmp_path: Path, experiment: Experiment) -> None:
    # Two variants of one final-loss claim: "cold" losses 6 and 8, "warm" losses 3 and 4.
    stores = {}
    for variant, scale in (("cold", 2.0), ("warm", 1.0)):
        store = RunStore.open(tmp_path / variant)
        for seed, loss in FINAL_LOSS.items():
            run_id = make_run_id("post", 4, seed)
            store.begin_run(run_id, {}, strategy="post", depth=4, width=8, seed=seed)
            store.write_records(run_id, [StepRecord(step=0, scalars={"loss": 5.0}, blocks={})])
            store.finish_run(
                run_id,
                status="completed",
                diverged_step=None,
                final_train_loss=scale * loss,
                final_val_loss=None,
                spike_count=0,
                wall_time_s=1.0,
                tokens_per_s=1.0,
            )
        stores[variant] = store
    claim = make_claim("final_loss", metric="loss", strategy="post", variant="cold", baseline_variant="warm")
    sources = {name: ClaimSource(experiment, store=store) for name, store in stores.items()}

    result = evaluate_claim_from(sources, claim)

    for store in stores.values():
        store.close()
    assert result.error is None
    assert result.values == {0: pytest.approx(2.0), 1: pytest.approx(2.0)}
    assert result.mean == pytest.approx(2.0)
    assert result.to_dict()["variant"] == "cold"
    assert result.to_dict()["baseline_variant"] == "warm"


STRATEGY_VARIANTS = """
[[variant]]
name = "post_xavier"
strategies = ["post"]
init = "xavier"

[[variant]]
name = "pre_auto"
strategies = ["pre"]
init = "auto"
"""


def strategy_variant_probe(claim_lines: str) -> str:
    head = VALID_PROBE[: VALID_PROBE.index("[reduced]")]
    claim = (
        '[[claim]]\nid = "ratio"\nstatement = "s"\nmetric = "grad/mlp.out"\nreduce = "max_over_min"\n'
        + claim_lines
        + "expect = [0.0, 1.0]\n"
    )
    return head + STRATEGY_VARIANTS + claim


def test_variant_runs_own_strategies(tmp_path: Path) -> None:
    text = strategy_variant_probe(
        'strategy = "pre"\nvariant = "pre_auto"\nbaseline = "post"\nbaseline_variant = "post_xavier"\n'
    )

    probe = load_probe(write_probe(tmp_path, text))

    assert probe.grid(variant="post_xavier").strategies == ["post"]
    assert probe.grid(variant="post_xavier").init == "xavier"
    assert probe.grid(variant="pre_auto").strategies == ["pre"]
    assert probe.claims[0].describe_subject() == "pre [pre_auto] / post [post_xavier]"


def test_claim_strategy_must_be_in_its_variant(tmp_path: Path) -> None:
    text = strategy_variant_probe('strategy = "post"\nvariant = "pre_auto"\n')

    with pytest.raises(ConfigError, match=r"claim 'ratio': strategy 'post' is not in variant 'pre_auto' strategies \(pre\)"):
        load_probe(write_probe(tmp_path, text))


def test_baseline_must_be_in_baseline_variant(tmp_path: Path) -> None:
    text = strategy_variant_probe('strategy = "pre"\nvariant = "pre_auto"\nbaseline_variant = "post_xavier"\n')

    with pytest.raises(ConfigError, match=r"baseline 'pre' is not in variant 'post_xavier' strategies \(post\)"):
        load_probe(write_probe(tmp_path, text))


def test_sweep_metrics_match_watch() -> None:
    """Every per-block name a probe accepts is recorded on the reference model, and the reverse."""
    torch = pytest.importorskip("torch")
    from stabiliscope.experiments.probes import SWEEP_METRICS
    from stabiliscope.models import ModelConfig, build_model
    from stabiliscope.watch import watch

    model = build_model(ModelConfig(strategy="pre", depth=2, width=16, heads=2, vocab_size=32, max_seq_len=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 32, (2, 8))
    with watch(model, optimizer) as w:
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        w.step(loss)
    assert set(w.records[0].blocks) == set(SWEEP_METRICS)

