"""The `stabiliscope` command line: sweeps, reports, dashboards and strategies.

Bad input ends with exit status 2 and one `Error: ...` line that names the
value and what is accepted. Library errors of type ConfigError are shown the
same way, without a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from stabiliscope import __version__
from stabiliscope.errors import ConfigError
from stabiliscope.experiments.folders import check_path_name
from stabiliscope.experiments.shards import Shard, SweepReader, find_store_files, store_filename
from stabiliscope.experiments.summary import (
    flagged_runs,
    missing_runs,
    render_flagged_table,
    render_table,
    summarize,
    to_csv,
    to_json,
)
from stabiliscope.experiments.sweep import TB_FOLDER, SweepConfig, run_sweep
from stabiliscope.experiments.workers import WorkerError
from stabiliscope.models import FFN_TYPES, INITS, NORM_TYPES, STRATEGIES
from stabiliscope.models.strategies import STRATEGY_ALIASES
from stabiliscope.sinks.console import RichSweepReporter
from stabiliscope.sinks.store import STORE_FILENAME
from stabiliscope.sinks.tensorboard import LAYOUT_PAGE, TensorBoardServer
from stabiliscope.train import check_device

# Sweep defaults: the default grid of 12 runs takes about 3 minutes on 2 CPU
# cores (measured in docs/benchmarks.md). Clipping at 1.0 keeps HybridNorm at
# depth 16 from collapsing at this learning rate.
DEFAULT_NORMS = "pre,post,hybrid"
DEFAULT_DEPTHS = "2,4,8,16"
DEFAULT_SEEDS = "0"
DEFAULT_WIDTH = 64
DEFAULT_HEADS = 4
DEFAULT_STEPS = 150
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 64
DEFAULT_LR = 3e-3
DEFAULT_WARMUP = 15
DEFAULT_INIT = "auto"
DEFAULT_NORM_TYPE = "rms"
DEFAULT_FFN = "swiglu"
DEFAULT_OUT = "runs/sweep"
DEFAULT_DEVICE = "cpu"
DEFAULT_GRAD_CLIP = 1.0

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006

NON_TERMINAL_WIDTH = 160
"""Console width in characters when stdout is not a terminal and COLUMNS is unset."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C, following the shell convention 128 + SIGINT."""

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


# Errors


class OneLineUsageError(click.UsageError):
    """A usage error printed as a single `Error: ...` line, without the usage text."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()), ctx=None)

    def show(self, file: Any = None) -> None:
        # Click attaches the command's context to usage errors raised inside
        # it, and UsageError.show would then print the usage text too.
        click.echo(f"Error: {self.format_message()}", file=file, err=True)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, OneLineUsageError):
        raise
    except click.UsageError as error:
        # The message is formatted while the context is still attached,
        # because parameter hints are computed from it.
        raise OneLineUsageError(error.format_message()) from None


class OneLineErrorGroup(click.Group):
    """Click group whose usage errors, including its subcommands', print one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


def config_errors_as_usage(command: F) -> F:
    """Turn a ConfigError raised by `command` into exit status 2 with its message."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as error:
            raise OneLineUsageError(str(error)) from None

    return wrapper  # type: ignore[return-value]


# Parameter types


class IntListType(click.ParamType):
    """Comma-separated integers of at least `minimum`, each listed once."""

    name = "list"

    def __init__(self, minimum: int, kind: str, example: str) -> None:
        self.minimum = minimum
        self.kind = kind
        self.example = example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value

        expected = f"(expected a comma list such as {self.example})"
        numbers: list[int] = []
        for item in str(value).split(","):
            item = item.strip()
            try:
                number = int(item)
            except ValueError:
                number = None
            if number is None or number < self.minimum:
                self.fail(f"{item!r} is not {self.kind} {expected}.", param, ctx)
            if number in numbers:
                self.fail(f"{item!r} is listed more than once {expected}.", param, ctx)
            numbers.append(number)
        return numbers


class StrategyListType(click.ParamType):
    """Comma-separated names of normalization strategies from `STRATEGIES`."""

    name = "list"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value

        known = ", ".join(STRATEGIES)
        names: list[str] = []
        for item in str(value).split(","):
            item = STRATEGY_ALIASES.get(item.strip(), item.strip())
            if item not in STRATEGIES:
                self.fail(f"{item!r} is not a known norm strategy (known: {known}).", param, ctx)
            if item in names:
                self.fail(f"{item!r} is listed more than once (known: {known}).", param, ctx)
            names.append(item)
        return names


class ShardType(click.ParamType):
    """`K/N`: part K of N of a sweep grid, with 1 <= K <= N."""

    name = "K/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Shard:
        if isinstance(value, Shard):
            return value
        try:
            return Shard.parse(str(value))
        except ConfigError as error:
            self.fail(str(error), param, ctx)


def _validate_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        check_device(value)
    except ConfigError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return value


# Output helpers


def _console(*, stderr: bool = False) -> Console:
    # Created per command, so that output follows the current sys.stdout
    # (click's test runner swaps it for each invocation).
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Rich assumes 80 columns when the output is a file or a pipe, which
        # would squeeze the summary table. A file has no width limit.
        console = Console(stderr=stderr, width=NON_TERMINAL_WIDTH)
    return console


def _configure_logging(verbosity: int) -> None:
    if verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1:
        level = logging.INFO
    else:
        level = logging.WARNING

    package_logger = logging.getLogger("stabiliscope")
    for handler in list(package_logger.handlers):
        if getattr(handler, "_stabiliscope_cli", False):
            package_logger.removeHandler(handler)

    handler = RichHandler(console=Console(stderr=True), show_path=False)
    handler._stabiliscope_cli = True  # type: ignore[attr-defined]
    package_logger.addHandler(handler)
    package_logger.setLevel(level)


def _open_existing_store(sweep_dir: Path) -> SweepReader:
    """Open every run store of `sweep_dir` (`store.sqlite` and the shards' stores) as one, read-only."""
    if not find_store_files(sweep_dir):
        raise OneLineUsageError(
            f"{str(sweep_dir)!r} contains no run store ({STORE_FILENAME}); "
            "pass a folder written by 'stabiliscope sweep'"
        )
    return SweepReader.open(sweep_dir)


# Commands


@click.group(cls=OneLineErrorGroup, name="stabiliscope")
@click.version_option(__version__, prog_name="stabiliscope")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log progress messages to stderr; repeat (-vv) for debug messages and tracebacks.",
)
def main(verbose: int) -> None:
    """Diagnose training stability across depth for normalization placements."""
    _configure_logging(verbose)


@main.command()
@click.option(
    "--norms",
    type=StrategyListType(),
    default=DEFAULT_NORMS,
    show_default=True,
    help="Comma list of normalization strategies to compare (see 'stabiliscope norms').",
)
@click.option(
    "--depths",
    type=IntListType(1, "a positive integer", "2,4,8"),
    default=DEFAULT_DEPTHS,
    show_default=True,
    help="Comma list of model depths, in transformer blocks.",
)
@click.option(
    "--width",
    type=click.IntRange(min=1),
    default=DEFAULT_WIDTH,
    show_default=True,
    help="Model width (d_model), in features per token; must be a multiple of --heads.",
)
@click.option(
    "--heads",
    type=click.IntRange(min=1),
    default=DEFAULT_HEADS,
    show_default=True,
    help="Number of attention heads per block.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=DEFAULT_STEPS,
    show_default=True,
    help="Training length of each run, in optimizer steps.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Batch size, in sequences per optimizer step.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=DEFAULT_SEQ_LEN,
    show_default=True,
    help="Sequence length, in tokens (bytes of text).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_LR,
    show_default=True,
    help="Peak AdamW learning rate, reached at the end of warmup.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=DEFAULT_WARMUP,
    show_default=True,
    help="Linear learning-rate warmup, in optimizer steps.",
)
@click.option(
    "--seeds",
    type=IntListType(0, "a non-negative integer", "0,1,2"),
    default=DEFAULT_SEEDS,
    show_default=True,
    help="Comma list of random seeds; each point of the grid trains once per seed.",
)
@click.option(
    "--init",
    type=click.Choice(("auto", *INITS)),
    default=DEFAULT_INIT,
    show_default=True,
    help="Weight initialization scheme; auto takes each strategy's default "
    "(deepnet for deepnorm, megatron for the others).",
)
@click.option(
    "--norm-type",
    type=click.Choice(NORM_TYPES),
    default=DEFAULT_NORM_TYPE,
    show_default=True,
    help="Norm used by every strategy: RMSNorm (rms) or LayerNorm (layer).",
)
@click.option(
    "--ffn",
    type=click.Choice(FFN_TYPES),
    default=DEFAULT_FFN,
    show_default=True,
    help="Feed-forward sublayer type.",
)
@click.option(
    "--grad-clip",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRAD_CLIP,
    show_default=True,
    help="Max global gradient norm (L2 over all parameters) for clipping; 0 turns clipping off.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Text file, folder of text files or nanoGPT .bin token file; "
    "default: the built-in corpus (CPython's pydoc topics).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUT,
    show_default=True,
    help="Sweep folder for the run store and TensorBoard logs; "
    "rerunning into it skips finished runs.",
)
@click.option(
    "--device",
    default=DEFAULT_DEVICE,
    show_default=True,
    callback=_validate_device,
    help="Torch device to train on: cpu, cuda or cuda:N.",
)
@click.option(
    "--name",
    default=None,
    help="Name of the sweep: its folder becomes OUT/NAME. A plain name, without path separators.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at once, each in its own process; they share the run store.",
)
@click.option(
    "--threads-per-worker",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op threads of each run; default: 1 with --workers above 1, else torch's default.",
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    help="Train only part K of N of the grid (K from 1 to N), into its own store file "
    "store-K-of-N.sqlite; for example $SLURM_ARRAY_TASK_ID/4 in a Slurm job array --array=1-4.",
)
@config_errors_as_usage
def sweep(
    norms: list[str],
    depths: list[int],
    width: int,
    heads: int,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    seeds: list[int],
    init: str,
    norm_type: str,
    ffn: str,
    grad_clip: float | None,
    data: Path | None,
    out: Path,
    device: str,
    name: str | None,
    workers: int,
    threads_per_worker: int | None,
    shard: Shard | None,
) -> None:
    """Train every (depth, strategy, seed) run and summarize the depth profiles.

    Runs go in this order: for each depth, for each strategy, for each seed.
    """
    if name is not None:
        out = out / check_path_name("--name", name)
    config = SweepConfig(
        norms=norms,
        depths=depths,
        width=width,
        heads=heads,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        seeds=seeds,
        init=init,
        data=data,
        out=out,
        device=device,
        norm=norm_type,
        ffn=ffn,
        grad_clip=grad_clip or None,
    )
    config.validate()

    console = _console()
    # SIGTERM (a batch scheduler's time limit, `kill`) stops the sweep like Ctrl-C.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt_on_signal)
    try:
        with RichSweepReporter(console) as reporter:
            outcomes = run_sweep(
                config, reporter, workers=workers, threads_per_worker=threads_per_worker, shard=shard
            )
    except KeyboardInterrupt:
        console.print("Interrupted. Repeat the command to train the unfinished runs.")
        sys.exit(EXIT_INTERRUPTED)
    except WorkerError as error:
        raise click.ClickException(str(error)) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    with SweepReader.open(out) as reader:
        rows = summarize(reader)
        flagged = flagged_runs(reader)
    console.print(render_table(rows))
    if flagged:
        console.print(render_flagged_table(flagged))

    console.print(f"Run store: {out / store_filename(shard)}")
    console.print(f"TensorBoard logs: {out / TB_FOLDER}")
    console.print(f"Dashboard: stabiliscope dashboard {out}")

    failed = [outcome.run_id for outcome in outcomes if outcome.status == "failed"]
    if failed:
        raise click.ClickException(
            f"{len(failed)} run(s) failed: {', '.join(failed)}. "
            "Rerun the same command to retry them; add -vv to see their tracebacks."
        )


@main.command()
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format: a rich table, a JSON list with full per-layer profiles, or CSV.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw depth profiles (at initialization and at the end) and layer-by-step "
    "heatmaps into this .png or .pdf file; needs matplotlib (the plot extra).",
)
@config_errors_as_usage
def report(sweep_dir: Path, output_format: str, plot_path: Path | None) -> None:
    """Print the summary of the sweep in SWEEP_DIR from its run store."""
    if plot_path is not None:
        from stabiliscope import figures

        figures.check_plot_path(plot_path)
        try:
            figures.require_matplotlib()
        except figures.MatplotlibMissingError as error:
            raise OneLineUsageError(str(error)) from None

    with _open_existing_store(sweep_dir) as store:
        rows = summarize(store)
        flagged = flagged_runs(store)
        missing = missing_runs(store)
        if plot_path is not None:
            figures.write_sweep_figure(store, plot_path)
            _console(stderr=True).print(f"Figures: {plot_path}")

    console = _console()
    if output_format == "json":
        console.out(to_json(rows), highlight=False)
    elif output_format == "csv":
        console.out(to_csv(rows), highlight=False, end="")
    elif rows:
        console.print(render_table(rows))
        if flagged:
            console.print(render_flagged_table(flagged))
    else:
        console.print(f"No runs recorded in {sweep_dir} yet.")
    if missing:
        # On stderr, so that the JSON and CSV output stays machine-readable.
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        _console(stderr=True).print(
            f"Not recorded yet: {len(missing)} run{'s' if len(missing) > 1 else ''} of the sweep's grid "
            f"({listed}). A shard that was never started, or a sweep that stopped early, leaves runs "
            "out. Rerun it with the same --out (and --shard) to train them.",
            highlight=False,
            soft_wrap=True,
        )


def _interrupt_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@main.command()
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Network interface the TensorBoard server listens on; "
    "anything other than 127.0.0.1 makes it reachable from other machines.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port of the TensorBoard server.",
)
def dashboard(sweep_dir: Path, host: str, port: int) -> None:
    """Serve the TensorBoard logs of SWEEP_DIR until Ctrl-C."""
    tb_dir = sweep_dir / TB_FOLDER
    if not tb_dir.is_dir():
        raise OneLineUsageError(
            f"{str(sweep_dir)!r} contains no TensorBoard folder ({TB_FOLDER}/); "
            "pass a folder written by 'stabiliscope sweep'"
        )

    console = _console()
    if host != DEFAULT_HOST:
        _console(stderr=True).print(
            f"[yellow]Warning:[/] TensorBoard listens on {host}, not {DEFAULT_HOST}; unless that is "
            "a loopback address, the dashboard (which has no login) is reachable from other machines.",
            highlight=False,
            soft_wrap=True,
        )

    server = TensorBoardServer(tb_dir, host=host, port=port)
    # SIGTERM (from `kill` or a process manager) stops the child like Ctrl-C,
    # instead of ending this process and leaving TensorBoard running. The
    # handler is in place before the child starts, so no signal falls between.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt_on_signal)
    try:
        try:
            server.start()
        except RuntimeError as error:
            raise click.ClickException(str(error)) from None
        console.print(f"TensorBoard serves {tb_dir} at {server.url} (Ctrl-C to stop)")
        console.print(f"Depth profiles and layouts: {server.url}{LAYOUT_PAGE}")
        returncode = server.wait()
    except KeyboardInterrupt:
        console.print("Stopping TensorBoard.")
        return
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous_handler)
    raise click.ClickException(f"TensorBoard exited on its own with status {returncode}")


@main.command()
def norms() -> None:
    """List the normalization strategies and their block equations."""
    table = Table(title="Normalization strategies")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("block equation (x: block input, N: norm, A: attention, F: FFN)")
    table.add_column("description")
    for strategy in STRATEGIES.values():
        table.add_row(strategy.name, strategy.equation, strategy.description)
    _console().print(table)


# Model inspection

INSPECT_BUILT_IN = ("reference", "hf-llama", "hf-gpt2")
INSPECT_TARGETS = INSPECT_BUILT_IN + ("python:MODULE:FACTORY",)
INSPECT_VOCAB_SIZE = 256  # byte-level, like the reference model
INSPECT_MAX_POSITIONS = 256


def _build_hf_model(target: str, depth: int, width: int, heads: int) -> Any:
    """Build a tiny, randomly initialized Hugging Face model from a config; nothing is downloaded."""
    try:
        import transformers
    except ImportError:
        raise OneLineUsageError(
            f"model {target!r} needs the transformers package, which is not installed; "
            "install it with: pip install transformers"
        ) from None

    if width % heads != 0:
        raise OneLineUsageError(f"--width {width} is not divisible by --heads {heads}")
    if target == "hf-llama":
        config = transformers.LlamaConfig(
            vocab_size=INSPECT_VOCAB_SIZE,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=INSPECT_MAX_POSITIONS,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        vocab_size=INSPECT_VOCAB_SIZE,
        n_embd=width,
        n_layer=depth,
        n_head=heads,
        n_positions=INSPECT_MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _build_from_factory(target: str) -> Any:
    """Import MODULE and call FACTORY() for a `python:MODULE:FACTORY` target."""
    import importlib

    from torch import nn

    module_name, _, factory_name = target.removeprefix("python:").rpartition(":")
    if not module_name or not factory_name:
        raise OneLineUsageError(
            f"model {target!r} is invalid; expected python:MODULE:FACTORY, such as python:mymodels:build_model"
        )

    # The console script does not put the working folder on sys.path, but a
    # user's model file usually sits there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise OneLineUsageError(f"cannot import module {module_name!r} of model {target!r}: {error}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise OneLineUsageError(f"module {module_name!r} has no function {factory_name!r} (model {target!r})")

    try:
        model = factory()
    except Exception as error:
        raise click.ClickException(
            f"{module_name}.{factory_name}() raised {type(error).__name__}: {error}"
        ) from None
    if not isinstance(model, nn.Module):
        raise OneLineUsageError(
            f"{module_name}.{factory_name}() returned {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def _reject_options_for(target: str, names: tuple[str, ...], applies_to: str) -> None:
    ctx = click.get_current_context()
    for name in names:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            option = "--" + name.replace("_", "-")
            raise OneLineUsageError(f"{option} applies to {applies_to} only, not to model {target!r}")


def _build_inspect_model(target: str, depth: int, width: int, heads: int, strategy: str | None) -> Any:
    if target == "reference":
        from stabiliscope.models import ModelConfig, build_model

        config = ModelConfig(depth=depth, width=width, heads=heads, strategy=strategy or "pre")
        return build_model(config)
    if target in ("hf-llama", "hf-gpt2"):
        _reject_options_for(target, ("strategy",), "the reference model")
        return _build_hf_model(target, depth, width, heads)
    if target.startswith("python:"):
        _reject_options_for(target, ("depth", "width", "heads", "strategy"), "the built-in models")
        return _build_from_factory(target)
    raise OneLineUsageError(f"unknown model {target!r}; expected one of: {', '.join(INSPECT_TARGETS)}")


@main.command(name="inspect")
@click.argument("target")
@click.option(
    "--depth",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Number of transformer blocks of a built-in model.",
)
@click.option(
    "--width",
    type=click.IntRange(min=1),
    default=DEFAULT_WIDTH,
    show_default=True,
    help="Model width (d_model) of a built-in model, in features per token.",
)
@click.option(
    "--heads",
    type=click.IntRange(min=1),
    default=DEFAULT_HEADS,
    show_default=True,
    help="Number of attention heads per block of a built-in model.",
)
@click.option(
    "--strategy",
    type=click.Choice(list(STRATEGIES)),
    default=None,
    help="Normalization strategy of the reference model (see 'stabiliscope norms'); default: pre.",
)
@click.option(
    "--mapping",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON file mapping blocks, hook points and parameter roles, for a model no built-in layout fits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON instead of text.")
@config_errors_as_usage
def inspect_model(
    target: str,
    depth: int,
    width: int,
    heads: int,
    strategy: str | None,
    mapping: Path | None,
    as_json: bool,
) -> None:
    """Show which blocks, hook points and parameter roles the watch finds in a model.

    TARGET is reference (the stabiliscope reference model), hf-llama or
    hf-gpt2 (tiny Hugging Face models built from a config, which need
    transformers), or python:MODULE:FACTORY. The last imports MODULE, also
    searching the working folder, and calls FACTORY() for an nn.Module.
    """
    import json

    from stabiliscope.errors import DiscoveryError
    from stabiliscope.watch.discovery import discover, load_mapping

    model = _build_inspect_model(target, depth, width, heads, strategy)
    layout = load_mapping(mapping) if mapping is not None else None
    try:
        model_map = discover(model, mapping=layout)
    except DiscoveryError as error:
        # Shown in full: the list of the model's module lists is the useful part.
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)

    console = _console()
    if as_json:
        data = {"target": target, "model": type(model).__name__, **model_map.to_dict()}
        console.out(json.dumps(data, indent=2), highlight=False)
    else:
        console.print(f"[bold]{target}[/] ({type(model).__name__})")
        console.print(model_map.describe(), markup=False, highlight=False)


# Probes: published claims checked against runs of the reference model


PROBE_HUGE_BOUND = 1e20
"""Magnitude from which an `expect` end is shown as open (the interval is one-sided)."""


def _format_probe_number(value: float) -> str:
    return f"{value:.3g}"


def _format_expected(low: float, high: float) -> str:
    if high >= PROBE_HUGE_BOUND and low <= -PROBE_HUGE_BOUND:
        return "any value"
    if high >= PROBE_HUGE_BOUND:
        return f">= {_format_probe_number(low)}"
    if low <= -PROBE_HUGE_BOUND:
        return f"<= {_format_probe_number(high)}"
    return f"[{_format_probe_number(low)}, {_format_probe_number(high)}]"


def _format_measured(result: Any) -> str:
    if result.error is not None:
        return f"not measured: {result.error}"
    if result.ci is None:
        return f"{_format_probe_number(result.mean)} (n={result.n})"
    half_width = (result.ci[1] - result.ci[0]) / 2
    return f"{_format_probe_number(result.mean)} ± {_format_probe_number(half_width)} (n={result.n})"


def _render_probe_table(probe_result: Any) -> Table:
    probe = probe_result.probe
    if probe_result.reduced:
        grid = "reduced grid" if probe.reduced else "full grid: the file has no [reduced] table"
    else:
        grid = "full grid"
    table = Table(
        title=escape(f"{probe.path} ({grid}, {probe_result.wall_time_s:.0f} s)\n{probe.source.citation()}"),
        caption="measured: mean over seeds ± half-width of the 95% confidence interval. "
        "A claim passes when the mean lies in the expected interval.",
        show_lines=True,
    )
    table.add_column("claim", style="bold")
    table.add_column("statement", ratio=3)
    table.add_column("strategy")
    table.add_column("quantity", ratio=1)
    table.add_column("measured", ratio=1)
    table.add_column("expected")
    table.add_column("verdict")
    for result in probe_result.claims:
        claim = result.claim
        verdict = "[green]PASS[/]" if result.passed else "[red]FAIL[/]"
        table.add_row(
            claim.id,
            claim.statement,
            # Strategy [variant], or the ratio "subject / baseline".
            escape(claim.describe_subject()),
            escape(claim.describe_quantity()),
            _format_measured(result),
            _format_expected(*claim.expect),
            verdict,
        )
    return table


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--reduced",
    is_flag=True,
    help="Run each file's smaller [reduced] grid (fewer depths, seeds or steps) for a quick check.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of tables.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default="runs/probes",
    show_default=True,
    help="Parent folder of the sweep folders: OUT/<file stem>, or OUT/<file stem>-reduced "
    "with --reduced; rerunning into it skips finished runs.",
)
@click.option(
    "--device",
    default=DEFAULT_DEVICE,
    show_default=True,
    callback=_validate_device,
    help="Torch device to train on: cpu, cuda or cuda:N.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at once, each in its own process with one thread.",
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    help="Only train part K of N of each grid (K from 1 to N) and check no claims; "
    "once every shard has finished, run without --shard to check them.",
)
@config_errors_as_usage
def probe(
    paths: tuple[Path, ...],
    reduced: bool,
    as_json: bool,
    out: Path,
    device: str,
    workers: int,
    shard: Shard | None,
) -> None:
    """Check published claims: train the grid of each probe file and compare claims with measurements.

    PATHS are probe files (TOML) or folders, whose *.toml files are all read.
    Every file is validated before any run trains. The exit status is 1 when
    a claim fails and 2 for invalid input.
    """
    import json

    from stabiliscope.experiments.claims import run_probe
    from stabiliscope.experiments.probes import find_probe_files, load_probe, sweep_configs

    probes = [load_probe(path) for path in find_probe_files(list(paths))]
    for item in probes:
        check_path_name(f"{item.path}: file stem", item.name)
    stems = [item.name for item in probes]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ConfigError(
            f"two probe files share the name {duplicates[0]!r}, so their runs would share "
            "one sweep folder; rename one of them"
        )

    console = _console()
    progress_console = _console(stderr=True)
    results = []
    try:
        for item in probes:
            folder = item.default_out(reduced=reduced, root=out)
            with RichSweepReporter(progress_console) as reporter:
                if shard is not None:
                    # One sweep per variant; measurement kinds train nothing to shard.
                    for config in sweep_configs(item, folder, device, reduced=reduced):
                        run_sweep(config, reporter, workers=workers, shard=shard)
                    continue
                result = run_probe(
                    item, reduced=reduced, out=folder, device=device, reporter=reporter, workers=workers
                )
            results.append(result)
            if not as_json:
                console.print(_render_probe_table(result))
    except KeyboardInterrupt:
        progress_console.print("Interrupted. Repeat the command to train the unfinished runs.")
        sys.exit(EXIT_INTERRUPTED)
    except WorkerError as error:
        raise click.ClickException(str(error)) from None

    if shard is not None:
        console.print(
            f"Trained shard {shard} of {len(probes)} probe grid(s) into {out}. Once every shard "
            "has finished, repeat the command without --shard to check the claims."
        )
        return

    if as_json:
        document = [result.to_dict() for result in results]
        console.out(json.dumps(document, indent=2), highlight=False)
    else:
        passed = sum(1 for result in results for claim in result.claims if claim.passed)
        total = sum(len(result.claims) for result in results)
        console.print(f"{passed} of {total} claims passed.")

    if not all(result.passed for result in results):
        sys.exit(1)
