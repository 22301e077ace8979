"""Run the command line with `python -m stabiliscope`."""

from stabiliscope.cli import main

main(prog_name="stabiliscope")
