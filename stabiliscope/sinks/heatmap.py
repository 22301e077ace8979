"""Layer-by-step heatmaps: a bounded history of per-block values and its PNG rendering.

`LayerStepHistory` keeps one column per bin of consecutive steps and at most
`max_columns` columns. When a new column would exceed that, neighbouring
columns are merged in pairs and the bin width doubles. A column holds the max
of each block's finite values over its bin, so a one-step spike stays
visible at any bin width, and a flag per block records whether the bin saw a
NaN or Inf.

`render_heatmap_png` draws a history with Pillow, which TensorBoard already
depends on. Layers are on the y axis with block 0 at the bottom, and step
bins on the x axis. Colours follow a log10 scale shown by a colour bar, and
NaN or Inf cells are red.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_COLUMNS = 512
"""Default bound on the number of step bins a history keeps."""

# Viridis (van der Walt and Smith 2015, the matplotlib default colour map,
# released under CC0), sampled at 17 evenly spaced points in 8-bit RGB.
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84),
        (72, 24, 106),
        (71, 45, 123),
        (66, 64, 134),
        (59, 82, 139),
        (51, 99, 141),
        (44, 114, 142),
        (38, 130, 142),
        (33, 145, 140),
        (31, 160, 136),
        (40, 174, 128),
        (63, 188, 115),
        (94, 201, 98),
        (132, 212, 75),
        (173, 220, 48),
        (216, 226, 25),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
_LEVELS = 256


def _colour_table() -> np.ndarray:
    positions = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
    samples = np.linspace(0.0, 1.0, _LEVELS)
    channels = [np.interp(samples, positions, _VIRIDIS_ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=1).round().astype(np.uint8)


COLOUR_TABLE = _colour_table()
"""(256, 3) uint8 RGB colours from the lowest to the highest value."""

NONFINITE_RGB = (220, 20, 60)
"""Colour of a cell whose bin saw a NaN or Inf."""

MISSING_RGB = (190, 190, 190)
"""Colour of a cell with no positive finite value (zero, negative or not recorded)."""

BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (33, 33, 33)

PLOT_WIDTH = 512
"""Width of the plot area in pixels, whatever the number of columns."""

MIN_PLOT_HEIGHT = 96
MAX_PLOT_HEIGHT = 320
PIXELS_PER_LAYER = 6
MAX_TICKS = 5


@dataclass(frozen=True)
class HeatmapData:
    """Columns of a `LayerStepHistory` as arrays.

    `starts` (columns,) is the first recorded step of each bin. `values`
    (columns, depth) is the max finite value per block, NaN where the bin had
    none. `nonfinite` (columns, depth) is True where the bin saw a NaN or Inf.
    """

    starts: np.ndarray
    values: np.ndarray
    nonfinite: np.ndarray
    bin_steps: int


class LayerStepHistory:
    """Per-block values of one metric over steps, in at most `max_columns` step bins."""

    def __init__(self, depth: int, max_columns: int = MAX_COLUMNS) -> None:
        if depth < 1:
            raise ValueError(f"depth must be a positive number of blocks, got {depth!r}")
        if max_columns < 2:
            raise ValueError(f"max_columns must be at least 2, got {max_columns!r}")
        self.depth = depth
        self.max_columns = max_columns
        self.bin_steps = 1
        self._starts: list[int] = []
        self._values: list[np.ndarray] = []
        self._nonfinite: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, step: int, values: Sequence[float]) -> None:
        """Add one step's per-block values; steps must come in increasing order.

        Raises ValueError when `values` does not have one value per block.
        """
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (self.depth,):
            raise ValueError(f"expected {self.depth} per-block values, got shape {array.shape}")
        bad = ~np.isfinite(array)
        finite = np.where(bad, np.nan, array)

        if self._starts and self._starts[-1] // self.bin_steps == step // self.bin_steps:
            self._values[-1] = np.fmax(self._values[-1], finite)
            self._nonfinite[-1] |= bad
        else:
            self._starts.append(step)
            self._values.append(finite)
            self._nonfinite.append(bad)
        if len(self._starts) > self.max_columns:
            self._coarsen()

    def _coarsen(self) -> None:
        """Double the bin width and merge the columns that now share a bin."""
        self.bin_steps *= 2
        starts, values, nonfinite = [], [], []
        for start, column, bad in zip(self._starts, self._values, self._nonfinite):
            if starts and starts[-1] // self.bin_steps == start // self.bin_steps:
                values[-1] = np.fmax(values[-1], column)
                nonfinite[-1] = nonfinite[-1] | bad
            else:
                starts.append(start)
                values.append(column)
                nonfinite.append(bad.copy())
        self._starts, self._values, self._nonfinite = starts, values, nonfinite

    def data(self) -> HeatmapData:
        """Return the columns as arrays."""
        if not self._starts:
            empty = np.zeros((0, self.depth))
            return HeatmapData(np.zeros(0, dtype=np.int64), empty, empty.astype(bool), self.bin_steps)
        return HeatmapData(
            starts=np.asarray(self._starts, dtype=np.int64),
            values=np.stack(self._values),
            nonfinite=np.stack(self._nonfinite),
            bin_steps=self.bin_steps,
        )


def log_range(values: np.ndarray) -> tuple[float, float] | None:
    """Return (min, max) of log10 over the positive finite entries, or None when there are none.

    A range narrower than 0.1 decade is widened around its centre to 0.1 decade,
    so that a constant metric gets a mid-scale colour instead of a division by zero.
    """
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return None
    low, high = float(np.log10(positive.min())), float(np.log10(positive.max()))
    if high - low < 0.1:
        centre = (low + high) / 2
        low, high = centre - 0.05, centre + 0.05
    return low, high


def colour_cells(data: HeatmapData, decades: tuple[float, float] | None) -> np.ndarray:
    """Return (depth, columns, 3) uint8 colours, block 0 in the last row."""
    values = data.values.T[::-1]
    nonfinite = data.nonfinite.T[::-1]
    rgb = np.empty(values.shape + (3,), dtype=np.uint8)
    rgb[:] = MISSING_RGB

    usable = np.isfinite(values) & (values > 0)
    if decades is not None and usable.any():
        low, high = decades
        scaled = (np.log10(values[usable]) - low) / (high - low)
        levels = np.clip(np.round(scaled * (_LEVELS - 1)), 0, _LEVELS - 1).astype(np.int64)
        rgb[usable] = COLOUR_TABLE[levels]
    rgb[nonfinite] = NONFINITE_RGB
    return rgb


def _font(size: int) -> ImageFont.FreeTypeFont:
    # NOTE: a Pillow built without FreeType returns a bitmap font here, which
    # rejects the `anchor` argument of `draw.text`. Pillow's wheels include FreeType.
    return ImageFont.load_default(size=size)


def _tick_indices(count: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, min(count, MAX_TICKS))})


def _colour_bar_ticks(low: float, high: float) -> tuple[list[float], bool]:
    """Return log10 tick positions and whether they are whole decades.

    Whole decades are used when two or more fit in [low, high], else the two ends.
    """
    first, last = math.ceil(low - 1e-9), math.floor(high + 1e-9)
    if last - first + 1 < 2:
        return [low, high], False
    stride = max(1, math.ceil((last - first + 1) / MAX_TICKS))
    return [float(k) for k in range(first, last + 1, stride)], True


def _format_tick(position: float, whole_decades: bool) -> str:
    if whole_decades:
        return f"1e{int(round(position))}"
    return f"{10.0**position:.2g}"


def render_heatmap_png(title: str, data: HeatmapData) -> tuple[bytes, int, int]:
    """Render `data` as a PNG with labelled axes and a log10 colour bar.

    Each column is one step bin, labelled with its first step. Cells with no
    positive finite value are grey, and bins that saw a NaN or Inf are red.
    Returns the PNG bytes, the width and the height in pixels.
    """
    depth = data.values.shape[1] if data.values.ndim == 2 else 0
    columns = len(data.starts)
    decades = log_range(data.values) if columns else None

    font = _font(12)
    small = _font(11)
    left, right, top, bottom = 64, 96, 40, 46
    plot_height = min(max(depth * PIXELS_PER_LAYER, MIN_PLOT_HEIGHT), MAX_PLOT_HEIGHT)
    width = left + PLOT_WIDTH + right
    height = top + plot_height + bottom

    image = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    subtitle = "log10 colour scale"
    if data.bin_steps > 1:
        subtitle += f"; each column is the max over {data.bin_steps} steps"
    if data.nonfinite.any():
        subtitle += "; red: NaN or Inf"
    draw.text((left, 4), title, fill=TEXT_RGB, font=font)
    draw.text((left, 20), subtitle, fill=TEXT_RGB, font=small)

    if columns and depth:
        cells = Image.fromarray(colour_cells(data, decades), mode="RGB")
        image.paste(cells.resize((PLOT_WIDTH, plot_height), Image.Resampling.NEAREST), (left, top))
    draw.rectangle((left - 1, top - 1, left + PLOT_WIDTH, top + plot_height), outline=TEXT_RGB)

    # y axis: layers, block 0 at the bottom.
    for layer in _tick_indices(depth) if depth else []:
        y = top + (depth - 1 - layer + 0.5) * plot_height / depth
        draw.line((left - 5, y, left - 1, y), fill=TEXT_RGB)
        draw.text((left - 8, y), str(layer), fill=TEXT_RGB, font=small, anchor="rm")
    _draw_vertical_text(image, "layer", (14, top + plot_height // 2), font)

    # x axis: the first step of each labelled bin.
    for column in _tick_indices(columns) if columns else []:
        x = left + (column + 0.5) * PLOT_WIDTH / columns
        draw.line((x, top + plot_height, x, top + plot_height + 4), fill=TEXT_RGB)
        draw.text((x, top + plot_height + 6), str(int(data.starts[column])), fill=TEXT_RGB, font=small, anchor="mt")
    draw.text((left + PLOT_WIDTH // 2, height - 16), "training step", fill=TEXT_RGB, font=font, anchor="mt")

    _draw_colour_bar(draw, decades, (left + PLOT_WIDTH + 16, top, 14, plot_height), small)

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), width, height


def _draw_vertical_text(image: Image.Image, text: str, centre: tuple[int, int], font) -> None:
    box = font.getbbox(text)
    label = Image.new("RGB", (box[2] + 2, box[3] + 2), BACKGROUND_RGB)
    ImageDraw.Draw(label).text((1, 1), text, fill=TEXT_RGB, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (centre[0] - label.width // 2, centre[1] - label.height // 2))


def _draw_colour_bar(draw: ImageDraw.ImageDraw, decades, box: tuple[int, int, int, int], font) -> None:
    x, y, bar_width, bar_height = box
    for row in range(bar_height):
        level = round((1 - row / max(bar_height - 1, 1)) * (_LEVELS - 1))
        draw.line((x, y + row, x + bar_width - 1, y + row), fill=tuple(int(c) for c in COLOUR_TABLE[level]))
    draw.rectangle((x - 1, y - 1, x + bar_width, y + bar_height), outline=TEXT_RGB)
    if decades is None:
        draw.text((x + bar_width + 4, y + bar_height // 2), "no data", fill=TEXT_RGB, font=font, anchor="lm")
        return

    low, high = decades
    ticks, whole_decades = _colour_bar_ticks(low, high)
    for position in ticks:
        tick_y = y + (high - position) / (high - low) * (bar_height - 1)
        draw.line((x + bar_width, tick_y, x + bar_width + 3, tick_y), fill=TEXT_RGB)
        label = _format_tick(position, whole_decades)
        draw.text((x + bar_width + 6, tick_y), label, fill=TEXT_RGB, font=font, anchor="lm")
