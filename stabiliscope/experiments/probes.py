"""Probe files: a published claim about training stability, as a checkable TOML file.

A probe file has four parts:

- `[source]`: `authors`, `year`, `title` and `where` (the figure or theorem).
- `[experiment]`: the grid and settings of the runs, with the fields of
  `SweepConfig` (`strategies` in place of `norms`). `steps = 0` requests the
  model at initialization only. `kind` selects what is measured: `"sweep"`
  (the default) trains the grid with a watch into a run store; `"invariance"`
  and `"model_update"` compute the values of `KIND_METRICS` directly on the
  reference model (see `stabiliscope.experiments.measurements`).
- `[[variant]]` (optional): named settings of the same grid, each a `name`
  and the `[experiment]` keys of `VARIANT_KEYS` it changes, such as
  `warmup`. Each variant is run into its own sweep folder, and every claim
  names the variant it reads.
- `[reduced]` (optional): smaller `depths`, `seeds` and `steps` for a quick check.
- `[[claim]]`: one entry per claim, checked by `stabiliscope.experiments.claims`.

Every error names the file, the section or claim, and the key. Syntax errors
also carry the line and column that tomllib reports.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabiliscope.errors import ConfigError
from stabiliscope.experiments.invariance import DEFAULT_WEIGHT_SCALE, INVARIANCE_METRICS
from stabiliscope.experiments.model_update import MODEL_UPDATE_METRICS
from stabiliscope.experiments.sweep import SweepConfig
from stabiliscope.models import FFN_TYPES, INITS, NORM_TYPES, STRATEGIES, ModelConfig
from stabiliscope.models.config import EMBED_SCALES
from stabiliscope.watch.discovery import ROLES
from stabiliscope.watch.flush import POSITIONS, block_metric_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

REDUCERS = (
    "loglog_slope_vs_depth",
    "last_over_first",
    "max_over_min",
    "spearman_vs_layer",
    "growth_from_init",
    "diverged_step",
    "final_loss",
    "loglog_slope_vs_layer",
    "value",
)
"""Names accepted in a claim's `reduce`, each defined in `claims.reduce_for_seed` or `claims.reduce_measured`."""

RUN_REDUCERS = ("diverged_step", "final_loss")
"""Reducers that read a run's outcome (its loss) rather than a per-layer profile."""

KINDS = ("sweep", "invariance", "model_update")
"""Experiment kinds: what a probe measures and how."""

KIND_METRICS: dict[str, tuple[str, ...]] = {
    "invariance": INVARIANCE_METRICS,
    "model_update": MODEL_UPDATE_METRICS,
}
"""The values each measurement kind computes, one set per (strategy, depth, seed)."""

SWEEP_METRICS = block_metric_names(ROLES)
"""Per-block metrics the watch records on the reference model, which sweep claims read."""

SWEEP_METRIC_FORMS = (
    f"grad/<role> or update/<role> with role one of {', '.join(ROLES)}; grad/block; grad/resid_post; "
    f"act/<position>_rms, act/<position>_absmax or nonfinite/<position> with position one of "
    f"{', '.join(POSITIONS)}; attn/logit_max; attn/entropy"
)

MEASUREMENT_REDUCERS = ("value", "loglog_slope_vs_depth")
"""Reducers accepted for measurement kinds, whose values are one number per run."""

_MEASUREMENT_METRICS = frozenset(name for names in KIND_METRICS.values() for name in names)

VARIANT_KEYS = ("strategies", "init", "ffn", "norm", "warmup", "lr", "embed_scale", "grad_clip", "weight_scale")
"""`[experiment]` keys a `[[variant]]` may change. Depths, seeds and steps are shared, so one `[reduced]` fits every variant."""

_VARIANT_NAME = re.compile(r"[A-Za-z0-9_-]+")

AT_WORDS = ("init", "final")

DEFAULT_OUT_ROOT = Path("runs/probes")

_SOURCE_KEYS = ("authors", "year", "title", "where")
_EXPERIMENT_REQUIRED = (
    "strategies",
    "depths",
    "width",
    "heads",
    "steps",
    "lr",
    "batch_size",
    "seq_len",
    "seeds",
)
_EXPERIMENT_OPTIONAL = ("init", "ffn", "norm", "warmup", "data", "embed_scale", "grad_clip", "kind")
# The invariance kind measures models at initialization, so it takes no training keys.
_INVARIANCE_REQUIRED = ("strategies", "depths", "width", "heads", "batch_size", "seq_len", "seeds")
_INVARIANCE_OPTIONAL = ("init", "ffn", "norm", "data", "embed_scale", "kind", "weight_scale")
_REDUCED_KEYS = ("depths", "seeds", "steps")
_CLAIM_REQUIRED = ("id", "statement", "reduce", "strategy", "expect")
_CLAIM_OPTIONAL = ("metric", "at", "depth", "layer", "baseline", "variant", "baseline_variant")


@dataclass(frozen=True)
class Source:
    """Publication behind a probe."""

    authors: str
    year: int
    title: str
    where: str

    def citation(self) -> str:
        """Return `authors year, "title", where`."""
        return f'{self.authors} {self.year}, "{self.title}", {self.where}'


@dataclass(frozen=True)
class Experiment:
    """Grid and training settings of a probe; `steps = 0` means at initialization."""

    strategies: list[str]
    depths: list[int]
    width: int
    heads: int
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    seeds: list[int]
    init: str = "auto"
    ffn: str = "swiglu"
    norm: str = "rms"
    warmup: int = 0
    data: Path | None = None
    embed_scale: str = "default"
    grad_clip: float | None = None
    kind: str = "sweep"
    # Factor by which the invariance kind scales one head's rows of W_Q, W_K or W_V.
    weight_scale: float = DEFAULT_WEIGHT_SCALE


@dataclass(frozen=True)
class Claim:
    """One checkable claim of a probe.

    `at` is "init", "final" or a step number. `depth` picks the run of
    per-run reducers (None: the deepest). `layer` picks the block of
    `loglog_slope_vs_depth`, negative from the end (default -1, the last
    block). With `baseline` set, the measured value is the ratio of this
    strategy's value to the baseline strategy's, seed by seed.

    `variant` names the `[[variant]]` the claim reads (None when the file has
    none). With `baseline_variant`, the ratio's denominator is `baseline`
    (default: this strategy) in that other variant.
    """

    id: str
    statement: str
    metric: str
    reduce: str
    strategy: str
    expect: tuple[float, float]
    at: str | int = "init"
    depth: int | None = None
    layer: int = -1
    baseline: str | None = None
    variant: str | None = None
    baseline_variant: str | None = None

    def describe_subject(self) -> str:
        """Return what the claim measures, such as `post [no_warmup] / post [warmup]`."""
        subject = _with_variant(self.strategy, self.variant)
        if self.baseline is None and self.baseline_variant is None:
            return subject
        baseline = _with_variant(self.baseline or self.strategy, self.baseline_variant or self.variant)
        return f"{subject} / {baseline}"

    def describe_quantity(self) -> str:
        """Return the reduced quantity, such as `max_over_min of grad/mlp.out at final, depth 16`."""
        if self.reduce in RUN_REDUCERS:
            text = self.reduce
        elif self.reduce in MEASUREMENT_REDUCERS and self.metric in _MEASUREMENT_METRICS:
            text = f"{self.reduce} of {self.metric}"
        else:
            at = self.at if isinstance(self.at, str) else f"step {self.at}"
            text = f"{self.reduce} of {self.metric} at {at}"
        if self.reduce == "loglog_slope_vs_depth" and self.metric not in _MEASUREMENT_METRICS:
            text += ", last block" if self.layer == -1 else f", block {self.layer}"
        if self.depth is not None:
            text += f", depth {self.depth}"
        return text


def _with_variant(strategy: str, variant: str | None) -> str:
    return strategy if variant is None else f"{strategy} [{variant}]"


@dataclass(frozen=True)
class Probe:
    """A parsed and validated probe file.

    `variants` maps each `[[variant]]` name to its full experiment, in file
    order; it is empty when the file has no variants.
    """

    path: Path
    source: Source
    experiment: Experiment
    claims: list[Claim]
    reduced: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Experiment] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file stem, such as `xiong2020_theorem1`."""
        return self.path.stem

    def grid(self, *, reduced: bool = False, variant: str | None = None) -> Experiment:
        """Return the experiment of `variant` (None: `[experiment]`), with the `[reduced]` values applied when `reduced` is True.

        Raises KeyError for a variant name the file does not define.
        """
        experiment = self.experiment if variant is None else self.variants[variant]
        if not reduced or not self.reduced:
            return experiment
        return dataclasses.replace(experiment, **self.reduced)

    def variant_names(self) -> list[str | None]:
        """Return the names of the variants in file order, or `[None]` for a file without variants."""
        return list(self.variants) if self.variants else [None]

    def default_out(self, *, reduced: bool = False, root: Path = DEFAULT_OUT_ROOT) -> Path:
        """Return the sweep folder `root/<stem>`, or `root/<stem>-reduced` for the reduced grid.

        The two grids get separate folders because their runs share ids but
        differ in configuration, which the sweep rejects in one folder.
        """
        return root / (f"{self.name}-reduced" if reduced else self.name)


def variant_folder(out: Path, variant: str | None) -> Path:
    """Return the sweep folder of `variant` inside a probe's folder `out`: `out/<variant>`, or `out` for None."""
    return out if variant is None else out / variant


def train_steps(experiment: Experiment) -> int:
    """Return the optimizer steps to train: one for `steps = 0`, since the step-0 record contains the init gradients."""
    return max(experiment.steps, 1)


def sweep_config(experiment: Experiment, out: Path, device: str = "cpu") -> SweepConfig:
    """Build the SweepConfig that trains the runs of `experiment` into `out`."""
    values: dict[str, Any] = {
        "norms": list(experiment.strategies),
        "depths": list(experiment.depths),
        "width": experiment.width,
        "heads": experiment.heads,
        "steps": train_steps(experiment),
        "batch_size": experiment.batch_size,
        "seq_len": experiment.seq_len,
        "lr": experiment.lr,
        "warmup": experiment.warmup,
        "seeds": list(experiment.seeds),
        "init": experiment.init,
        "data": experiment.data,
        "out": out,
        "device": device,
        "norm": experiment.norm,
        "ffn": experiment.ffn,
        "grad_clip": experiment.grad_clip,
        "embed_scale": experiment.embed_scale,
    }
    return SweepConfig(**values)


def sweep_configs(probe: Probe, out: Path, device: str = "cpu", *, reduced: bool = False) -> list[SweepConfig]:
    """Return the SweepConfig of every variant of `probe` that trains a sweep, each into its folder under `out`.

    Measurement kinds have no sweep, so a probe of such a kind returns an empty list.
    """
    configs = []
    for variant in probe.variant_names():
        experiment = probe.grid(reduced=reduced, variant=variant)
        if experiment.kind == "sweep":
            configs.append(sweep_config(experiment, variant_folder(out, variant), device))
    return configs


def model_config(experiment: Experiment, strategy: str, depth: int, *, vocab_size: int) -> ModelConfig:
    """Build the model configuration of one run of `experiment`, as the sweep would for the same point.

    The init is resolved ("auto" becomes the strategy's default), so the
    configuration names the scheme it uses.
    """
    config = ModelConfig(
        depth=depth,
        width=experiment.width,
        heads=experiment.heads,
        strategy=strategy,
        norm=experiment.norm,
        ffn=experiment.ffn,
        init=experiment.init,
        vocab_size=vocab_size,
        max_seq_len=experiment.seq_len,
        embed_scale=experiment.embed_scale,
    )
    config.init = config.resolved_init
    return config


# Loading


def find_probe_files(paths: list[Path]) -> list[Path]:
    """Expand folders into their `*.toml` files (sorted, not recursive) and keep files as given.

    Raises ConfigError for a path that does not exist and for a folder without TOML files.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.toml"))
            if not found:
                raise ConfigError(f"{path}: folder contains no *.toml probe files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: probe file not found")
    return files


def load_probe(path: str | Path) -> Probe:
    """Read and validate one probe file; raise ConfigError naming the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: probe file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; pass a probe file or use find_probe_files") from None
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text ({error.reason})") from None

    return parse_probe(document, path)


def parse_probe(document: dict[str, Any], path: Path) -> Probe:
    """Validate a decoded TOML document; `path` is used in error messages and as the probe name."""
    where = _Where(path)
    _check_keys(
        where, "the top level", document, required=("source", "experiment", "claim"), optional=("reduced", "variant")
    )

    source = _parse_source(where, _table(where, "source", document["source"]))
    experiment_table = _table(where, "experiment", document["experiment"])
    experiment = _parse_experiment(where, experiment_table)
    variants = _parse_variants(where, document.get("variant"), experiment_table)
    reduced = _parse_reduced(where, document.get("reduced"), experiment)

    raw_claims = document["claim"]
    if not isinstance(raw_claims, list) or not raw_claims:
        raise where.error("[[claim]]", "give at least one [[claim]] entry")
    claims: list[Claim] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_claims):
        claim = _parse_claim(where, index, raw, experiment, reduced, variants)
        if claim.id in seen:
            raise where.error(f"claim {claim.id!r}", "id is used by an earlier claim; give each claim its own id")
        seen.add(claim.id)
        claims.append(claim)

    probe = Probe(
        path=path, source=source, experiment=experiment, claims=claims, reduced=reduced, variants=variants
    )
    _check_grids(where, probe)
    return probe


def _check_grids(where: _Where, probe: Probe) -> None:
    # The sweep's own checks (model shapes, sequence length, device) run here,
    # so a bad file is reported before any run trains.
    grids = [("[experiment]", False, None)]
    grids += [(f"variant {name!r}", False, name) for name in probe.variants]
    if probe.reduced:
        grids += [("[reduced]", True, variant) for variant in probe.variant_names()]
    for context, reduced, variant in grids:
        experiment = probe.grid(reduced=reduced, variant=variant)
        try:
            if experiment.kind == "invariance":
                _validate_untrained_grid(experiment)
            else:
                sweep_config(experiment, Path("unused")).validate()
        except ConfigError as error:
            raise where.error(context, str(error)) from None


def _validate_untrained_grid(experiment: Experiment) -> None:
    # The invariance kind builds models but trains none, so only the model
    # configurations are checked. Byte tokens stand in for the corpus.
    for depth in experiment.depths:
        for strategy in experiment.strategies:
            model_config(experiment, strategy, depth, vocab_size=256).validate()


class _Where:
    """Builder of ConfigError messages that start with the file name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, context: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {context}: {message}")


def _table(where: _Where, name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.error(f"[{name}]", f"must be a table, got {type(value).__name__}")
    return value


def _check_keys(
    where: _Where,
    context: str,
    table: dict[str, Any],
    *,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> None:
    accepted = (*required, *optional)
    for key in table:
        if key not in accepted:
            raise where.error(context, f"unknown key {key!r} (expected one of: {', '.join(accepted)})")
    for key in required:
        if key not in table:
            raise where.error(context, f"missing key {key!r} (required keys: {', '.join(required)})")


def _parse_source(where: _Where, table: dict[str, Any]) -> Source:
    _check_keys(where, "[source]", table, required=_SOURCE_KEYS)
    for key in ("authors", "title", "where"):
        _expect_text(where, "[source]", key, table[key])
    year = table["year"]
    if isinstance(year, bool) or not isinstance(year, int) or not 1900 <= year <= 2100:
        raise where.error("[source]", f"year must be a four-digit integer, got {year!r}")
    return Source(authors=table["authors"], year=year, title=table["title"], where=table["where"])


def _parse_experiment(where: _Where, table: dict[str, Any], context: str = "[experiment]") -> Experiment:
    kind = _expect_choice(where, context, "kind", table.get("kind", "sweep"), KINDS)
    trains = kind != "invariance"
    if trains:
        _check_keys(where, context, table, required=_EXPERIMENT_REQUIRED, optional=_EXPERIMENT_OPTIONAL)
    else:
        _check_keys(where, context, table, required=_INVARIANCE_REQUIRED, optional=_INVARIANCE_OPTIONAL)

    strategies = _expect_name_list(where, context, "strategies", table["strategies"], tuple(STRATEGIES))
    depths = _expect_int_list(where, context, "depths", table["depths"], minimum=1)
    seeds = _expect_int_list(where, context, "seeds", table["seeds"], minimum=0)
    width = _expect_int(where, context, "width", table["width"], minimum=1)
    heads = _expect_int(where, context, "heads", table["heads"], minimum=1)
    # The invariance kind measures untrained models, so steps is 0 and lr 0.0 stands for "not used".
    steps = _expect_int(where, context, "steps", table.get("steps", 0), minimum=1 if kind == "model_update" else 0)
    batch_size = _expect_int(where, context, "batch_size", table["batch_size"], minimum=1)
    seq_len = _expect_int(where, context, "seq_len", table["seq_len"], minimum=1)
    warmup = _expect_int(where, context, "warmup", table.get("warmup", 0), minimum=0)
    lr = _expect_number(where, context, "lr", table["lr"]) if trains else 0.0
    if trains and not lr > 0:
        raise where.error(context, f"lr must be a positive number, got {lr!r}")
    weight_scale = _expect_number(where, context, "weight_scale", table.get("weight_scale", DEFAULT_WEIGHT_SCALE))
    if not (weight_scale > 0 and weight_scale != 1):
        raise where.error(context, f"weight_scale must be a positive number other than 1, got {weight_scale!r}")
    grad_clip = table.get("grad_clip")
    if grad_clip is not None:
        grad_clip = _expect_number(where, context, "grad_clip", grad_clip)
        if not grad_clip > 0:
            raise where.error(context, f"grad_clip must be a positive number, got {grad_clip!r}")

    init = _expect_choice(where, context, "init", table.get("init", "auto"), ("auto", *INITS))
    ffn = _expect_choice(where, context, "ffn", table.get("ffn", "swiglu"), tuple(FFN_TYPES))
    norm = _expect_choice(where, context, "norm", table.get("norm", "rms"), tuple(NORM_TYPES))
    embed_scale = _expect_choice(
        where, context, "embed_scale", table.get("embed_scale", "default"), EMBED_SCALES
    )

    data = table.get("data")
    if data is not None:
        _expect_text(where, context, "data", data)
        # A relative data path is read relative to the probe file, so a probe
        # folder can ship its own text.
        data = Path(data) if Path(data).is_absolute() else where.path.parent / data
        if not data.exists():
            raise where.error(context, f"data path {str(data)!r} not found")

    if width % heads != 0:
        raise where.error(context, f"width {width} is not divisible by heads {heads}")

    return Experiment(
        strategies=strategies,
        depths=depths,
        width=width,
        heads=heads,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        seeds=seeds,
        init=init,
        ffn=ffn,
        norm=norm,
        warmup=warmup,
        data=data,
        embed_scale=embed_scale,
        grad_clip=grad_clip,
        kind=kind,
        weight_scale=weight_scale,
    )


def _parse_variants(where: _Where, raw: Any, experiment_table: dict[str, Any]) -> dict[str, Experiment]:
    # Each variant is the [experiment] table with the variant's keys replaced,
    # validated like [experiment] itself.
    if raw is None:
        return {}
    if not isinstance(raw, list) or not raw:
        raise where.error("[[variant]]", "give each variant as a [[variant]] table with a name")
    variants: dict[str, Experiment] = {}
    for index, table in enumerate(raw):
        if not isinstance(table, dict):
            raise where.error(f"variant {index + 1}", f"must be a table, got {type(table).__name__}")
        name = table.get("name")
        context = f"variant {name!r}" if isinstance(name, str) and name.strip() else f"variant {index + 1}"
        _check_keys(where, context, table, required=("name",), optional=VARIANT_KEYS)
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name):
            raise where.error(
                context, f"name must contain only letters, digits, '_' and '-' (it names a folder), got {name!r}"
            )
        if name in variants:
            raise where.error(context, "name is used by an earlier variant; give each variant its own name")
        if len(table) == 1:
            raise where.error(context, f"changes no setting; give at least one of: {', '.join(VARIANT_KEYS)}")
        changes = {key: value for key, value in table.items() if key != "name"}
        variants[name] = _parse_experiment(where, {**experiment_table, **changes}, context=context)
    return variants


def _parse_reduced(where: _Where, raw: Any, experiment: Experiment) -> dict[str, Any]:
    if raw is None:
        return {}
    context = "[reduced]"
    table = _table(where, "reduced", raw)
    _check_keys(where, context, table, required=(), optional=_REDUCED_KEYS)
    reduced: dict[str, Any] = {}
    if "depths" in table:
        reduced["depths"] = _expect_int_list(where, context, "depths", table["depths"], minimum=1)
    if "seeds" in table:
        reduced["seeds"] = _expect_int_list(where, context, "seeds", table["seeds"], minimum=0)
    if "steps" in table:
        if experiment.kind == "invariance":
            raise where.error(context, "steps does not apply to kind 'invariance', which trains no model")
        reduced["steps"] = _expect_int(where, context, "steps", table["steps"], minimum=0)
        if (reduced["steps"] == 0) != (experiment.steps == 0):
            raise where.error(
                context,
                f"steps {reduced['steps']} and [experiment] steps {experiment.steps} must both be 0 "
                "(at initialization) or both be positive, so the claims mean the same in both grids",
            )
    return reduced


def _parse_claim(
    where: _Where,
    index: int,
    raw: Any,
    experiment: Experiment,
    reduced: dict[str, Any],
    variants: dict[str, Experiment] | None = None,
) -> Claim:
    variants = variants or {}
    if not isinstance(raw, dict):
        raise where.error(f"claim {index + 1}", f"must be a table, got {type(raw).__name__}")
    claim_id = raw.get("id")
    if isinstance(claim_id, str) and claim_id.strip():
        context = f"claim {claim_id!r}"
    else:
        context = f"claim {index + 1}"
    _check_keys(where, context, raw, required=_CLAIM_REQUIRED, optional=_CLAIM_OPTIONAL)
    _expect_text(where, context, "id", claim_id)
    _expect_text(where, context, "statement", raw["statement"])

    reduce = raw["reduce"]
    if reduce not in REDUCERS:
        raise where.error(context, f"unknown reduce {reduce!r} (expected one of: {', '.join(REDUCERS)})")

    metric = raw.get("metric", "loss" if reduce in RUN_REDUCERS else None)
    if metric is None:
        raise where.error(context, f"missing key 'metric', which reduce {reduce!r} needs")
    _expect_text(where, context, "metric", metric)
    if reduce in RUN_REDUCERS and metric != "loss":
        raise where.error(context, f"metric must be 'loss' for reduce {reduce!r}, got {metric!r}")
    if reduce not in RUN_REDUCERS and metric == "loss":
        raise where.error(
            context, f"reduce {reduce!r} needs a per-layer metric such as 'grad/mlp.out', got 'loss'"
        )
    _check_claim_for_kind(where, context, raw, experiment.kind, reduce, metric)
    variant, baseline_variant = _parse_claim_variants(where, context, raw, tuple(variants))

    # A variant may run its own strategies, so each side of a ratio is checked
    # against the grid it reads.
    grid_name = "[experiment]" if variant is None else f"variant {variant!r}"
    strategies = tuple((experiment if variant is None else variants[variant]).strategies)
    strategy = raw["strategy"]
    if strategy not in strategies:
        raise where.error(
            context, f"strategy {strategy!r} is not in {grid_name} strategies ({', '.join(strategies)})"
        )
    baseline = raw.get("baseline")
    if baseline_variant is not None:
        baseline_strategies = tuple(variants[baseline_variant].strategies)
        if (baseline or strategy) not in baseline_strategies:
            raise where.error(
                context,
                f"baseline {baseline or strategy!r} is not in variant {baseline_variant!r} strategies "
                f"({', '.join(baseline_strategies)})",
            )
    elif baseline is not None and (baseline not in strategies or baseline == strategy):
        raise where.error(
            context,
            f"baseline {baseline!r} must be another strategy of {grid_name} strategies ({', '.join(strategies)})",
        )

    if experiment.kind == "sweep":
        at = _parse_at(where, context, raw.get("at", "init"), experiment, reduced)
    else:
        # Measurement kinds have one value per run: at initialization, or after the trained steps.
        at = "init" if experiment.kind == "invariance" else "final"
    if reduce == "growth_from_init" and at == "init":
        raise where.error(context, "reduce 'growth_from_init' needs at = 'final' or a step after 0")

    depth = raw.get("depth")
    if depth is not None:
        if reduce == "loglog_slope_vs_depth":
            raise where.error(context, "depth does not apply to reduce 'loglog_slope_vs_depth', which uses every depth")
        depth = _expect_int(where, context, "depth", depth, minimum=1)
        for grid_name, depths in (("[experiment]", experiment.depths), ("[reduced]", reduced.get("depths"))):
            if depths is not None and depth not in depths:
                raise where.error(context, f"depth {depth} is not in {grid_name} depths {depths}")
    if reduce in ("last_over_first", "spearman_vs_layer", "loglog_slope_vs_layer"):
        shallowest = min(depth_choices(experiment, reduced, depth))
        if shallowest < 2:
            raise where.error(context, f"reduce {reduce!r} needs at least 2 blocks, but depth {shallowest} has 1")

    layer = raw.get("layer", -1)
    if reduce != "loglog_slope_vs_depth" and "layer" in raw:
        raise where.error(context, "layer applies only to reduce 'loglog_slope_vs_depth'")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise where.error(context, f"layer must be an integer block index (negative from the end), got {layer!r}")
    if reduce == "loglog_slope_vs_depth":
        for depths in (experiment.depths, reduced.get("depths")):
            if depths is None:
                continue
            if len(depths) < 2:
                raise where.error(context, f"reduce 'loglog_slope_vs_depth' needs at least 2 depths, got {depths}")
            if not -min(depths) <= layer < min(depths):
                raise where.error(context, f"layer {layer} does not exist at depth {min(depths)}")

    expect = _parse_expect(where, context, raw["expect"])
    return Claim(
        id=claim_id,
        statement=raw["statement"],
        metric=metric,
        reduce=reduce,
        strategy=strategy,
        expect=expect,
        at=at,
        depth=depth,
        layer=layer,
        baseline=baseline,
        variant=variant,
        baseline_variant=baseline_variant,
    )


def _check_claim_for_kind(
    where: _Where, context: str, raw: dict[str, Any], kind: str, reduce: str, metric: str
) -> None:
    if kind == "sweep":
        if reduce == "value":
            raise where.error(
                context, f"reduce 'value' applies only to measurement kinds ({', '.join(KIND_METRICS)})"
            )
        if reduce not in RUN_REDUCERS and metric not in SWEEP_METRICS:
            close = difflib.get_close_matches(metric, SWEEP_METRICS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise where.error(context, f"unknown metric {metric!r} (expected {SWEEP_METRIC_FORMS}){hint}")
        return
    if reduce not in MEASUREMENT_REDUCERS:
        raise where.error(
            context,
            f"reduce {reduce!r} does not apply to kind {kind!r} (expected one of: {', '.join(MEASUREMENT_REDUCERS)})",
        )
    if metric not in KIND_METRICS[kind]:
        raise where.error(
            context, f"unknown metric {metric!r} for kind {kind!r} (expected one of: {', '.join(KIND_METRICS[kind])})"
        )
    for key in ("at", "layer"):
        if key in raw:
            raise where.error(context, f"{key} does not apply to kind {kind!r}, which has one value per run")


def _parse_claim_variants(
    where: _Where, context: str, raw: dict[str, Any], variant_names: tuple[str, ...]
) -> tuple[str | None, str | None]:
    variant = raw.get("variant")
    baseline_variant = raw.get("baseline_variant")
    if not variant_names:
        for key in ("variant", "baseline_variant"):
            if key in raw:
                raise where.error(context, f"{key} needs [[variant]] entries, and this file has none")
        return None, None

    accepted = ", ".join(variant_names)
    if variant is None:
        raise where.error(context, f"missing key 'variant', which a file with [[variant]] entries needs ({accepted})")
    if variant not in variant_names:
        raise where.error(context, f"unknown variant {variant!r} (expected one of: {accepted})")
    if baseline_variant is not None and (baseline_variant not in variant_names or baseline_variant == variant):
        raise where.error(context, f"baseline_variant {baseline_variant!r} must be another variant ({accepted})")
    return variant, baseline_variant


def depth_choices(experiment: Experiment, reduced: dict[str, Any], depth: int | None) -> list[int]:
    """Return the depth a per-run claim reads in each grid: `depth`, or each grid's deepest."""
    if depth is not None:
        return [depth]
    choices = [max(experiment.depths)]
    if "depths" in reduced:
        choices.append(max(reduced["depths"]))
    return choices


def _parse_at(
    where: _Where, context: str, at: Any, experiment: Experiment, reduced: dict[str, Any]
) -> str | int:
    if isinstance(at, str):
        if at not in AT_WORDS:
            raise where.error(context, f"unknown at {at!r} (expected 'init', 'final' or a step number)")
        return at
    if isinstance(at, bool) or not isinstance(at, int) or at < 0:
        raise where.error(context, f"at must be 'init', 'final' or a step number >= 0, got {at!r}")
    last_steps = [experiment.steps, reduced.get("steps", experiment.steps)]
    last = min(train_steps(dataclasses.replace(experiment, steps=steps)) for steps in last_steps) - 1
    if at > last:
        raise where.error(context, f"at step {at} is after the last trained step {last}")
    return at


def _parse_expect(where: _Where, context: str, expect: Any) -> tuple[float, float]:
    message = "expect must be [low, high] with low <= high (use a huge number such as 1e30 for an open end)"
    if not isinstance(expect, list) or len(expect) != 2:
        raise where.error(context, f"{message}, got {expect!r}")
    low, high = expect
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise where.error(context, f"{message}, got {expect!r}")
    if low > high:
        raise where.error(context, f"{message}, got {expect!r}")
    return float(low), float(high)


def _expect_text(where: _Where, context: str, key: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise where.error(context, f"{key} must be a non-empty string, got {value!r}")


def _expect_int(where: _Where, context: str, key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise where.error(context, f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _expect_number(where: _Where, context: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise where.error(context, f"{key} must be a finite number, got {value!r}")
    return float(value)


def _expect_int_list(where: _Where, context: str, key: str, value: Any, *, minimum: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise where.error(context, f"{key} must be a non-empty list of integers, got {value!r}")
    for item in value:
        _expect_int(where, context, f"each of {key}", item, minimum=minimum)
    if len(set(value)) != len(value):
        raise where.error(context, f"{key} lists a value more than once: {value!r}")
    return list(value)


def _expect_name_list(
    where: _Where, context: str, key: str, value: Any, accepted: tuple[str, ...]
) -> list[str]:
    if not isinstance(value, list) or not value:
        raise where.error(context, f"{key} must be a non-empty list of names, got {value!r}")
    for item in value:
        if item not in accepted:
            raise where.error(context, f"unknown {key} entry {item!r} (expected one of: {', '.join(accepted)})")
    if len(set(value)) != len(value):
        raise where.error(context, f"{key} lists a name more than once: {value!r}")
    return list(value)


def _expect_choice(where: _Where, context: str, key: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise where.error(context, f"unknown {key} {value!r} (expected one of: {', '.join(accepted)})")
    return value
