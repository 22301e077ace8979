"""Weight initialization schemes of the reference model.

Every scheme sets all matrices and the token embedding; norm gains start at 1
and norm biases at 0. The "output projections" are the attention output W_O
and the FFN output projection, the two matrices that write into the residual
stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stabiliscope.models.strategies import deepnorm_beta


def _is_output_projection(name: str) -> bool:
    return name.endswith("attn.o.weight") or name.endswith("mlp.fc_out.weight")


def _normal(tensor: torch.Tensor, std: float) -> None:
    nn.init.normal_(tensor, mean=0.0, std=std)


def _truncated_normal(tensor: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)


def init_normal(name: str, tensor: torch.Tensor, width: int, depth: int) -> None:
    """N(0, 0.02) for every matrix and the embedding."""
    _normal(tensor, 0.02)


def init_gpt2(name: str, tensor: torch.Tensor, width: int, depth: int) -> None:
    """N(0, 0.02), output projections divided by sqrt(2L) (Radford et al. 2019, GPT-2)."""
    std = 0.02 / math.sqrt(2 * depth) if _is_output_projection(name) else 0.02
    _normal(tensor, std)


def init_megatron(name: str, tensor: torch.Tensor, width: int, depth: int) -> None:
    """SmallInit std sqrt(2 / (5d)) (Nguyen and Salazar 2019), output projections
    divided by sqrt(2L) as in Megatron-LM, truncated at 3 standard deviations."""
    std = math.sqrt(2.0 / (5.0 * width))
    if _is_output_projection(name):
        std /= math.sqrt(2 * depth)
    _truncated_normal(tensor, std)


def init_xavier(name: str, tensor: torch.Tensor, width: int, depth: int) -> None:
    """Xavier-normal (Glorot and Bengio 2010) everywhere, Xiong et al. 2020's setting."""
    nn.init.xavier_normal_(tensor)


DEEPNET_SCALED = ("attn.v.weight", "attn.o.weight", "mlp.fc_in.weight", "mlp.fc_gate.weight", "mlp.fc_out.weight")


def _is_deepnet_scaled(name: str) -> bool:
    return name.endswith(DEEPNET_SCALED)


def init_deepnet(name: str, tensor: torch.Tensor, width: int, depth: int) -> None:
    """Xavier-normal, with gain b = (8L)^(-1/4) on W_V, W_O and the FFN (Wang et al. 2022, DeepNet)."""
    gain = deepnorm_beta(depth) if _is_deepnet_scaled(name) else 1.0
    nn.init.xavier_normal_(tensor, gain=gain)


INITS = {
    "normal": init_normal,
    "gpt2": init_gpt2,
    "megatron": init_megatron,
    "xavier": init_xavier,
    "deepnet": init_deepnet,
}


@torch.no_grad()
def initialize(model: nn.Module, init: str, width: int, depth: int) -> None:
    """Initialize every parameter of `model` in place with the scheme `init`.

    Matrices (2-D parameters, the embedding included) follow the scheme; 1-D
    parameters are norm gains (set to 1) or norm biases (set to 0). DyT's
    scalar `scale` keeps the value its module set.
    """
    scheme = INITS[init]
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            scheme(name, param, width, depth)
        elif name.endswith(".scale"):
            continue
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
