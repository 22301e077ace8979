"""Take a screenshot of the stabiliscope dashboard with headless Chromium, for the README.

    python docs/screenshot_dashboard.py --sweep runs/sweep --out docs/dashboard.png

The script serves the sweep's TensorBoard folder on 127.0.0.1 with the
settings of `stabiliscope dashboard` and opens its custom-scalars page in
headless Chromium (Debian's `chromium` package). It drives Chromium over the
DevTools protocol on a pipe, so nothing listens on a port but TensorBoard.
It waits until the first depth-profile chart has drawn its lines, and then
saves a PNG of the page. Without `--sweep` it first trains a small sweep
(Pre-Norm, Post-Norm and HybridNorm at depths 4 and 8) into a temporary
folder.

The page is opened with smoothing 0 and without TensorBoard's outlier
clipping: smoothing blurs a profile against layer index, and the clipping
can cut off its largest values.

The script then checks from the image that the chart rendered. Run lines
have saturated colours, while axes, grid and text are grey or black. Inside
the chart, at least `MIN_LINE_PIXELS` pixels must have a saturated colour,
in at least `MIN_LINE_COLOURS` distinct hues (one per visible run). Exit
status: 0 when the check passes, 1 when it fails, 2 for bad arguments such
as a missing Chromium.
"""

from __future__ import annotations

import argparse
import base64
import colorsys
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CHROMIUM = "/usr/bin/chromium"
MIN_LINE_PIXELS = 150
MIN_LINE_COLOURS = 2
HUE_BINS = 24
LINE_COLOUR_PIXELS = 40
"""Pixels a hue bin needs inside the chart to count as one run's line."""
SATURATION = 60
"""Minimum difference between the largest and smallest RGB channel of a line pixel."""

# JavaScript run in the page. TensorBoard's dashboards live in nested shadow
# DOMs, so elements are found by walking every shadow root.
_FIND = r"""
function stabiliscopeFind(tagName) {
  const stack = [document];
  while (stack.length) {
    const node = stack.pop();
    if (node.tagName && node.tagName.toLowerCase() === tagName) return node;
    for (const child of Array.from(node.children || []).reverse()) stack.push(child);
    if (node.shadowRoot) stack.push(node.shadowRoot);
  }
  return null;
}
"""

# Turns off outlier clipping on the custom-scalars dashboard and returns the
# box of the first chart once its SVG contains a drawn line, else null.
_FIRST_CHART_BOX = _FIND + r"""
(() => {
  const dashboard = stabiliscopeFind('tf-custom-scalar-dashboard');
  if (!dashboard) return null;
  if (dashboard._ignoreYOutliers) dashboard._ignoreYOutliers = false;
  const chart = stabiliscopeFind('vz-line-chart2');
  if (!chart) return null;
  const root = chart.shadowRoot || chart;
  const lines = Array.from(root.querySelectorAll('path.line')).filter(p => (p.getAttribute('d') || '').length > 20);
  if (!lines.length) return null;
  const box = chart.getBoundingClientRect();
  return {x: box.x, y: box.y, width: box.width, height: box.height, lines: lines.length};
})()
"""


# Counts the loading spinners inside the window, which charts show until their data arrives.
_VISIBLE_SPINNERS = _FIND + r"""
function stabiliscopeFindAll(tagName) {
  const found = [];
  const stack = [document];
  while (stack.length) {
    const node = stack.pop();
    if (node.tagName && node.tagName.toLowerCase() === tagName) found.push(node);
    for (const child of Array.from(node.children || [])) stack.push(child);
    if (node.shadowRoot) stack.push(node.shadowRoot);
  }
  return found;
}
stabiliscopeFindAll('paper-spinner-lite').filter(spinner => {
  const box = spinner.getBoundingClientRect();
  return spinner.hasAttribute('active') && box.width > 0 && box.top < window.innerHeight && box.bottom > 0;
}).length
"""


@dataclass(frozen=True)
class ChartCheck:
    """Result of the pixel check of one chart."""

    line_pixels: int
    line_colours: int

    @property
    def passed(self) -> bool:
        return self.line_pixels >= MIN_LINE_PIXELS and self.line_colours >= MIN_LINE_COLOURS


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`).

    Chromium reads JSON commands, each ended by a NUL byte, from its file
    descriptor 3 and writes replies and events to descriptor 4.
    """

    def __init__(self, chromium: str, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._profile = tempfile.TemporaryDirectory(prefix="stabiliscope-chromium-")
        child_reads, self._to_child = os.pipe()
        self._from_child, child_writes = os.pipe()

        def map_descriptors() -> None:
            # Copies first, so that neither end is overwritten when it already is 3 or 4.
            read_copy, write_copy = os.dup(child_reads), os.dup(child_writes)
            os.dup2(read_copy, 3)
            os.dup2(write_copy, 4)

        command = [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--window-size={width},{height}",
            f"--user-data-dir={self._profile.name}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            command,
            preexec_fn=map_descriptors,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(child_reads)
        os.close(child_writes)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, params: dict | None = None) -> dict:
        """Send one command and return its result, skipping the events that arrive before it."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium rejected {method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open_page(self, url: str) -> None:
        """Attach to Chromium's first page and navigate it to `url`."""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(target for target in targets if target["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        for descriptor in (self._to_child, self._from_child):
            try:
                os.close(descriptor)
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._profile.cleanup()


def check_chart(image: Image.Image, box: dict) -> ChartCheck:
    """Count the line pixels and line colours inside `box` of `image`."""
    left, top = int(box["x"]), int(box["y"])
    right, bottom = int(box["x"] + box["width"]), int(box["y"] + box["height"])
    region = image.convert("RGB").crop((left, top, right, bottom))

    # A line and its anti-aliased edge share a hue, so hue bins count the lines.
    line_pixels = 0
    hue_bins: dict[int, int] = {}
    for count, (red, green, blue) in region.getcolors(maxcolors=region.width * region.height):
        if max(red, green, blue) - min(red, green, blue) < SATURATION:
            continue
        line_pixels += count
        hue, _, _ = colorsys.rgb_to_hsv(red / 255, green / 255, blue / 255)
        key = int(hue * HUE_BINS) % HUE_BINS
        hue_bins[key] = hue_bins.get(key, 0) + count
    colours = sum(1 for pixels in hue_bins.values() if pixels >= LINE_COLOUR_PIXELS)
    return ChartCheck(line_pixels=line_pixels, line_colours=colours)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1 below the kernel's ephemeral port range."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found in 20000-32767")


def train_demo_sweep(out: Path) -> None:
    """Train Pre-Norm, Post-Norm and HybridNorm at depths 4 and 8 for 60 steps into `out`."""
    from stabiliscope.experiments.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        norms=["pre", "post", "hybrid"],
        depths=[4, 8],
        width=64,
        heads=4,
        steps=60,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup=6,
        out=out,
        grad_clip=1.0,
    )
    run_sweep(config)


def wait_for_runs(url: str, timeout_s: float) -> list[str]:
    """Return the runs TensorBoard lists once two listings a second apart agree."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    previous: list[str] = []
    while time.monotonic() < deadline:
        with opener.open(url + "data/runs", timeout=10) as response:
            runs = json.loads(response.read())
        if runs and runs == previous:
            return runs
        previous = runs
        time.sleep(1.0)
    return previous


def wait_for_charts(browser: DevTools, deadline: float) -> None:
    """Wait until no chart in the window shows a loading spinner, then 1 s for the chart transitions."""
    while time.monotonic() < deadline and browser.evaluate(_VISIBLE_SPINNERS):
        time.sleep(0.5)
    time.sleep(1.0)


def take_screenshot(tb_dir: Path, out: Path, chromium: str, width: int, height: int, timeout_s: float) -> ChartCheck | None:
    """Serve `tb_dir`, save a screenshot of the depth-profile page to `out` and check its first chart.

    Returns None when no depth-profile chart drew a line within `timeout_s` seconds.
    """
    # Imported here, so that argument errors are reported without loading torch.
    from stabiliscope.sinks.tensorboard import LAYOUT_PAGE, TensorBoardServer

    with TensorBoardServer(tb_dir, port=free_port()) as server:
        server.start(timeout_s=60)
        runs = wait_for_runs(server.url, timeout_s=60)
        print(f"TensorBoard serves {len(runs)} runs at {server.url}")

        browser = DevTools(chromium, width, height)
        try:
            browser.open_page(server.url + LAYOUT_PAGE)
            deadline = time.monotonic() + timeout_s
            check: ChartCheck | None = None
            png = b""
            while time.monotonic() < deadline:
                box = browser.evaluate(_FIRST_CHART_BOX)
                if box:
                    wait_for_charts(browser, deadline)
                    box = browser.evaluate(_FIRST_CHART_BOX) or box
                    png = browser.screenshot()
                    check = check_chart(Image.open(io.BytesIO(png)), box)
                    if check.passed:
                        break
                time.sleep(0.5)
        finally:
            browser.close()

    if png:
        Image.open(io.BytesIO(png)).save(out, optimize=True)
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, help="sweep folder written by 'stabiliscope sweep'; default: train a small one")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "dashboard.png", help="PNG file to write")
    parser.add_argument("--chromium", default=shutil.which("chromium") or DEFAULT_CHROMIUM, help="Chromium executable")
    parser.add_argument("--width", type=int, default=1400, help="window width, in pixels")
    parser.add_argument("--height", type=int, default=900, help="window height, in pixels")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the chart to render")
    args = parser.parse_args(argv)

    if not (Path(args.chromium).is_file() and os.access(args.chromium, os.X_OK)):
        parser.error(f"Chromium not found at {args.chromium!r}; install Debian's chromium package or pass --chromium")
    if args.sweep is not None and not (args.sweep / "tb").is_dir():
        parser.error(f"{str(args.sweep)!r} contains no TensorBoard folder (tb/); pass a folder written by 'stabiliscope sweep'")
    if not args.out.parent.is_dir():
        parser.error(f"the folder of --out {str(args.out)!r} does not exist")

    with tempfile.TemporaryDirectory(prefix="stabiliscope-demo-") as scratch:
        sweep = args.sweep
        if sweep is None:
            sweep = Path(scratch) / "sweep"
            print(f"training a small sweep into {sweep}")
            train_demo_sweep(sweep)
        check = take_screenshot(sweep / "tb", args.out, args.chromium, args.width, args.height, args.timeout)

    if check is None:
        print(f"no depth-profile chart drew a line within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: first chart has {check.line_pixels} line pixels in {check.line_colours} colours")
    if not check.passed:
        print(
            f"the depth-profile chart did not render: expected at least {MIN_LINE_PIXELS} line pixels "
            f"in {MIN_LINE_COLOURS} colours",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
