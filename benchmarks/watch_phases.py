"""Time of each part of a watched training step, next to the bare step.

Trains two copies of the reference transformer of `overhead.py` (depth 12,
width 256, batch 8 x 128, AdamW), one bare and one with `watch(every=1)`,
alternating steps in one process. Each part of the watch is wrapped in a
timer, and the script prints the mean time per step of each part next to
the measured difference between the two step times. What the parts do not
cover is the cost of the hook calls themselves.

    python benchmarks/watch_phases.py
    python benchmarks/watch_phases.py --steps 40

The timers add a few microseconds per call, so the parts add up to slightly
more than they cost unwrapped.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict

from overhead import REFERENCE_BATCH_SIZE, REFERENCE_CONFIG, REFERENCE_SEQ_LEN, LanguageModelRun, environment_lines

from stabiliscope.data import load_corpus
from stabiliscope.watch import core

PARTS = {
    "_measure": "activation statistics (sum of squares, min and max, per stream position)",
    "attention_stats": "attention logit max and entropy",
    "_after_backward": "gradient norms, one batch at the end of backward",
    "_before_optimizer_step": "weight copies and weight norms before the optimizer step",
    "_update_ratios": "weight change norms after the optimizer step",
    "step": "step(): loss, interval extremes, spike scores, packing and the host copy",
}
"""Timed parts, by the name of the function wrapped."""

SECONDS: dict[str, float] = defaultdict(float)


def _timed(function, name: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - start

    return wrapper


def instrument() -> None:
    """Wrap each part of `PARTS` in a timer that adds to `SECONDS`."""
    for name in PARTS:
        if name == "attention_stats":
            core.stats.attention_stats = _timed(core.stats.attention_stats, name)
        else:
            setattr(core.Watch, name, _timed(getattr(core.Watch, name), name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first (default 3)")
    args = parser.parse_args()

    instrument()
    tokens = load_corpus().train
    bare = LanguageModelRun(REFERENCE_CONFIG, tokens, REFERENCE_BATCH_SIZE, REFERENCE_SEQ_LEN)
    watched = LanguageModelRun(REFERENCE_CONFIG, tokens, REFERENCE_BATCH_SIZE, REFERENCE_SEQ_LEN)
    watcher = core.Watch(watched.model, watched.optimizer, every=1, keep_records=False).attach()

    for _ in range(args.warmup):
        bare.step()
        watched.step(after_backward=watcher.step)
    SECONDS.clear()

    bare_s = watched_s = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        bare.step()
        bare_s += time.perf_counter() - start
        start = time.perf_counter()
        watched.step(after_backward=watcher.step)
        watched_s += time.perf_counter() - start
    watcher.close()

    per_step = 1e3 / args.steps
    difference = (watched_s - bare_s) * per_step
    print("\n".join(environment_lines()))
    print(f"bare {bare_s * per_step:.1f} ms per step, watched {watched_s * per_step:.1f} ms, difference {difference:.1f} ms")
    print("| part | ms per step |")
    print("| --- | ---: |")
    for name, description in sorted(PARTS.items(), key=lambda item: -SECONDS[item[0]]):
        print(f"| {description} | {SECONDS[name] * per_step:.1f} |")
    covered = sum(SECONDS.values()) * per_step
    print(f"| not covered by the parts (hook calls) | {difference - covered:.1f} |")


if __name__ == "__main__":
    main()
