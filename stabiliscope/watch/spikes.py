"""Loss-spike detection on the device with a robust z-score.

The score of a value `x` against the trailing window `w` is the modified
z-score `(x - median(w)) / (1.4826 * MAD(w))` (Iglewicz and Hoaglin 1993);
1.4826 makes the MAD a consistent estimator of the standard deviation for
normal data. Only upward departures count as spikes.
"""

from __future__ import annotations

import torch

MAD_TO_STD = 1.4826


class SpikeDetector:
    """Trailing-window robust z-scores for several scalar series at once.

    The window lives on the device; `score` launches a few small kernels and
    never synchronises with the host. The number of values seen so far is
    counted on the host, so no device value is needed to know whether the
    window is full enough.
    """

    def __init__(self, series: int, window: int, threshold: float, min_history: int, device: torch.device) -> None:
        if window < 2:
            raise ValueError(f"spike window must be at least 2 values, got {window}")
        if not 1 <= min_history <= window:
            raise ValueError(f"spike min_history must be in [1, window={window}], got {min_history}")
        self.window = window
        self.threshold = threshold
        self.min_history = min_history
        self.history = torch.zeros(series, window, device=device)
        self.seen = 0

    def score(self, values: torch.Tensor) -> torch.Tensor:
        """Score `values` (one per series), then add them to the window.

        Returns a tensor of shape (series, 3): spike flag (1.0 or 0.0), the
        z-score and the window median. Before `min_history` values have been
        seen the flag is 0 and the score NaN. Non-finite values are never
        flagged as spikes and are left out of the window.
        """
        filled = min(self.seen, self.window)
        result = torch.full((values.shape[0], 3), float("nan"), device=values.device)
        result[:, 0] = 0.0

        if filled >= self.min_history:
            window = self.history[:, :filled]
            # quantile(0.5) averages the two middle values of an even window,
            # where Tensor.median would return the lower one.
            median = window.quantile(0.5, dim=1)
            mad = (window - median[:, None]).abs().quantile(0.5, dim=1)
            # A flat window (MAD 0) would turn any rounding change into a spike,
            # so the scale never drops below 1 % of the median.
            floor = (1e-2 * median.abs()).clamp_min(torch.finfo(torch.float32).tiny)
            scale = torch.maximum(MAD_TO_STD * mad, floor)
            zscore = (values - median) / scale
            result[:, 0] = (zscore > self.threshold).float()
            result[:, 1] = zscore
            result[:, 2] = median

        slot = self.seen % self.window
        finite = torch.isfinite(values)
        previous = self.history[:, slot - 1] if self.seen > 0 else values.nan_to_num(0.0)
        self.history[:, slot] = torch.where(finite, values, previous)
        self.seen += 1
        return result
