"""Normalization layers used by the reference transformer.

`make_norm` is the one place that turns a norm name into a module, so a
strategy never constructs norms itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stabiliscope.errors import ConfigError

NORM_TYPES = ("rms", "layer")
# Element-wise replacements of a norm that strategies may request.
NORM_REPLACEMENTS = ("dyt",)


class RMSNorm(nn.Module):
    """Root-mean-square normalization over the last dimension with a learned gain.

    `y = g * x / sqrt(mean(x^2) + eps)` (Zhang and Sennrich 2019). The statistic
    is taken in float32 whatever the input dtype, and the output is cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        inv_rms = torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x_float * inv_rms).type_as(x) * self.weight


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with a learned gain and bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class DynamicTanh(nn.Module):
    """Dynamic Tanh, `y = g * tanh(s * x) + b` (Zhu et al. 2025, "Transformers without Normalization").

    `s` is one learned scalar, initialized to 0.5 as the paper recommends for
    non-LLM widths; `g` and `b` are per-feature gain and bias, like LayerNorm's.
    """

    def __init__(self, dim: int, init_scale: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), init_scale))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.scale * x) * self.weight + self.bias


def make_norm(norm_type: str, dim: int) -> nn.Module:
    """Build the norm named `norm_type` ("rms", "layer" or "dyt") over `dim` features."""
    if norm_type == "rms":
        return RMSNorm(dim)
    if norm_type == "layer":
        return LayerNorm(dim)
    if norm_type == "dyt":
        return DynamicTanh(dim)
    raise ConfigError(f"unknown norm type {norm_type!r}; expected one of: {', '.join(NORM_TYPES)}")
