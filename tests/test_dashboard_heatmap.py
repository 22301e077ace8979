"""Tests for the layer-by-step heatmaps: step binning, colours and the rendered PNG."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from stabiliscope.sinks.heatmap import (
    COLOUR_TABLE,
    MISSING_RGB,
    NONFINITE_RGB,
    LayerStepHistory,
    colour_cells,
    log_range,
    render_heatmap_png,
)


def test_history_one_column_per_step() -> None:
    history = LayerStepHistory(depth=2, max_columns=4)
    for step in range(3):
        history.add(step, [step + 1.0, 10.0 * (step + 1)])
    data = history.data()
    assert data.starts.tolist() == [0, 1, 2]
    assert data.values.tolist() == [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]
    assert data.bin_steps == 1


def test_history_merges_pairs_past_limit() -> None:
    history = LayerStepHistory(depth=1, max_columns=4)
    for step, value in enumerate([1.0, 5.0, 2.0, 3.0, 4.0]):
        history.add(step, [value])
    data = history.data()
    # The fifth column doubles the bins: steps {0, 1}, {2, 3}, {4}.
    assert data.bin_steps == 2
    assert data.starts.tolist() == [0, 2, 4]
    assert data.values[:, 0].tolist() == [5.0, 3.0, 4.0]


def test_history_keeps_one_step_spike() -> None:
    history = LayerStepHistory(depth=1, max_columns=8)
    for step in range(100):
        history.add(step, [1000.0 if step == 37 else 1.0])
    data = history.data()
    assert len(data.starts) <= 8
    assert data.values.max() == 1000.0


def test_history_flags_nonfinite_bins() -> None:
    history = LayerStepHistory(depth=2, max_columns=2)
    history.add(0, [1.0, math.nan])
    history.add(1, [2.0, 3.0])
    history.add(2, [math.inf, 1.0])
    data = history.data()
    assert data.nonfinite.tolist() == [[False, True], [True, False]]
    # The finite values of a bin stay: NaN and Inf do not enter the max.
    assert data.values[0].tolist() == [2.0, 3.0]


def test_history_rejects_wrong_depth() -> None:
    history = LayerStepHistory(depth=3)
    with pytest.raises(ValueError, match="expected 3 per-block values, got shape \\(2,\\)"):
        history.add(0, [1.0, 2.0])


def test_log_range_over_positive_values() -> None:
    assert log_range(np.array([[0.01, 0.0], [10.0, math.nan]])) == pytest.approx((-2.0, 1.0))


def test_log_range_widens_constant() -> None:
    assert log_range(np.array([[1.0, 1.0]])) == pytest.approx((-0.05, 0.05))


def test_log_range_none_without_positive() -> None:
    assert log_range(np.array([[0.0, -1.0, math.nan]])) is None


def test_colour_cells_ends_and_marks() -> None:
    history = LayerStepHistory(depth=2)
    history.add(0, [0.01, 10.0])
    history.add(1, [0.0, math.nan])
    data = history.data()
    cells = colour_cells(data, log_range(data.values))
    # Block 0 is the last row, so that it is drawn at the bottom.
    assert tuple(cells[1, 0]) == tuple(COLOUR_TABLE[0])
    assert tuple(cells[0, 0]) == tuple(COLOUR_TABLE[-1])
    assert tuple(cells[1, 1]) == MISSING_RGB
    assert tuple(cells[0, 1]) == NONFINITE_RGB


def test_render_png_size_and_colours() -> None:
    history = LayerStepHistory(depth=8)
    for step in range(20):
        history.add(step, [10.0 ** (block - step / 10) for block in range(8)])
    png, width, height = render_heatmap_png("grad/mlp.out", history.data())
    image = Image.open(io.BytesIO(png))
    colours = {colour for _, colour in image.getcolors(maxcolors=1_000_000)}
    assert image.format == "PNG"
    assert image.size == (width, height)
    # The lowest and highest cells and the colour bar use both ends of the colour table.
    assert tuple(COLOUR_TABLE[0]) in colours
    assert tuple(COLOUR_TABLE[-1]) in colours


def test_render_png_without_data() -> None:
    png, width, height = render_heatmap_png("grad/mlp.out", LayerStepHistory(depth=4).data())
    assert Image.open(io.BytesIO(png)).size == (width, height)
