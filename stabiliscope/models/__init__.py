"""Reference transformer, normalization strategies and initializations."""

from stabiliscope.models.config import EMBED_SCALES, ModelConfig
from stabiliscope.models.ffn import FFN_TYPES
from stabiliscope.models.init import INITS as INIT_SCHEMES
from stabiliscope.models.norms import NORM_TYPES
from stabiliscope.models.strategies import (
    STRATEGIES,
    BlockLayout,
    NormStrategy,
    get_strategy,
    register_strategy,
)
from stabiliscope.models.transformer import Block, TransformerLM, build_model

INITS: tuple[str, ...] = tuple(INIT_SCHEMES)

__all__ = [
    "EMBED_SCALES",
    "FFN_TYPES",
    "INITS",
    "NORM_TYPES",
    "STRATEGIES",
    "Block",
    "BlockLayout",
    "ModelConfig",
    "NormStrategy",
    "TransformerLM",
    "build_model",
    "get_strategy",
    "register_strategy",
]
