"""Probe files: a published claim about training stability, as a checkable TOML file.

A probe file has four parts:

- `[source]`: `authors`, `year`, `title` and `where` (the figure or theorem).
- `[experiment]`: the grid and settings of the runs, with the fields of
  `SweepConfig` (`strategies` in place of `norms`). `steps = 0` requests the
  model at initialization only.
- `[reduced]` (optional): smaller `depths`, `seeds` and `steps` for a quick check.
- `[[claim]]`: one entry per claim, checked by `stabiliscope.experiments.claims`.

Every error names the file, the section or claim, and the key. Syntax errors
also carry the line and column that tomllib reports.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabiliscope.errors import ConfigError
from stabiliscope.experiments.sweep import SweepConfig
from stabiliscope.models import FFN_TYPES, INITS, NORM_TYPES, STRATEGIES
from stabiliscope.models.config import EMBED_SCALES

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
)
"""Names accepted in a claim's `reduce`; `claims.reduce_for_seed` defines each one."""

RUN_REDUCERS = ("diverged_step", "final_loss")
"""Reducers that read a run's outcome (its loss) rather than a per-layer profile."""

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
_EXPERIMENT_OPTIONAL = ("init", "ffn", "norm", "warmup", "data", "embed_scale", "grad_clip")
_REDUCED_KEYS = ("depths", "seeds", "steps")
_CLAIM_REQUIRED = ("id", "statement", "reduce", "strategy", "expect")
_CLAIM_OPTIONAL = ("metric", "at", "depth", "layer", "baseline")


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


@dataclass(frozen=True)
class Claim:
    """One checkable claim of a probe.

    `at` is "init", "final" or a step number. `depth` picks the run of
    per-run reducers (None: the deepest). `layer` picks the block of
    `loglog_slope_vs_depth`, negative from the end (default -1, the last
    block). With `baseline` set, the measured value is the ratio of this
    strategy's value to the baseline strategy's, seed by seed.
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


@dataclass(frozen=True)
class Probe:
    """A parsed and validated probe file."""

    path: Path
    source: Source
    experiment: Experiment
    claims: list[Claim]
    reduced: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file stem, such as `xiong2020_theorem1`."""
        return self.path.stem

    def grid(self, *, reduced: bool = False) -> Experiment:
        """Return the experiment, with the `[reduced]` values applied when `reduced` is True."""
        if not reduced or not self.reduced:
            return self.experiment
        return dataclasses.replace(self.experiment, **self.reduced)

    def default_out(self, *, reduced: bool = False, root: Path = DEFAULT_OUT_ROOT) -> Path:
        """Return the sweep folder `root/<stem>`, or `root/<stem>-reduced` for the reduced grid.

        The two grids get separate folders because their runs share ids but
        differ in configuration, which the sweep rejects in one folder.
        """
        return root / (f"{self.name}-reduced" if reduced else self.name)


def train_steps(experiment: Experiment) -> int:
    """Return the optimizer steps to train: one for `steps = 0`, since the step-0 record contains the init gradients."""
    return max(experiment.steps, 1)


def sweep_config(experiment: Experiment, out: Path, device: str = "cpu") -> SweepConfig:
    """Build the SweepConfig that trains the runs of `experiment` into `out`.

    Raises ConfigError when `embed_scale` is set but the sweep has no such
    option in this version.
    """
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
    }
    if experiment.embed_scale != "default":
        sweep_fields = {item.name for item in dataclasses.fields(SweepConfig)}
        if "embed_scale" not in sweep_fields:
            raise ConfigError(
                f"embed_scale {experiment.embed_scale!r} is not supported by the sweep of this "
                "stabiliscope version; remove embed_scale from [experiment]"
            )
        values["embed_scale"] = experiment.embed_scale
    return SweepConfig(**values)


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
    _check_keys(where, "the top level", document, required=("source", "experiment", "claim"), optional=("reduced",))

    source = _parse_source(where, _table(where, "source", document["source"]))
    experiment = _parse_experiment(where, _table(where, "experiment", document["experiment"]))
    reduced = _parse_reduced(where, document.get("reduced"), experiment)

    raw_claims = document["claim"]
    if not isinstance(raw_claims, list) or not raw_claims:
        raise where.error("[[claim]]", "give at least one [[claim]] entry")
    claims: list[Claim] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_claims):
        claim = _parse_claim(where, index, raw, experiment, reduced)
        if claim.id in seen:
            raise where.error(f"claim {claim.id!r}", "id is used by an earlier claim; give each claim its own id")
        seen.add(claim.id)
        claims.append(claim)

    probe = Probe(path=path, source=source, experiment=experiment, claims=claims, reduced=reduced)
    _check_grids(where, probe)
    return probe


def _check_grids(where: _Where, probe: Probe) -> None:
    # The sweep's own checks (model shapes, sequence length, device) run here,
    # so a bad file is reported before any run trains.
    grids = [("[experiment]", False)] + ([("[reduced]", True)] if probe.reduced else [])
    for context, reduced in grids:
        try:
            sweep_config(probe.grid(reduced=reduced), Path("unused")).validate()
        except ConfigError as error:
            raise where.error(context, str(error)) from None


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
            raise where.error(context, f"missing key {key!r}")


def _parse_source(where: _Where, table: dict[str, Any]) -> Source:
    _check_keys(where, "[source]", table, required=_SOURCE_KEYS)
    for key in ("authors", "title", "where"):
        _expect_text(where, "[source]", key, table[key])
    year = table["year"]
    if isinstance(year, bool) or not isinstance(year, int) or not 1900 <= year <= 2100:
        raise where.error("[source]", f"year must be a four-digit integer, got {year!r}")
    return Source(authors=table["authors"], year=year, title=table["title"], where=table["where"])


def _parse_experiment(where: _Where, table: dict[str, Any]) -> Experiment:
    context = "[experiment]"
    _check_keys(where, context, table, required=_EXPERIMENT_REQUIRED, optional=_EXPERIMENT_OPTIONAL)

    strategies = _expect_name_list(where, context, "strategies", table["strategies"], tuple(STRATEGIES))
    depths = _expect_int_list(where, context, "depths", table["depths"], minimum=1)
    seeds = _expect_int_list(where, context, "seeds", table["seeds"], minimum=0)
    width = _expect_int(where, context, "width", table["width"], minimum=1)
    heads = _expect_int(where, context, "heads", table["heads"], minimum=1)
    steps = _expect_int(where, context, "steps", table["steps"], minimum=0)
    batch_size = _expect_int(where, context, "batch_size", table["batch_size"], minimum=1)
    seq_len = _expect_int(where, context, "seq_len", table["seq_len"], minimum=1)
    warmup = _expect_int(where, context, "warmup", table.get("warmup", 0), minimum=0)
    lr = _expect_number(where, context, "lr", table["lr"])
    if not lr > 0:
        raise where.error(context, f"lr must be a positive number, got {lr!r}")
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
    )


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
        reduced["steps"] = _expect_int(where, context, "steps", table["steps"], minimum=0)
        if (reduced["steps"] == 0) != (experiment.steps == 0):
            raise where.error(
                context,
                f"steps {reduced['steps']} and [experiment] steps {experiment.steps} must both be 0 "
                "(at initialization) or both be positive, so the claims mean the same in both grids",
            )
    return reduced


def _parse_claim(
    where: _Where, index: int, raw: Any, experiment: Experiment, reduced: dict[str, Any]
) -> Claim:
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

    strategies = tuple(experiment.strategies)
    strategy = raw["strategy"]
    if strategy not in strategies:
        raise where.error(
            context, f"strategy {strategy!r} is not in [experiment] strategies ({', '.join(strategies)})"
        )
    baseline = raw.get("baseline")
    if baseline is not None and (baseline not in strategies or baseline == strategy):
        raise where.error(
            context,
            f"baseline {baseline!r} must be another strategy of [experiment] strategies ({', '.join(strategies)})",
        )

    at = _parse_at(where, context, raw.get("at", "init"), experiment, reduced)
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
    if reduce in ("last_over_first", "spearman_vs_layer"):
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
    )


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
