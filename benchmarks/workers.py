"""Wall time of the default sweep with `--workers 1` and `--workers 2`, side by side.

Runs `stabiliscope sweep` with every grid option at its default, once per
worker count and round, each into a fresh temporary folder, alternating the
order between rounds. It prints each time, the machine and library versions,
and the speed-up (the `--workers 1` time over the `--workers 2` time, median
over rounds), in the form recorded in docs/benchmarks.md.

    python benchmarks/workers.py                 # 1 round: about 5 minutes on 2 cores
    python benchmarks/workers.py --rounds 3
    python benchmarks/workers.py --quick         # a 4-run grid of tiny models, to try the script

`--workers 1` trains in one process with torch's default thread count;
`--workers 2` trains two runs at once with one thread each. Run it on an idle
machine: other processes on the cores change both times, and not by the same
factor.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The sweeps import stabiliscope from this checkout, not from an installed copy.
SOURCE_ROOT = Path(__file__).resolve().parents[1]

QUICK_GRID = [
    "--norms",
    "pre,post",
    "--depths",
    "2,4",
    "--width",
    "32",
    "--heads",
    "4",
    "--steps",
    "30",
]


def time_sweep(workers: int, grid: list[str]) -> float:
    """Return the wall time in seconds of one sweep with `workers`, into a new temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "stabiliscope",
            "sweep",
            *grid,
            "--workers",
            str(workers),
            "--out",
            os.path.join(folder, "sweep"),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="Rounds of one sweep per worker count (default 1).")
    parser.add_argument("--quick", action="store_true", help="Time a 4-run grid of tiny models instead.")
    options = parser.parse_args()
    if options.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {options.rounds}")

    grid = QUICK_GRID if options.quick else []
    times: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(options.rounds):
        # Alternate the order, so neither count always runs on a warmer or busier machine.
        order = (1, 2) if round_index % 2 == 0 else (2, 1)
        for workers in order:
            elapsed = time_sweep(workers, grid)
            times[workers].append(elapsed)
            print(f"round {round_index + 1}: --workers {workers}: {elapsed:.1f} s", flush=True)

    ratios = [serial / parallel for serial, parallel in zip(times[1], times[2])]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, default threads {torch.get_num_threads()}")
    grid_name = "quick grid (4 runs)" if options.quick else "default sweep (12 runs)"
    print(f"{grid_name}: --workers 1 {statistics.median(times[1]):.1f} s, --workers 2 {statistics.median(times[2]):.1f} s")
    print(f"speed-up of --workers 2: {statistics.median(ratios):.2f}x (median of {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
