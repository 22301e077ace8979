"""Step-time overhead of stabiliscope's watch next to bare training and other tools.

Each variant trains its own copy of one model, with identical initial weights
and its own optimizer, in the same plain loop (forward, backward, optimizer
step), plus one kind of instrumentation. A variant's hooks stay attached for
the whole measurement, but only to its own model, so they never run while
another variant is timed. The variants are timed in interleaved rounds in one
process: every round runs each variant for the same number of steps, so
machine noise falls on all variants alike. A variant's ratio is its
step time divided by bare's step time in the same round. The table gives the
median of that ratio over rounds, a 95 % confidence interval of the median
and its min-max. Each model also has a second bare copy as a control: its
ratio would be 1 without noise, so its interval shows how finely the
measurement resolves a ratio.

Two models are measured:

- reference: the reference transformer (depth 12, width 256) on the built-in
  corpus with AdamW. Variants: bare, its control, stabiliscope every=1,
  every=1 with update_every=10 and every=10, wandb.watch(log="all",
  log_freq=1) and hand-written hooks.
- mlp: a 784-256-256-10 ReLU MLP on random data with SGD and cross-entropy,
  a model that Cockpit supports. Variants: bare, its control, Cockpit's
  "economy" configuration and stabiliscope every=1 with a user mapping.

    python benchmarks/overhead.py
    python benchmarks/overhead.py --only mlp --rounds 5
    python benchmarks/overhead.py --quick

wandb and Cockpit come with `pip install -e ".[bench]"`. A tool that is not
installed is skipped with a note. wandb runs offline, and everything the run
writes goes into a temporary folder that is removed at exit. torch keeps its
default thread count, which the output prints with the machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# wandb reads its mode when it is imported, so set it before any import of it.
os.environ["WANDB_MODE"] = "offline"

import torch
from torch import nn

import stabiliscope
from stabiliscope.data import load_corpus, sample_batch
from stabiliscope.models import ModelConfig, build_model

SEED = 0

# Batch 8 x 128 tokens. On 2 cores of an AMD EPYC with torch 2.13 CPU, a bare
# step on batch 4 x 128 took about 0.3 s while the machine was quiet. This
# batch has twice the tokens, so a step takes an estimated 0.6 s there.
# Most hook costs grow with the parameters rather than the batch, so a
# shorter step shows a larger ratio. --batch-size and --seq-len change it.
REFERENCE_CONFIG = ModelConfig(depth=12, width=256, heads=4, strategy="pre")
REFERENCE_BATCH_SIZE = 8
REFERENCE_SEQ_LEN = 128
ADAMW_LR = 1e-3

MLP_SIZES = (784, 256, 256, 10)
MLP_BATCH_SIZE = 128
# The random batches are drawn once and reused in turn, so that data
# generation costs nothing inside the timed steps.
MLP_BATCH_POOL = 8
# Cockpit's Alpha quantity supports only SGD without momentum or weight decay.
SGD_LR = 0.01

QUICK_REFERENCE_CONFIG = ModelConfig(depth=2, width=64, heads=4, strategy="pre")
QUICK_MLP_SIZES = (784, 32, 32, 10)
QUICK_MLP_BATCH_SIZE = 16

# User mapping for `build_mlp`'s model: each hidden layer is a block, and its
# Linear plays the FFN input role because the watch's roles are those of a
# transformer.
MLP_MAPPING = {
    "name": "benchmark MLP",
    "blocks": "hidden",
    "roles": {"mlp.in": [r"^linear\.(weight|bias)$"]},
    "mlp_out": ["linear"],
}

STABILISCOPE_RECORDS = (
    "every step: loss, total, per-block and per-role gradient norms, "
    "activation RMS, abs max and non-finite counts at each stream position, "
    "stream gradient norms, update ratios, spike scores"
)
STABILISCOPE_EVERY_10_RECORDS = (
    "every step: squared norm of each parameter gradient, loss and gradient-norm spike scores; "
    "the full record every 10th step"
)
STABILISCOPE_UPDATE_EVERY_10_RECORDS = "the every=1 record, with update ratios every 10th step only"


@dataclass
class Variant:
    """One kind of instrumentation on its own copy of a model."""

    name: str
    model: str
    records: str
    step: Callable[[], None]
    close: Callable[[], None] = field(default=lambda: None)


# ---------------------------------------------------------------- training runs


class LanguageModelRun:
    """A copy of the reference model with its own AdamW optimizer and batch generator."""

    def __init__(self, config: ModelConfig, tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
        torch.manual_seed(SEED)
        self.model = build_model(config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=ADAMW_LR)
        self.generator = torch.Generator().manual_seed(SEED)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len

    def step(
        self,
        after_backward: Callable[[torch.Tensor], None] | None = None,
        after_step: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Run one training step, calling `after_backward(loss)` and `after_step(loss)` when given."""
        x, y = sample_batch(self.tokens, self.batch_size, self.seq_len, self.generator)
        _, loss = self.model(x, y)
        self.optimizer.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward(loss)
        self.optimizer.step()
        if after_step is not None:
            after_step(loss)


def build_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Build a ReLU MLP out of `nn.Sequential` containers, which BackPACK passes through.

    The hidden layers form the Sequential `hidden`, where `MLP_MAPPING` finds
    them as blocks, and each layer names its parts `linear` and `activation`.
    """
    layers = [
        nn.Sequential(OrderedDict(linear=nn.Linear(inputs, outputs), activation=nn.ReLU()))
        for inputs, outputs in zip(sizes[:-2], sizes[1:-1])
    ]
    return nn.Sequential(OrderedDict(hidden=nn.Sequential(*layers), head=nn.Linear(sizes[-2], sizes[-1])))


class MLPRun:
    """A copy of the MLP with its own SGD optimizer, cycling through a fixed pool of random batches."""

    def __init__(self, sizes: tuple[int, ...], batch_size: int) -> None:
        torch.manual_seed(SEED)
        self.model = build_mlp(sizes)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=SGD_LR)
        self.loss_fn = nn.CrossEntropyLoss(reduction="mean")
        generator = torch.Generator().manual_seed(SEED)
        self.batches = [
            (
                torch.randn(batch_size, sizes[0], generator=generator),
                torch.randint(sizes[-1], (batch_size,), generator=generator),
            )
            for _ in range(MLP_BATCH_POOL)
        ]
        self.steps_done = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[self.steps_done % len(self.batches)]
        self.steps_done += 1
        return batch

    def step(self, after_backward: Callable[[torch.Tensor], None] | None = None) -> None:
        """Run one training step, calling `after_backward(loss)` when given."""
        inputs, labels = self.next_batch()
        loss = self.loss_fn(self.model(inputs), labels)
        self.optimizer.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward(loss)
        self.optimizer.step()


# ------------------------------------------------------------------- variants


def stabiliscope_variant(run: LanguageModelRun | MLPRun, label: str, every: int, records: str, **options) -> Variant:
    """Attach a stabiliscope watch with in-memory records and no sinks."""
    watcher = stabiliscope.watch(run.model, run.optimizer, every=every, keep_records=True, **options)
    name = f"stabiliscope every={every}"
    if "update_every" in options:
        name += f", update_every={options['update_every']}"
    return Variant(name, label, records, lambda: run.step(after_backward=watcher.step), watcher.close)


def control_variant(run: LanguageModelRun | MLPRun, label: str) -> Variant:
    """Return a second bare copy, whose ratio to bare shows how finely the measurement resolves a ratio."""
    return Variant("bare, second copy", label, "nothing (measurement control)", run.step)


def hand_written_variant(run: LanguageModelRun, label: str) -> Variant:
    """Attach the hooks people often write: block output RMS and per-tensor gradient norms, each read with `.item()`."""
    activation_rms: dict[str, float] = {}
    history: list[dict] = []
    handles = []
    for index, block in enumerate(run.model.blocks):

        def store_rms(module, args, output, name=f"blocks.{index}"):
            activation_rms[name] = output.pow(2).mean().sqrt().item()

        handles.append(block.register_forward_hook(store_rms))

    def read_gradients(loss: torch.Tensor) -> None:
        grad_norms = {}
        for name, param in run.model.named_parameters():
            grad_norms[name] = param.grad.norm().item()
        history.append({"loss": loss.item(), "activation_rms": dict(activation_rms), "grad_norm": grad_norms})

    def remove_hooks() -> None:
        for handle in handles:
            handle.remove()

    records = "RMS of each block output and L2 norm of each parameter gradient, one .item() per value"
    return Variant("hand-written hooks", label, records, lambda: run.step(after_backward=read_gradients), remove_hooks)


def wandb_variant(run: LanguageModelRun, label: str, folder: str) -> Variant:
    """Start an offline wandb run in `folder` and watch the model with histograms of everything, every step."""
    import wandb

    wandb.init(
        mode="offline",
        dir=folder,
        project="stabiliscope-overhead",
        settings=wandb.Settings(console="off", silent=True),
    )
    wandb.watch(run.model, log="all", log_freq=1)
    # NOTE: wandb's service process writes the logged rows in the background,
    # so part of its work may fall into the next variant's timed steps.

    # wandb.watch's hooks only stage their histograms, and wandb.log writes
    # them out with the step's row, so the loop has to call it every step.
    def log_loss(loss: torch.Tensor) -> None:
        wandb.log({"loss": loss.item()})

    def finish() -> None:
        wandb.unwatch(run.model)
        wandb.finish()

    records = "64-bin histograms of every parameter and every parameter gradient, and the loss"
    return Variant('wandb.watch log="all"', label, records, lambda: run.step(after_step=log_loss), finish)


def import_cockpit() -> types.ModuleType:
    """Import and return the `cockpit` package. Raises ImportError when it is not installed.

    cockpit-for-pytorch 1.0.2 imports `pkg_resources` only to read its own
    version, and setuptools 84.2.1 no longer provides that module. When it is
    missing, a stand-in backed by importlib.metadata serves that one import
    and is removed again.
    """
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        pass
    else:
        return importlib.import_module("cockpit")

    stand_in = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name: str) -> types.SimpleNamespace:
        try:
            return types.SimpleNamespace(version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            raise DistributionNotFound(name) from None

    stand_in.DistributionNotFound = DistributionNotFound
    stand_in.get_distribution = get_distribution
    sys.modules["pkg_resources"] = stand_in
    try:
        return importlib.import_module("cockpit")
    finally:
        del sys.modules["pkg_resources"]


def cockpit_variant(run: MLPRun, label: str) -> Variant:
    """Track Cockpit's "economy" quantities: backward runs inside the tracker's context, with the losses in `info`."""
    cockpit = import_cockpit()
    from backpack import extend
    from cockpit.utils.configuration import configuration

    extend(run.model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
    individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
    tracker = cockpit.Cockpit(run.model.parameters(), quantities=configuration("economy"))

    def step() -> None:
        global_step = run.steps_done
        inputs, labels = run.next_batch()
        outputs = run.model(inputs)
        loss = loss_fn(outputs, labels)
        losses = individual_loss_fn(outputs, labels)
        run.optimizer.zero_grad()
        info = {
            "batch_size": inputs.shape[0],
            "individual_losses": losses,
            "loss": loss,
            "optimizer": run.optimizer,
        }
        with tracker(global_step, info=info):
            loss.backward(create_graph=tracker.create_graph(global_step))
        run.optimizer.step()

    records = (
        "Alpha, Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize "
        "(per-sample gradients from BackPACK)"
    )
    return Variant('Cockpit "economy"', label, records, step)


def missing_tool_note(variant: str, module: str, package: str) -> str | None:
    """Return a skip note when `module` cannot be found, else None."""
    if importlib.util.find_spec(module) is None:
        return f"skipped {variant}: {package} is not installed (pip install {package})"
    return None


def add_reference_variants(variants: list[Variant], args: argparse.Namespace, folder: str, notes: list[str]) -> None:
    config = QUICK_REFERENCE_CONFIG if args.quick else REFERENCE_CONFIG
    tokens = load_corpus().train
    label = f"transformer {config.depth}x{config.width}"

    def new_run() -> LanguageModelRun:
        return LanguageModelRun(config, tokens, args.batch_size, args.seq_len)

    bare = new_run()
    variants.append(Variant("bare", label, "nothing", bare.step))
    variants.append(control_variant(new_run(), label))
    records = STABILISCOPE_RECORDS + ", attention logit max and entropy"
    variants.append(stabiliscope_variant(new_run(), label, 1, records))
    variants.append(
        stabiliscope_variant(new_run(), label, 1, STABILISCOPE_UPDATE_EVERY_10_RECORDS, update_every=10)
    )
    variants.append(stabiliscope_variant(new_run(), label, 10, STABILISCOPE_EVERY_10_RECORDS))
    note = missing_tool_note('wandb.watch log="all"', "wandb", "wandb")
    if note is None:
        variants.append(wandb_variant(new_run(), label, folder))
    else:
        notes.append(note)
    variants.append(hand_written_variant(new_run(), label))

    parameters = sum(p.numel() for p in bare.model.parameters())
    notes.insert(
        0,
        f"{label}: {config.heads} heads, {config.strategy}-norm, {parameters / 1e6:.2f} M parameters, "
        f"batch {args.batch_size} x {args.seq_len} tokens of the built-in corpus, AdamW (lr {ADAMW_LR})",
    )


def add_mlp_variants(variants: list[Variant], args: argparse.Namespace, notes: list[str]) -> None:
    sizes = QUICK_MLP_SIZES if args.quick else MLP_SIZES
    batch_size = QUICK_MLP_BATCH_SIZE if args.quick else MLP_BATCH_SIZE
    label = "MLP " + "-".join(str(size) for size in sizes)

    bare = MLPRun(sizes, batch_size)
    variants.append(Variant("bare", label, "nothing", bare.step))
    variants.append(control_variant(MLPRun(sizes, batch_size), label))
    note = missing_tool_note('Cockpit "economy"', "cockpit", "cockpit-for-pytorch")
    if note is None:
        variants.append(cockpit_variant(MLPRun(sizes, batch_size), label))
    else:
        notes.append(note)
    variants.append(
        stabiliscope_variant(MLPRun(sizes, batch_size), label, 1, STABILISCOPE_RECORDS, mapping=MLP_MAPPING)
    )

    notes.append(
        f"{label}: ReLU, batch {batch_size} of random inputs ({MLP_BATCH_POOL} batches reused in turn), "
        f"cross-entropy, SGD (lr {SGD_LR}); stabiliscope maps the hidden layers with a user mapping "
        "(blocks 'hidden', role mlp.in)"
    )


# --------------------------------------------------------------------- timing


def time_rounds(variants: list[Variant], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Time `variants` in interleaved rounds and return the seconds per step of each round, by variant name.

    Each variant first runs `warmup` untimed steps. A round then runs each
    variant for `steps` timed steps. The order rotates by one each round, so
    no variant always runs right after the same other one.
    """
    for variant in variants:
        for _ in range(warmup):
            variant.step()

    seconds_per_step: dict[str, list[float]] = {variant.name: [] for variant in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            for _ in range(steps):
                variant.step()
            seconds_per_step[variant.name].append((time.perf_counter() - start) / steps)
        summary = ", ".join(f"{name} {times[-1] * 1e3:.1f}" for name, times in seconds_per_step.items())
        print(f"round {round_index + 1}/{rounds} (ms per step): {summary}", file=sys.stderr, flush=True)
    return seconds_per_step


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Return a distribution-free confidence interval of the median of `values`.

    The interval runs from the k-th smallest to the k-th largest value, with
    the largest k whose coverage, from the binomial distribution with p = 1/2,
    is at least `confidence` (the order-statistic interval of the median).
    With too few values for that coverage, it spans the min and the max.
    """
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    below = 0.0  # P(fewer than k values fall below the median)
    k = 0
    while k < n // 2:
        below_next = below + math.comb(n, k) / 2**n
        if below_next > tail:
            break
        below = below_next
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


MIN_ROUNDS_FOR_INTERVAL = 6
"""Fewest rounds for which `median_interval` reaches 95 % coverage.

With 6 rounds, the interval from the smallest to the largest ratio covers 1 - 2/64 = 96.9 %.
"""


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def table_rows(variants: list[Variant], seconds_per_step: dict[str, list[float]]) -> list[str]:
    """Format one Markdown table row per variant, with ratios to bare taken round by round."""
    bare = seconds_per_step["bare"]
    rows = []
    for variant in variants:
        times = seconds_per_step[variant.name]
        ratios = [seconds / bare_seconds for seconds, bare_seconds in zip(times, bare)]
        low, high = median_interval(ratios)
        rows.append(
            f"| {variant.name} | {variant.model} | {statistics.median(times) * 1e3:.1f} "
            f"| {statistics.median(ratios):.3f} | {low:.3f}-{high:.3f} | {min(ratios):.2f}-{max(ratios):.2f} "
            f"| {variant.records} |"
        )
    return rows


# ----------------------------------------------------------------- reporting


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo on Linux, else what `platform` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_lines() -> list[str]:
    tools = ", ".join(
        f"{name} {package_version(name)}" for name in ("wandb", "cockpit-for-pytorch", "backpack-for-pytorch")
    )
    return [
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()} "
        f"({platform.machine()})",
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"stabiliscope {stabiliscope.__version__}, {tools}",
        f"command: {shlex.join(['python', *sys.argv])}",
    ]


def route_tool_files(folder: str) -> None:
    """Point the folders that wandb and matplotlib (imported by Cockpit) write to into `folder`."""
    for variable in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[variable] = os.path.join(folder, "wandb")
    os.environ["MPLCONFIGDIR"] = os.path.join(folder, "matplotlib")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 20, 2 with --quick)")
    parser.add_argument(
        "--steps-per-round",
        type=int,
        help="timed steps of each variant per round (default 10, 2 with --quick). With a multiple of 10, "
        "every round of stabiliscope every=10 contains the same number of full records",
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed steps of each variant before the first round (default 3, 1 with --quick)"
    )
    parser.add_argument("--only", choices=("reference", "mlp"), help="measure only this model")
    parser.add_argument(
        "--batch-size", type=int, help=f"reference model batch size (default {REFERENCE_BATCH_SIZE}, 2 with --quick)"
    )
    parser.add_argument(
        "--seq-len", type=int, help=f"reference model sequence length (default {REFERENCE_SEQ_LEN}, 32 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps, for a smoke run")
    args = parser.parse_args()

    defaults = {
        "rounds": 20,
        "steps_per_round": 10,
        "warmup": 3,
        "batch_size": REFERENCE_BATCH_SIZE,
        "seq_len": REFERENCE_SEQ_LEN,
    }
    if args.quick:
        defaults = {"rounds": 2, "steps_per_round": 2, "warmup": 1, "batch_size": 2, "seq_len": 32}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("rounds", "steps_per_round", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.seq_len > REFERENCE_CONFIG.max_seq_len:
        parser.error(
            f"--seq-len must be at most {REFERENCE_CONFIG.max_seq_len}, the length of the reference model's "
            f"rotary table, got {args.seq_len}"
        )
    return args


def main() -> None:
    args = parse_args()
    rows: list[str] = []
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="stabiliscope-overhead-") as folder:
        route_tool_files(folder)
        builders = []
        if args.only in (None, "reference"):
            builders.append(lambda variants: add_reference_variants(variants, args, folder, notes))
        if args.only in (None, "mlp"):
            builders.append(lambda variants: add_mlp_variants(variants, args, notes))

        # One model at a time, so that its hooks and the wandb run are gone
        # before the next model is timed.
        for add_variants in builders:
            variants: list[Variant] = []
            try:
                add_variants(variants)
                seconds_per_step = time_rounds(variants, args.rounds, args.steps_per_round, args.warmup)
            finally:
                for variant in variants:
                    variant.close()
            rows.extend(table_rows(variants, seconds_per_step))

    print(
        "| variant | model | ms per step (median) | ratio to bare (median) | 95 % interval of the median "
        "| ratio min-max | records per step |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print()
    print(
        f"{plural(args.rounds, 'round')} of {plural(args.steps_per_round, 'timed step')} per variant, after "
        f"{plural(args.warmup, 'untimed warm-up step')} per variant; variant order rotated each round; "
        "ratios taken within each round"
    )
    if args.rounds < MIN_ROUNDS_FOR_INTERVAL:
        print(
            f"with fewer than {MIN_ROUNDS_FOR_INTERVAL} rounds the 95 % interval cannot be formed, "
            "so that column gives the min-max instead"
        )
    if args.quick:
        print("--quick measures tiny models for a smoke run: its ratios are not overhead figures")
    for line in notes + environment_lines():
        print(line)


if __name__ == "__main__":
    main()
