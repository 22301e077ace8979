"""Paper-style figures of a sweep, read from its run store.

One figure (PNG or PDF) with two parts:

- depth profiles: a row per depth, with the profile at initialization on
  the left and at the end of training on the right. Layer index is on the x
  axis, the metric on a log y axis, with one line per strategy (the mean
  over seeds, as in `stabiliscope report`);
- heatmaps: for the deepest depth, one layer-by-step heatmap per strategy
  (its first finished seed) on a log colour scale with a colour bar. Each
  column is the max over a bin of steps, as in the TensorBoard heatmaps,
  and bins that saw a NaN or Inf are red.

matplotlib is an optional dependency (the `plot` extra).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stabiliscope.errors import ConfigError, StabiliscopeError
from stabiliscope.experiments.shards import SweepReader
from stabiliscope.experiments.summary import PROFILE_METRIC, SummaryRow, summarize
from stabiliscope.sinks.heatmap import HeatmapData, LayerStepHistory
from stabiliscope.sinks.store import RunStore

Store = RunStore | SweepReader

logger = logging.getLogger(__name__)

PLOT_SUFFIXES = (".png", ".pdf")
INSTALL_COMMAND = "pip install 'matplotlib>=3.7'"

HEATMAP_COLUMNS = 256
"""Max step bins of a figure heatmap."""

PNG_DPI = 150
NONFINITE_COLOUR = "#dc143c"
MISSING_COLOUR = "#bebebe"


class MatplotlibMissingError(StabiliscopeError, ImportError):
    """matplotlib, which figures need, is not installed."""


def require_matplotlib() -> Any:
    """Import matplotlib with the non-interactive Agg backend and return `matplotlib.pyplot`.

    Raises MatplotlibMissingError, whose message gives the install command,
    when matplotlib cannot be imported.
    """
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissingError(
            f"--plot needs matplotlib, which is not installed; install it with: {INSTALL_COMMAND}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> None:
    """Raise ConfigError unless `path` ends in .png or .pdf and its folder exists."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(
            f"--plot file {str(path)!r} has an unsupported extension; expected one of: {', '.join(PLOT_SUFFIXES)}"
        )
    if path.is_dir():
        raise ConfigError(f"--plot file {str(path)!r} is a folder; give a file name ending in .png or .pdf")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder of --plot file {str(path)!r} does not exist; create it first")


def write_sweep_figure(store: Store, path: Path, metric: str = PROFILE_METRIC) -> Path:
    """Draw the depth profiles and heatmaps of the sweep in `store` into `path` and return it.

    The format follows the suffix of `path` (.png or .pdf). Raises
    MatplotlibMissingError without matplotlib, and ConfigError for another
    suffix or when no finished run recorded `metric`.
    """
    path = Path(path)
    check_plot_path(path)
    plt = require_matplotlib()

    rows = [row for row in summarize(store, metric) if row.init_profile]
    if not rows:
        raise ConfigError(f"{str(store.path)!r} has no finished run with a {metric} depth profile to plot")
    depths = sorted({row.depth for row in rows})
    strategies = list(dict.fromkeys(row.strategy for row in rows))
    colours = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(strategies)}
    deepest = [row for row in rows if row.depth == depths[-1]]

    figure = plt.figure(figsize=(11, 2.6 * len(depths) + 3.4), layout="constrained")
    profiles_part, heatmaps_part = figure.subfigures(2, 1, height_ratios=[2.6 * len(depths), 3.4])
    _draw_profiles(profiles_part, rows, depths, colours, metric)
    _draw_heatmaps(heatmaps_part, store, deepest, metric)

    figure.savefig(path, dpi=PNG_DPI)
    plt.close(figure)
    logger.info("wrote sweep figure %s", path)
    return path


def _draw_profiles(part: Any, rows: list[SummaryRow], depths: list[int], colours: dict, metric: str) -> None:
    axes = part.subplots(len(depths), 2, squeeze=False)
    part.suptitle(f"{metric} against layer (mean over seeds)", fontsize=12)
    for row_index, depth in enumerate(depths):
        for column, (phase, title) in enumerate((("init", "initialization"), ("final", "end of training"))):
            ax = axes[row_index][column]
            log_scale = True
            steps: list[int] = []
            for row in (r for r in rows if r.depth == depth):
                profile = row.init_profile if phase == "init" else row.final_profile
                steps += row.init_steps if phase == "init" else row.final_steps
                # NaN and Inf leave a gap in the line.
                values = np.array([v if math.isfinite(v) else np.nan for v in profile])
                log_scale = log_scale and bool(np.all(values[np.isfinite(values)] > 0))
                label = row.strategy + (" (diverged)" if row.diverged_steps else "")
                ax.plot(np.arange(len(values)), values, marker="o", markersize=3, color=colours[row.strategy], label=label)
            if log_scale:
                ax.set_yscale("log")
            ax.set_title(f"L={depth}, {title}{_steps_text(steps)}", fontsize=10)
            ax.set_xlabel("layer" if row_index == len(depths) - 1 else "")
            ax.set_ylabel(metric if column == 0 else "")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, which="major", alpha=0.3)
        # A legend per depth, since a strategy can diverge at one depth only.
        axes[row_index][1].legend(fontsize=8, loc="best")


def _steps_text(steps: Sequence[int]) -> str:
    unique = sorted(set(steps))
    if not unique:
        return ""
    if len(unique) == 1:
        return f" (step {unique[0]})"
    return f" (steps {unique[0]}-{unique[-1]})"


def run_heatmap(store: Store, run_id: str, metric: str, depth: int, max_columns: int = HEATMAP_COLUMNS) -> HeatmapData:
    """Return the layer-by-step history of `metric` in run `run_id`, in at most `max_columns` step bins."""
    history = LayerStepHistory(depth, max_columns=max_columns)
    for step in store.recorded_steps(run_id, metric):
        profile = store.block_profile(run_id, metric, step)
        if len(profile) == depth:
            history.add(step, profile)
    return history.data()


def _draw_heatmaps(part: Any, store: Store, rows: list[SummaryRow], metric: str) -> None:
    import matplotlib
    from matplotlib.colors import ListedColormap, LogNorm

    depth = rows[0].depth
    runs = []
    for row in rows:
        seed = row.seeds[0]
        run = next(r for r in store.list_runs() if r.strategy == row.strategy and r.depth == depth and r.seed == seed)
        runs.append((row.strategy, seed, run_heatmap(store, run.run_id, metric, depth)))

    positive = np.concatenate([data.values[np.isfinite(data.values) & (data.values > 0)] for _, _, data in runs])
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    any_nonfinite = any(data.nonfinite.any() for _, _, data in runs)
    legend = "log colour scale; red: NaN or Inf" if any_nonfinite else "log colour scale"
    part.suptitle(f"{metric}, layer by step, L={depth} ({legend})", fontsize=12)
    axes = part.subplots(1, len(runs), squeeze=False)[0]
    colour_map = matplotlib.colormaps["viridis"].with_extremes(bad=MISSING_COLOUR)
    image = None
    for ax, (strategy, seed, data) in zip(axes, runs):
        # Zero, negative and missing values have no log and are drawn grey.
        values = np.ma.masked_invalid(np.where(data.values > 0, data.values, np.nan).T)
        image = ax.imshow(values, aspect="auto", origin="lower", norm=norm, cmap=colour_map, interpolation="nearest")
        if data.nonfinite.any():
            overlay = np.ma.masked_where(~data.nonfinite.T, np.ones(data.nonfinite.T.shape))
            ax.imshow(overlay, aspect="auto", origin="lower", cmap=ListedColormap([NONFINITE_COLOUR]), interpolation="nearest")
        ax.set_title(f"{strategy} (seed {seed})", fontsize=10)
        ax.set_xlabel("training step" + (f" (bins of {data.bin_steps})" if data.bin_steps > 1 else ""))
        ax.set_ylabel("layer")
        ticks = np.unique(np.linspace(0, len(data.starts) - 1, min(len(data.starts), 5)).round().astype(int))
        ax.set_xticks(ticks, [str(int(data.starts[t])) for t in ticks])
        ax.yaxis.get_major_locator().set_params(integer=True)
    if image is not None and norm is not None:
        part.colorbar(image, ax=list(axes), label=metric, shrink=0.9)
