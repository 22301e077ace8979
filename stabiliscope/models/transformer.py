"""The reference decoder-only language model.

Reads top to bottom in the order data flows: a block, then the model. The
norms of a block come from its `BlockLayout` (see strategies.py). A norm the
layout does not request is `None`, so the module tree shows the wiring.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stabiliscope.models.attention import CausalSelfAttention
from stabiliscope.models.config import ModelConfig
from stabiliscope.models.ffn import FeedForward
from stabiliscope.models.init import initialize
from stabiliscope.models.norms import make_norm
from stabiliscope.models.strategies import BlockLayout, get_strategy


class Block(nn.Module):
    """One transformer block wired by a `BlockLayout`.

    In order: `norm_attn_in`, `attn`, `norm_attn_out`, residual add, `norm_mid`,
    `norm_mlp_in`, `mlp`, `norm_mlp_out`, residual add, `norm_post`.
    """

    def __init__(self, config: ModelConfig, layout: BlockLayout) -> None:
        super().__init__()
        width, norm = config.width, config.resolved_norm
        self.residual_scale = layout.residual_scale
        self.norm_output_scale = layout.norm_output_scale

        def optional_norm(enabled: bool) -> nn.Module | None:
            return make_norm(norm, width) if enabled else None

        self.norm_attn_in = optional_norm(layout.attn_in_norm)
        head_norm_type = "rms" if norm == "dyt" else norm
        self.attn = CausalSelfAttention(width, config.heads, config.max_seq_len, head_norm_type, layout.head_norm)
        self.norm_attn_out = optional_norm(layout.attn_out_norm)
        self.norm_mid = optional_norm(layout.mid_norm)
        self.norm_mlp_in = optional_norm(layout.mlp_in_norm)
        self.mlp = FeedForward(width, config.ffn)
        self.norm_mlp_out = optional_norm(layout.mlp_out_norm)
        self.norm_post = optional_norm(layout.post_norm)

    def _maybe_norm(self, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        if self.norm_output_scale != 1.0:
            return norm(x) * self.norm_output_scale
        return norm(x)

    def _residual(self, stream: torch.Tensor) -> torch.Tensor:
        return stream if self.residual_scale == 1.0 else stream * self.residual_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_out = self._maybe_norm(self.norm_attn_out, self.attn(self._maybe_norm(self.norm_attn_in, x)))
        resid_mid = self._maybe_norm(self.norm_mid, self._residual(x) + attn_out)

        mlp_out = self._maybe_norm(self.norm_mlp_out, self.mlp(self._maybe_norm(self.norm_mlp_in, resid_mid)))
        return self._maybe_norm(self.norm_post, self._residual(resid_mid) + mlp_out)


class TransformerLM(nn.Module):
    """Decoder-only byte-level language model with tied input and output embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        strategy = get_strategy(config.strategy)

        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(Block(config, layout) for layout in strategy.block_layouts(config.depth))
        self.norm_final = make_norm(config.resolved_norm, config.width) if strategy.final_norm else None
        self.register_buffer("embed_multiplier", torch.ones(()))

        initialize(self, config.resolved_init, config.width, config.depth)
        if config.embed_scale == "sqrt_d":
            # Scale so that E[||e||^2] = d for a token vector e: divide by the
            # embedding's standard deviation at initialization.
            self.embed_multiplier.fill_(1.0 / self.tok_emb.weight.detach().std().item())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return logits of shape (B, T, vocab) and, given targets, the mean cross-entropy."""
        x = self.tok_emb(idx) * self.embed_multiplier  # (B, T, d)

        for block in self.blocks:
            x = block(x)
        if self.norm_final is not None:
            x = self.norm_final(x)

        logits = F.linear(x, self.tok_emb.weight)  # tied LM head
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


def build_model(config: ModelConfig) -> TransformerLM:
    """Validate `config` and build an initialized reference model on the CPU."""
    return TransformerLM(config)
