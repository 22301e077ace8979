"""Registry of normalization strategies: where each block puts its norms.

A strategy maps (layer index, depth) to a `BlockLayout`, the switches that
`Block` reads. Adding a strategy is one `register_strategy` call.

Notation in the equations: `x` block input, `N` the norm, `A` causal
self-attention (`A_qkv` with QKV-Norm inside), `F` the FFN, `l` the 0-based
block index, `L` the depth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from stabiliscope.errors import ConfigError


@dataclass(frozen=True)
class BlockLayout:
    """Placement of the norms inside one block.

    Each flag adds one norm. `attn_in_norm` and `mlp_in_norm` normalize a
    sublayer's input (Pre-Norm). `attn_out_norm` and `mlp_out_norm` normalize
    a sublayer's output before the residual add (Peri-LN). `mid_norm` and
    `post_norm` normalize the stream after the attention and the FFN residual
    adds (Post-Norm). `head_norm` is "none", "qk" or "qkv".
    """

    attn_in_norm: bool = False
    attn_out_norm: bool = False
    mid_norm: bool = False
    mlp_in_norm: bool = False
    mlp_out_norm: bool = False
    post_norm: bool = False
    head_norm: str = "none"


PRE = BlockLayout(attn_in_norm=True, mlp_in_norm=True)
POST = BlockLayout(mid_norm=True, post_norm=True)
HYBRID = BlockLayout(mid_norm=True, head_norm="qkv")


@dataclass(frozen=True)
class NormStrategy:
    """A named normalization strategy of the reference model.

    `layout(layer, depth)` returns the block layout of block `layer`;
    `final_norm` is True when a norm sits between the last block and the LM head.
    """

    name: str
    equation: str
    description: str
    layout: Callable[[int, int], BlockLayout]
    final_norm: bool

    def block_layouts(self, depth: int) -> list[BlockLayout]:
        """Return the layout of every block of a model with `depth` blocks."""
        return [self.layout(layer, depth) for layer in range(depth)]


STRATEGIES: dict[str, NormStrategy] = {}


def register_strategy(strategy: NormStrategy) -> NormStrategy:
    """Add `strategy` to `STRATEGIES`; a name can be registered only once."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"normalization strategy {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> NormStrategy:
    """Look up a strategy by name; raises ConfigError listing the known names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        known = ", ".join(STRATEGIES)
        raise ConfigError(f"unknown normalization strategy {name!r}; expected one of: {known}") from None


def _hybrid_star_layout(layer: int, depth: int) -> BlockLayout:
    if layer == 0:
        return replace(PRE, head_norm="qkv")
    return HYBRID


register_strategy(
    NormStrategy(
        name="post",
        equation="y = N(x + A(x)); x' = N(y + F(y))",
        description="Post-Norm, the original Transformer (Xiong et al. 2020, Post-LN)",
        layout=lambda layer, depth: POST,
        final_norm=False,
    )
)
register_strategy(
    NormStrategy(
        name="pre",
        equation="y = x + A(N(x)); x' = y + F(N(y))",
        description="Pre-Norm, with a final norm before the LM head",
        layout=lambda layer, depth: PRE,
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="pre_qk",
        equation="y = x + A_qk(N(x)); x' = y + F(N(y))",
        description="Pre-Norm with QK-Norm in attention (Dehghani et al. 2023; Wortsman et al. 2023)",
        layout=lambda layer, depth: replace(PRE, head_norm="qk"),
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="hybrid",
        equation="y = x + A_qkv(x); z = N(y); x' = z + F(z)",
        description="HybridNorm (Zhuo et al. 2025): QKV-Norm in attention, Post-Norm in the FFN",
        layout=lambda layer, depth: HYBRID,
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="hybrid_star",
        equation="l = 0: y = x + A_qkv(N(x)); x' = y + F(N(y)); l >= 1: hybrid",
        description="HybridNorm* (Zhuo et al. 2025): Pre-Norm in both sublayers of the first block",
        layout=_hybrid_star_layout,
        final_norm=True,
    )
)
