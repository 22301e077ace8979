"""Position-wise feed-forward networks (the `F` of a transformer block).

Projection names define the parameter roles the watch reports: `fc_in` and
`fc_gate` are `mlp.in`, `fc_out` is `mlp.out`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stabiliscope.errors import ConfigError

FFN_TYPES = ("swiglu", "gelu", "relu")


def ffn_hidden_size(ffn_type: str, width: int) -> int:
    """Return the hidden size of the FFN.

    GELU and ReLU use `4 * width`. SwiGLU has three matrices instead of two, so
    it uses `8/3 * width` rounded up to a multiple of 8, which keeps the
    parameter count close to the two-matrix FFN (Shazeer 2020).
    """
    if ffn_type == "swiglu":
        return 8 * ((8 * width // 3 + 7) // 8)
    return 4 * width


class FeedForward(nn.Module):
    """FFN with a SwiGLU, GELU or ReLU nonlinearity and no biases."""

    def __init__(self, width: int, ffn_type: str = "swiglu") -> None:
        super().__init__()
        if ffn_type not in FFN_TYPES:
            raise ConfigError(f"unknown FFN type {ffn_type!r}; expected one of: {', '.join(FFN_TYPES)}")
        self.ffn_type = ffn_type
        hidden = ffn_hidden_size(ffn_type, width)

        self.fc_in = nn.Linear(width, hidden, bias=False)
        self.fc_gate = nn.Linear(width, hidden, bias=False) if ffn_type == "swiglu" else None
        self.fc_out = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            hidden = F.silu(self.fc_gate(x)) * self.fc_in(x)
        elif self.ffn_type == "gelu":
            hidden = F.gelu(self.fc_in(x))
        else:
            hidden = F.relu(self.fc_in(x))
        return self.fc_out(hidden)
