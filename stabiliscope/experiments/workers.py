"""Parallel sweep runs: worker processes that share one run store.

`train_in_workers` starts N processes with the "spawn" start method. Each
worker loads the corpus, opens the sweep's run store (WAL mode with a busy
timeout, so concurrent writers wait for each other) and trains runs from a
shared task queue, one at a time, with `threads` intra-op threads. Every run
seeds its own model and batches, so the numbers match a serial sweep.

Workers send their progress, outcomes and log records to the main process,
which drives the reporter. The main process alone decides when to stop:

- Ctrl-C reaches the whole process group, and the workers ignore it. The
  main process sets a stop event, each worker stops its run at the next
  optimizer step (the run stays unfinished and reruns next time), and the
  main process waits for the workers and raises KeyboardInterrupt. A second
  Ctrl-C terminates them at once.
- SIGTERM to a worker (a batch scheduler's time limit) stops it the same way.
- A worker exits when the main process dies: on Linux through
  PR_SET_PDEATHSIG, elsewhere at its next step or task. The runs it had
  not finished stay unfinished in the store.
- A worker that dies during a run fails that run, and a new worker takes its
  place. A worker that dies outside a run stops the sweep with WorkerError.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import multiprocessing
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stabiliscope.errors import StabiliscopeError

if TYPE_CHECKING:
    from stabiliscope.experiments.sweep import RunOutcome, SweepConfig, SweepReporter, _RunPlan
    from stabiliscope.sinks.store import RunStore

logger = logging.getLogger(__name__)

POLL_S = 0.5
"""Seconds between checks of the workers' health while no message arrives."""

SHUTDOWN_WAIT_S = 60.0
"""Seconds to wait for workers to stop their runs after a stop request, before terminating them."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerError(StabiliscopeError):
    """A worker process failed outside a run, so the sweep cannot go on."""


@dataclass(frozen=True)
class WorkerJob:
    """Settings shared by every worker of one sweep: configuration, store file, threads and logging."""

    config: SweepConfig
    store_filename: str
    threads: int
    parent_pid: int
    log_level: int


def train_in_workers(
    plans: list[_RunPlan],
    *,
    config: SweepConfig,
    store: RunStore,
    store_filename: str,
    workers: int,
    threads: int,
    reporter: SweepReporter,
) -> list[RunOutcome]:
    """Train `plans` in `workers` processes and return their outcomes in the order of `plans`.

    `store` is the main process's connection to the sweep's store, used to
    record runs whose worker died. Raises KeyboardInterrupt after a clean stop
    on Ctrl-C, and WorkerError when a worker fails outside a run.
    """
    context = multiprocessing.get_context("spawn")
    job = WorkerJob(
        config=config,
        store_filename=store_filename,
        threads=threads,
        parent_pid=os.getpid(),
        log_level=logging.getLogger("stabiliscope").getEffectiveLevel(),
    )
    pool = _WorkerPool(context, job, plans, store, reporter)
    try:
        pool.start(min(workers, len(plans)))
        outcomes = pool.collect()
    except KeyboardInterrupt:
        logger.warning("stopping %d workers; their current runs stay unfinished", pool.alive_count())
        pool.stop_gracefully()
        raise
    finally:
        pool.close()

    order = {plan.point.run_id: index for index, plan in enumerate(plans)}
    return sorted(outcomes, key=lambda outcome: order[outcome.run_id])


class _WorkerPool:
    """The main process's side: task queue, message loop and worker health."""

    def __init__(
        self,
        context: SpawnContext,
        job: WorkerJob,
        plans: list[_RunPlan],
        store: RunStore,
        reporter: SweepReporter,
    ) -> None:
        self.context = context
        self.job = job
        self.plans = {plan.point.run_id: plan for plan in plans}
        self.store = store
        self.reporter = reporter
        self.tasks = context.Queue()
        self.messages = context.Queue()
        self.stop = context.Event()
        self.processes: dict[int, SpawnProcess] = {}
        self.current_run: dict[int, str] = {}
        self.outcomes: list[RunOutcome] = []
        self._next_index = 0

    def start(self, count: int) -> None:
        # The deepest runs go first, so the last runs to start are short
        # ones and no worker is left alone with a long run at the end.
        for plan in sorted(self.plans.values(), key=lambda plan: plan.point.depth, reverse=True):
            self.tasks.put(plan)
        # One end marker per worker. A replacement worker inherits the marker
        # its dead predecessor did not take.
        for _ in range(count):
            self.tasks.put(None)
        for _ in range(count):
            self._start_worker()

    def _start_worker(self) -> None:
        index = self._next_index
        self._next_index += 1
        process = self.context.Process(
            target=worker_main,
            args=(index, self.job, self.tasks, self.messages, self.stop),
            name=f"stabiliscope-worker-{index}",
            daemon=True,
        )
        process.start()
        self.processes[index] = process
        logger.debug("started worker %d (pid %s)", index, process.pid)

    def alive_count(self) -> int:
        return sum(1 for process in self.processes.values() if process.is_alive())

    def collect(self) -> list[RunOutcome]:
        """Handle messages until every plan has an outcome."""
        while len(self.outcomes) < len(self.plans):
            try:
                message = self.messages.get(timeout=POLL_S)
            except queue.Empty:
                self._check_workers()
                continue
            self._handle(message)
        return self.outcomes

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            record: logging.LogRecord = message[1]
            logging.getLogger(record.name).handle(record)
        elif kind == "started":
            _, index, run_id, steps = message
            self.current_run[index] = run_id
            logger.debug("worker %d (pid %s) started run %s", index, self.processes[index].pid, run_id)
            self.reporter.run_started(run_id, steps)
        elif kind == "step":
            _, run_id, step, loss = message
            self.reporter.run_progress(run_id, step, loss)
        elif kind == "finished":
            _, index, outcome = message
            self.current_run.pop(index, None)
            self._finish(outcome)
        elif kind == "failed":
            _, index, run_id, error_text = message
            self.current_run.pop(index, None)
            self._fail(run_id, error_text)
        elif kind == "interrupted":
            _, index, run_id = message
            self.current_run.pop(index, None)
        elif kind == "error":
            _, index, error_text = message
            raise WorkerError(f"worker {index} failed before training: {error_text}")

    def _finish(self, outcome: RunOutcome) -> None:
        self.outcomes.append(outcome)
        self.reporter.run_finished(outcome)

    def _fail(self, run_id: str, error_text: str) -> None:
        from stabiliscope.experiments.sweep import failed_outcome

        logger.error("run %s failed: %s", run_id, error_text)
        self.store.fail_run(run_id, error_text)
        self._finish(failed_outcome(self.plans[run_id].point, error_text))

    def _drain(self) -> None:
        while True:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _check_workers(self) -> None:
        """Fail the run of a worker that died, and replace the worker; raise when one died idle."""
        for index, process in list(self.processes.items()):
            if process.is_alive():
                continue
            # Messages a worker sent before it exited are in the queue by now.
            self._drain()
            del self.processes[index]
            run_id = self.current_run.pop(index, None)
            if process.exitcode == 0 and run_id is None:
                continue

            description = f"worker {index} (pid {process.pid}) exited with status {process.exitcode}"
            if run_id is None:
                raise WorkerError(f"{description} outside a run; rerun the same command to continue")
            self._fail(run_id, f"{description} during the run")
            self._start_worker()

        if not self.processes and len(self.outcomes) < len(self.plans):
            raise WorkerError(
                f"every worker exited with {len(self.plans) - len(self.outcomes)} runs left; "
                "rerun the same command to continue"
            )

    def stop_gracefully(self) -> None:
        """Ask the workers to stop at their next step and wait for them; a second Ctrl-C terminates them."""
        self.stop.set()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        try:
            while self.alive_count() and time.monotonic() < deadline:
                try:
                    self._handle(self.messages.get(timeout=POLL_S))
                except queue.Empty:
                    pass
                except WorkerError as error:
                    logger.warning("%s", error)
            self._drain()
        except KeyboardInterrupt:
            logger.warning("terminating the workers")
        self.terminate()

    def terminate(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
        for process in self.processes.values():
            process.join(timeout=10)

    def close(self) -> None:
        self.stop.set()
        self.terminate()
        # Tasks that no worker took would otherwise keep the queue's feeder
        # thread, and so this process, from exiting.
        self.tasks.cancel_join_thread()
        self.tasks.close()
        self.messages.close()


# The worker's side


def worker_main(
    index: int,
    job: WorkerJob,
    tasks: multiprocessing.Queue,
    messages: multiprocessing.Queue,
    stop: Any,
) -> None:
    """Train runs from `tasks` until an end marker or a stop request; the entry point of a worker process."""
    _exit_with_parent(job.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _note_termination)
    _forward_logs(messages, job.log_level)
    torch.set_num_threads(job.threads)

    from stabiliscope.data import load_corpus
    from stabiliscope.experiments.sweep import _train_one
    from stabiliscope.sinks.store import RunStore

    out = Path(job.config.out)
    try:
        corpus = load_corpus(job.config.data)
        store = RunStore.open(out, filename=job.store_filename)
    except Exception as error:  # noqa: BLE001 - reported to the main process, which raises
        messages.put(("error", index, f"{type(error).__name__}: {error}"))
        return

    reporter = _WorkerReporter(index, messages, stop, job.parent_pid)
    with store:
        while not reporter.stop_requested():
            try:
                plan = tasks.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if plan is None or reporter.stop_requested():
                break
            try:
                outcome = _train_one(store, out, job.config, plan, corpus, reporter)
            except KeyboardInterrupt:
                messages.put(("interrupted", index, plan.point.run_id))
                break
            except Exception as error:  # noqa: BLE001 - the main process records the failure
                logger.debug("traceback of the failure of run %s", plan.point.run_id, exc_info=True)
                messages.put(("failed", index, plan.point.run_id, f"{type(error).__name__}: {error}"))
                continue
            messages.put(("finished", index, outcome))


_termination_requested = False


def _note_termination(signum: int, frame: object) -> None:
    global _termination_requested
    _termination_requested = True


def _exit_with_parent(parent_pid: int) -> None:
    """Make the kernel kill this process when the main process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            logger.debug("prctl(PR_SET_PDEATHSIG) is not available")
    # The main process may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(1)


class _QueueLogHandler(logging.handlers.QueueHandler):
    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


def _forward_logs(messages: multiprocessing.Queue, level: int) -> None:
    package_logger = logging.getLogger("stabiliscope")
    package_logger.handlers[:] = [_QueueLogHandler(messages)]
    package_logger.setLevel(level)
    package_logger.propagate = False


class _WorkerReporter:
    """Reporter inside a worker: sends progress to the main process and stops runs on request."""

    def __init__(self, index: int, messages: multiprocessing.Queue, stop: Any, parent_pid: int) -> None:
        self.index = index
        self.messages = messages
        self.stop = stop
        self.parent_pid = parent_pid

    def stop_requested(self) -> bool:
        return self.stop.is_set() or _termination_requested or os.getppid() != self.parent_pid

    def run_started(self, run_id: str, steps: int) -> None:
        self.messages.put(("started", self.index, run_id, steps))

    def run_progress(self, run_id: str, step: int, loss: float) -> None:
        if self.stop_requested():
            # The trainer unwinds, and _train_one leaves the run unfinished.
            raise KeyboardInterrupt
        self.messages.put(("step", run_id, step, loss))

    def run_step(self, step: int, loss: float) -> None:
        """Unused: workers report steps with their run id through `run_progress`."""

    def run_finished(self, outcome: RunOutcome) -> None:
        """The worker loop sends the outcome once `_train_one` returns."""
