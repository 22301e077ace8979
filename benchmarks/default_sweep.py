"""Wall time of the default `stabiliscope sweep` on this machine.

Runs the command exactly as the README gives it, into a temporary sweep folder,
and prints the wall time with the machine and library versions, in the form
recorded in docs/benchmarks.md.

    python benchmarks/default_sweep.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "stabiliscope", "sweep", "--out", os.path.join(folder, "sweep")]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"default sweep (12 runs): {wall:.1f} s")


if __name__ == "__main__":
    main()
