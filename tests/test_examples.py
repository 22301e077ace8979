"""The scripts under examples/ run as a user would run them."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_plain_loop_example_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), "--steps", "3", "--depth", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "grad/mlp.out by layer, last step:" in result.stdout
