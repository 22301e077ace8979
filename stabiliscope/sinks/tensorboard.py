"""TensorBoard event files for one run, and a TensorBoard server for a sweep.

Tag layout written by `TensorBoardSink`:

- global scalars under their own names (`loss`, `grad/total`, ...);
- per-block metrics under `<metric>/block_<ii>`, for example
  `grad/mlp.out/block_07`, zero-padded to at least two digits so that runs of
  different depths share tag names;
- `events/spike` (value 1 at the step of each spike) and a text entry
  `events/spike_detail` describing it;
- depth profiles `profile/init/<metric>` and `profile/final/<metric>` whose
  TensorBoard step is the block index, written from the first and the last
  record of the run. Overlaying runs in the scalars dashboard then draws the
  metric against layer index, one line per run.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from stabiliscope.watch.records import Sink, SpikeEvent, StepRecord

logger = logging.getLogger(__name__)

PROFILE_METRICS = ("grad/mlp.out", "grad/resid_post", "act/resid_post_rms")
"""Per-block metrics written as depth profiles at the first and last record."""

FLUSH_SECS = 10
"""Seconds between SummaryWriter flushes, so a live dashboard lags by at most this."""


# Readiness checks go straight to the server, never through an HTTP proxy set
# in the environment.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def block_tag(metric: str, block: int, depth: int) -> str:
    """Return the tag of `metric` at `block`, such as `grad/mlp.out/block_07`."""
    digits = max(2, len(str(depth - 1)))
    return f"{metric}/block_{block:0{digits}d}"


class TensorBoardSink(Sink):
    """Sink that writes one run's records as TensorBoard scalars under `run_dir`.

    Non-finite values are written unchanged, and TensorBoard shows them as
    NaN or Inf points. `description`, when given, is written once as the text
    entry `run/config`. `close()` writes the final depth profile and may be
    called more than once.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        profile_metrics: Sequence[str] = PROFILE_METRICS,
        description: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.profile_metrics = tuple(profile_metrics)
        self._writer: SummaryWriter | None = SummaryWriter(
            log_dir=str(self.run_dir), flush_secs=FLUSH_SECS
        )
        self._wrote_init_profile = False
        self._last_record: StepRecord | None = None

        if description is not None:
            self._writer.add_text("run/config", description, 0)

    def write(self, records: list[StepRecord], spikes: list[SpikeEvent]) -> None:
        writer = self._writer
        if writer is None:
            raise RuntimeError(f"TensorBoardSink for {self.run_dir} is closed")

        for record in records:
            self._write_record(writer, record)
            if not self._wrote_init_profile:
                self._write_profile(writer, "init", record)
                self._wrote_init_profile = True
            self._last_record = record

        for spike in spikes:
            writer.add_scalar("events/spike", 1.0, spike.step)
            writer.add_text(
                "events/spike_detail",
                f"{spike.metric} = {spike.value:.6g} at step {spike.step} "
                f"(trailing median {spike.median:.6g}, robust z-score {spike.zscore:.3g})",
                spike.step,
            )

    def close(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if self._last_record is not None:
            self._write_profile(writer, "final", self._last_record)
        writer.close()
        self._writer = None

    def _write_record(self, writer: SummaryWriter, record: StepRecord) -> None:
        # One event contains every value of the step. Per-value add_scalar
        # calls would each build and write an event of their own, at about
        # 0.1 ms per value and hundreds of values per step on a deep model.
        values = [Summary.Value(tag=metric, simple_value=float(value)) for metric, value in record.scalars.items()]
        for metric, per_block in record.blocks.items():
            depth = len(per_block)
            values.extend(
                Summary.Value(tag=block_tag(metric, block, depth), simple_value=float(value))
                for block, value in enumerate(per_block)
            )
        writer._get_file_writer().add_summary(Summary(value=values), record.step)

    def _write_profile(self, writer: SummaryWriter, phase: str, record: StepRecord) -> None:
        for metric in self.profile_metrics:
            values = record.blocks.get(metric)
            if values is None:
                continue
            for block, value in enumerate(values):
                writer.add_scalar(f"profile/{phase}/{metric}", float(value), block)


class TensorBoardServer:
    """A TensorBoard child process serving `logdir`.

    `start()` launches `python -m tensorboard.main` and waits until its HTTP
    data API responds. `stop()` terminates it. The server keeps every scalar
    point (`--samples_per_plugin scalars=0`). By default TensorBoard 2.21 downsamples
    each tag to 1000 points, which can drop the single step of a loss spike. Use it as a context manager to stop the child on any exit.
    """

    def __init__(self, logdir: str | Path, *, host: str = "127.0.0.1", port: int = 6006) -> None:
        self.logdir = Path(logdir)
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Address of the dashboard as a browser on this machine reaches it."""
        host = self._client_host()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def command(self) -> list[str]:
        """Return the command line that starts the server."""
        return [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(self.logdir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--samples_per_plugin",
            "scalars=0,images=0",
        ]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until `/data/runs` responds.

        Raises RuntimeError with the last line of the server's output when it
        exits early (for example because the port is in use), and when it does
        not respond within `timeout_s` seconds. The child is stopped in both cases.
        """
        command = self.command()
        logger.info("starting TensorBoard: %s", " ".join(command))
        # The child's output goes to a temporary file rather than a pipe, which
        # would block the server once the pipe buffer is full.
        self._output = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            returncode = self.process.poll()
            if returncode is not None:
                last_line = self._last_output_line()
                self.stop()
                raise RuntimeError(f"TensorBoard exited with status {returncode}: {last_line}")
            if self._responds():
                logger.info("TensorBoard (pid %d) responds at %s", self.process.pid, self.url)
                return
            time.sleep(0.25)

        last_line = self._last_output_line()
        self.stop()
        raise RuntimeError(
            f"TensorBoard did not respond at {self.url} within {timeout_s:.0f} s: {last_line}"
        )

    def wait(self) -> int:
        """Block until the server exits and return its exit status."""
        if self.process is None:
            raise RuntimeError("TensorBoard server is not running")
        return self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server, killing it when it outlives `timeout_s` seconds."""
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("TensorBoard (pid %d) ignored SIGTERM; killing it", process.pid)
                    process.kill()
                    process.wait()
            logger.info("TensorBoard (pid %d) stopped", process.pid)
            self.process = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> TensorBoardServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _client_host(self) -> str:
        # A server bound to every interface is reached on loopback from here.
        if self.host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return self.host

    def _responds(self) -> bool:
        try:
            with _DIRECT_OPENER.open(self.url + "data/runs", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _last_output_line(self) -> str:
        if self._output is None:
            return "no output"
        self._output.seek(0)
        text = self._output.read().decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"
