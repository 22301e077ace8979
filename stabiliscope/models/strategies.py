"""Registry of normalization strategies: where each block puts its norms.

A strategy maps (layer index, depth) to a `BlockLayout`, the switches that
`Block` reads. Adding a strategy is one `register_strategy` call.

Notation in the equations: `x` block input, `N` the norm, `A` causal
self-attention (`A_qkv` with QKV-Norm inside), `F` the FFN, `l` the 0-based
block index, `L` the depth.
"""

from __future__ import annotations

import math
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
    # DeepNorm's `a`: the residual stream is multiplied by it before each add.
    residual_scale: float = 1.0
    # LayerNorm Scaling multiplies the output of each norm in the block by it.
    norm_output_scale: float = 1.0


PRE = BlockLayout(attn_in_norm=True, mlp_in_norm=True)
POST = BlockLayout(mid_norm=True, post_norm=True)
HYBRID = BlockLayout(mid_norm=True, head_norm="qkv")


@dataclass(frozen=True)
class NormStrategy:
    """A named normalization strategy of the reference model.

    `layout(layer, depth)` returns the block layout of block `layer`;
    `final_norm` is True when a norm sits between the last block and the LM head.
    `norm_type`, when set, replaces the model's norm everywhere (DyT);
    `default_init` is the init this strategy uses when none is requested.
    """

    name: str
    equation: str
    description: str
    layout: Callable[[int, int], BlockLayout]
    final_norm: bool
    norm_type: str | None = None
    default_init: str = "megatron"

    def block_layouts(self, depth: int) -> list[BlockLayout]:
        """Return the layout of every block of a model with `depth` blocks."""
        return [self.layout(layer, depth) for layer in range(depth)]


STRATEGIES: dict[str, NormStrategy] = {}
# Other names of registered strategies, accepted wherever a name is.
STRATEGY_ALIASES: dict[str, str] = {"sandwich": "peri"}


def register_strategy(strategy: NormStrategy) -> NormStrategy:
    """Add `strategy` to `STRATEGIES`; a name can be registered only once."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"normalization strategy {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> NormStrategy:
    """Look up a strategy by name or alias; raises ConfigError listing the known names."""
    try:
        return STRATEGIES[STRATEGY_ALIASES.get(name, name)]
    except KeyError:
        known = ", ".join(STRATEGIES)
        raise ConfigError(f"unknown normalization strategy {name!r}; expected one of: {known}") from None


MIX_ALPHA = 0.25  # Mix-LN's fraction of Post-Norm blocks (Li et al. 2024)


def _mix_layout(layer: int, depth: int) -> BlockLayout:
    return POST if layer < math.floor(MIX_ALPHA * depth) else PRE


def deepnorm_alpha(depth: int) -> float:
    """DeepNorm's residual multiplier for a decoder-only stack, `a = (2L)^(1/4)` (Wang et al. 2022, Table 1)."""
    return (2 * depth) ** 0.25


def deepnorm_beta(depth: int) -> float:
    """DeepNorm's init gain for W_V, W_O and the FFN, `b = (8L)^(-1/4)` (Wang et al. 2022, Table 1)."""
    return (8 * depth) ** -0.25


def _hybrid_star_layout(layer: int, depth: int) -> BlockLayout:
    if layer == 0:
        return replace(PRE, head_norm="qkv")
    return HYBRID


register_strategy(
    NormStrategy(
        name="post",
        equation="y = N(x + A(x)); x' = N(y + F(y))",
        description="Post-Norm, the original Transformer (Vaswani et al. 2017); Post-LN in Xiong et al. 2020",
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
register_strategy(
    NormStrategy(
        name="pre_qkv",
        equation="y = x + A_qkv(N(x)); x' = y + F(N(y))",
        description="Pre-Norm with QKV-Norm in attention",
        layout=lambda layer, depth: replace(PRE, head_norm="qkv"),
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="mix",
        equation="l < floor(0.25 L): post; l >= floor(0.25 L): pre",
        description="Mix-LN (Li et al. 2024): Post-Norm in the first quarter of the blocks, Pre-Norm after",
        layout=_mix_layout,
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="peri",
        equation="y = x + N(A(N(x))); x' = y + N(F(N(y)))",
        description="Peri-LN (Kim et al. 2025), the same wiring as Sandwich-LN (Ding et al. 2021); alias sandwich",
        layout=lambda layer, depth: BlockLayout(
            attn_in_norm=True, attn_out_norm=True, mlp_in_norm=True, mlp_out_norm=True
        ),
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="deepnorm",
        equation="y = N(a*x + A(x)); x' = N(a*y + F(y)); a = (2L)^(1/4)",
        description="DeepNet (Wang et al. 2022), decoder-only constants; deepnet init by default",
        layout=lambda layer, depth: replace(POST, residual_scale=deepnorm_alpha(depth)),
        final_norm=False,
        default_init="deepnet",
    )
)
register_strategy(
    NormStrategy(
        name="lns",
        equation="pre, each norm output multiplied by 1/sqrt(l+1)",
        description='LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth")',
        layout=lambda layer, depth: replace(PRE, norm_output_scale=1.0 / math.sqrt(layer + 1)),
        final_norm=True,
    )
)
register_strategy(
    NormStrategy(
        name="dyt",
        equation="pre, with N(x) = g * tanh(s*x) + b",
        description="Dynamic Tanh in place of every norm (Zhu et al. 2025)",
        layout=lambda layer, depth: PRE,
        final_norm=True,
        norm_type="dyt",
    )
)
