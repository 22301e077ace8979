"""Causal multi-head self-attention with rotary positions and optional QK/QKV-Norm."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stabiliscope.models.norms import make_norm

HEAD_NORM_MODES = ("none", "qk", "qkv")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer, eq. 34).

    Rotates consecutive halves of each head's features: the first `d_head/2`
    features pair with the second half, as in GPT-NeoX and Llama.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (T, d_head/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, d_head)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x` of shape (B, n_heads, T, d_head)."""
        seq_len = x.shape[-2]
        cos = self.cos[:seq_len].to(x.dtype)
        sin = self.sin[:seq_len].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    """Causal self-attention with separate q, k, v, o projections and no biases.

    `head_norm` selects QK-Norm ("qk") or QKV-Norm ("qkv"): each head's q, k
    (and v) is normalized over `d_head` with one gain vector shared by the
    heads, before the rotary embedding is applied.

    When `capture_qk` is True, each forward stores the detached q and k that
    enter the attention product, shaped (B, n_heads, T, d_head), in
    `captured_qk`. A watch sets the flag to measure attention logits, and it
    clears the stored tensors after reading them.
    """

    capture_qk: bool = False
    captured_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(
        self,
        width: int,
        heads: int,
        max_seq_len: int,
        norm_type: str = "rms",
        head_norm: str = "none",
    ) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads

        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, max_seq_len)

        use_qk = head_norm in ("qk", "qkv")
        self.q_norm = make_norm(norm_type, self.head_dim) if use_qk else None
        self.k_norm = make_norm(norm_type, self.head_dim) if use_qk else None
        self.v_norm = make_norm(norm_type, self.head_dim) if head_norm == "qkv" else None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape (B, T, width) to (B, n_heads, T, d_head)."""
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, width = x.shape

        q = self.split_heads(self.q(x))
        k = self.split_heads(self.k(x))
        v = self.split_heads(self.v(x))

        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)

        q = self.rotary(q)
        k = self.rotary(k)
        if self.capture_qk:
            self.captured_qk = (q.detach(), k.detach())

        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(batch, seq_len, width)
        return self.o(y)
