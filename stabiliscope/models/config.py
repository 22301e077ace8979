"""Configuration of the reference transformer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stabiliscope.errors import ConfigError
from stabiliscope.models.ffn import FFN_TYPES
from stabiliscope.models.init import INITS
from stabiliscope.models.norms import NORM_TYPES
from stabiliscope.models.strategies import get_strategy

EMBED_SCALES = ("default", "sqrt_d")


@dataclass
class ModelConfig:
    """Shape and wiring of the reference decoder-only language model."""

    depth: int = 4
    width: int = 128
    heads: int = 4
    strategy: str = "pre"
    norm: str = "rms"  # "rms" or "layer"
    ffn: str = "swiglu"  # "swiglu", "gelu" or "relu"
    # "auto" takes the strategy's default: "deepnet" for deepnorm, otherwise
    # "megatron", the HybridNorm paper's setting.
    init: str = "auto"
    vocab_size: int = 256  # byte-level tokens
    max_seq_len: int = 256  # length of the precomputed rotary table
    # "default" keeps the embedding at its init scale; "sqrt_d" rescales it so
    # each token vector has squared norm about `width` (Xiong et al. 2020).
    embed_scale: str = "default"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def resolved_init(self) -> str:
        """The init scheme actually used: `init`, or the strategy's default for "auto"."""
        return get_strategy(self.strategy).default_init if self.init == "auto" else self.init

    @property
    def resolved_norm(self) -> str:
        """The norm actually used: the strategy's replacement (DyT) or `norm`."""
        return get_strategy(self.strategy).norm_type or self.norm

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what is accepted."""
        for name in ("depth", "width", "heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads != 0:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"width / heads = {self.head_dim} is odd; rotary embeddings need an even head size"
            )
        get_strategy(self.strategy)
        _check_choice("norm", self.norm, NORM_TYPES)
        _check_choice("ffn", self.ffn, FFN_TYPES)
        _check_choice("init", self.init, ("auto", *INITS))
        _check_choice("embed_scale", self.embed_scale, EMBED_SCALES)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(field: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"unknown {field} {value!r}; expected one of: {', '.join(accepted)}")
