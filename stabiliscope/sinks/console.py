"""Rich progress display of a sweep, for the CLI.

Library code never prints: `run_sweep` reports progress to a `SweepReporter`,
and only the CLI passes this rich implementation. The display has one bar for
the sweep (runs done out of the grid size) and one for each run in progress
(steps done, current loss, steps per second and time left); with several
workers, several runs are in progress at once. One line per finished run is
printed above the bars.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from stabiliscope.experiments.sweep import RunOutcome, SweepReporter


class StepRateColumn(ProgressColumn):
    """Steps per second of a run task; blank for the sweep task."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("show_rate") or task.speed is None:
            return Text("")
        return Text(f"{task.speed:.1f} steps/s", style="progress.data.speed")


class RichSweepReporter(SweepReporter):
    """Progress bars for `run_sweep`, drawn on `console`.

    Use it as a context manager so that the live display stops even when the
    sweep raises:

        with RichSweepReporter(console) as reporter:
            run_sweep(config, reporter)
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            StepRateColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._sweep_task: TaskID | None = None
        self._run_task: TaskID | None = None
        self._run_tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichSweepReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def sweep_started(self, total_runs: int, runs_to_train: int) -> None:
        finished_before = total_runs - runs_to_train
        if finished_before:
            self.console.print(
                f"{finished_before} of {total_runs} runs finished in an earlier invocation "
                f"and are skipped; training {runs_to_train}."
            )
        self._sweep_task = self.progress.add_task(
            "sweep", total=total_runs, status="", show_rate=False
        )

    def run_skipped(self, outcome: RunOutcome) -> None:
        self._advance_sweep()

    def run_started(self, run_id: str, steps: int) -> None:
        self._run_task = self.progress.add_task(
            run_id, total=steps, status="loss -", show_rate=True
        )
        self._run_tasks[run_id] = self._run_task

    def run_step(self, step: int, loss: float) -> None:
        if self._run_task is None:
            return
        # `step` counts from 0, so step + 1 steps are done.
        self.progress.update(self._run_task, completed=step + 1, status=f"loss {loss:.4f}")

    def run_progress(self, run_id: str, step: int, loss: float) -> None:
        task = self._run_tasks.get(run_id)
        if task is not None:
            self.progress.update(task, completed=step + 1, status=f"loss {loss:.4f}")

    def run_finished(self, outcome: RunOutcome) -> None:
        task = self._run_tasks.pop(outcome.run_id, None)
        if task is not None:
            self.progress.remove_task(task)
            if task == self._run_task:
                self._run_task = None
        self.console.print(describe_outcome(outcome))
        self._advance_sweep()

    def sweep_finished(self, outcomes: list[RunOutcome]) -> None:
        for task in self._run_tasks.values():
            self.progress.remove_task(task)
        self._run_tasks.clear()
        self._run_task = None

    def _advance_sweep(self) -> None:
        if self._sweep_task is not None:
            self.progress.advance(self._sweep_task)


def describe_outcome(outcome: RunOutcome) -> Text:
    """Return a one-line description of a finished, diverged or failed run."""
    text = Text()
    text.append(outcome.run_id, style="bold")
    if outcome.status == "failed":
        text.append(" failed: ", style="red")
        text.append(outcome.error or "unknown error")
        return text

    if outcome.status == "diverged":
        text.append(f" diverged at step {outcome.diverged_step}", style="yellow")
    else:
        text.append(f" {outcome.status}", style="green")
    text.append(f": train loss {_format_loss(outcome.final_train_loss)}")
    text.append(f", val loss {_format_loss(outcome.final_val_loss)}")
    text.append(f", {outcome.spike_count} spike{'' if outcome.spike_count == 1 else 's'}")
    if outcome.wall_time_s is not None:
        text.append(f", {outcome.wall_time_s:.1f} s")
    return text


def _format_loss(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}"
