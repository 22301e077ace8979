"""Discovery of transformer blocks, hook positions and parameter roles.

A `ModelMap` records, for each block of a model, which module's output is the
attention branch output (`attn_out`), which is the FFN branch output
(`mlp_out`), and which parameters play each role (`attn.q`, ..., `norm`).
The watch attaches its hooks from this map and never changes the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from stabiliscope.errors import DiscoveryError

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "norm")


@dataclass(frozen=True)
class ModelLayout:
    """Where the blocks are and how parameter names inside a block map to roles.

    `blocks` is the dotted path of the `nn.ModuleList` of blocks. `roles` maps a
    role to regular expressions matched against parameter names relative to a
    block. `attn_out` and `mlp_out` list dotted paths, relative to a block, of
    the modules whose outputs are the branch outputs. The first path that
    exists in a block is used.
    """

    name: str
    blocks: str
    roles: dict[str, tuple[str, ...]]
    attn_out: tuple[str, ...]
    mlp_out: tuple[str, ...]
    # (path, side) pairs: the stream between the sublayers is the "input" or
    # the "output" of the module at `path`; the first that exists is used.
    resid_mid: tuple[tuple[str, str], ...] = ()
    # Path of the attention module, whose q and k give the attention logits
    # when it offers `capture_qk` (the reference model's attention does).
    attention: tuple[str, ...] = ()


REFERENCE_LAYOUT = ModelLayout(
    name="stabiliscope reference transformer",
    blocks="blocks",
    roles={
        "attn.q": (r"^attn\.q\.weight$",),
        "attn.k": (r"^attn\.k\.weight$",),
        "attn.v": (r"^attn\.v\.weight$",),
        "attn.o": (r"^attn\.o\.weight$",),
        "mlp.in": (r"^mlp\.fc_in\.weight$", r"^mlp\.fc_gate\.weight$"),
        "mlp.out": (r"^mlp\.fc_out\.weight$",),
        "norm": (r"(^|\.)(norm_\w+|\w+_norm)\.(weight|bias)$",),
    },
    # Peri-LN normalizes the attention output before the residual add, so the
    # branch output is that norm's output when the block has one.
    attn_out=("norm_attn_out", "attn"),
    mlp_out=("norm_mlp_out", "mlp"),
    resid_mid=(("norm_mid", "output"), ("norm_mlp_in", "input"), ("mlp", "input")),
    attention=("attn",),
)


@dataclass(frozen=True)
class ParamSlice:
    """A parameter, or a contiguous block of its rows or columns, that plays one role.

    `dim` is None when the whole parameter belongs to the role. A fused QKV
    weight yields three slices of one parameter, one each for `attn.q`,
    `attn.k` and `attn.v`, along the output dimension (`dim=0` for
    `nn.Linear`, `dim=1` for GPT-2's `Conv1D`).
    """

    name: str
    param: nn.Parameter
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the part of `tensor` (shaped like the parameter) that this slice covers."""
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True)
class HookPoint:
    """A stream position read from the input or the output of a module."""

    module: nn.Module
    side: str  # "input" or "output"


@dataclass
class BlockMap:
    """Hook targets and parameters of one block.

    `module` is the block itself: its input is `resid_pre` and its output
    `resid_post`. `attn_out` and `mlp_out` are modules whose outputs are the
    branch outputs. A position the model does not expose is None.
    """

    index: int
    module: nn.Module
    attn_out: nn.Module | None
    mlp_out: nn.Module | None
    params: dict[str, list[ParamSlice]] = field(default_factory=dict)
    resid_mid: HookPoint | None = None
    attention: nn.Module | None = None


@dataclass
class ModelMap:
    """The blocks of a model, in forward order, and the layout that found them."""

    layout: ModelLayout
    blocks: list[BlockMap]

    @property
    def roles(self) -> list[str]:
        """Roles present in at least one block, in `ROLES` order."""
        present = {role for block in self.blocks for role, params in block.params.items() if params}
        return [role for role in ROLES if role in present]

    def describe(self) -> str:
        """Return a block-by-block text listing of what was discovered."""
        lines = [f"{self.layout.name}: {len(self.blocks)} blocks at '{self.layout.blocks}'"]
        for block in self.blocks:
            lines.append(f"block {block.index}:")
            for role in self.roles:
                names = ", ".join(part.name for part in block.params.get(role, [])) or "-"
                lines.append(f"  {role:8s} {names}")
        return "\n".join(lines)


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _first_module(block: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        module = _get_submodule(block, path)
        if module is not None:
            return module
    return None


def _first_hook_point(block: nn.Module, candidates: tuple[tuple[str, str], ...]) -> HookPoint | None:
    for path, side in candidates:
        module = _get_submodule(block, path)
        if module is not None:
            return HookPoint(module, side)
    return None


def _match_role(name: str, patterns: dict[str, list[re.Pattern]]) -> str | None:
    for role, role_patterns in patterns.items():
        if any(pattern.search(name) for pattern in role_patterns):
            return role
    return None


def map_model(model: nn.Module, layout: ModelLayout) -> ModelMap:
    """Map `model` with `layout`; raises DiscoveryError when the blocks are not found."""
    blocks = _get_submodule(model, layout.blocks)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise DiscoveryError(
            f"{type(model).__name__} has no non-empty nn.ModuleList at '{layout.blocks}' "
            f"(expected by the {layout.name} layout)"
        )

    patterns = {role: [re.compile(p) for p in ps] for role, ps in layout.roles.items()}
    block_maps = []
    for index, block in enumerate(blocks):
        params: dict[str, list[ParamSlice]] = {role: [] for role in layout.roles}
        for name, param in block.named_parameters():
            role = _match_role(name, patterns)
            if role is not None:
                params[role].append(ParamSlice(name, param))
        block_maps.append(
            BlockMap(
                index=index,
                module=block,
                attn_out=_first_module(block, layout.attn_out),
                mlp_out=_first_module(block, layout.mlp_out),
                params=params,
                resid_mid=_first_hook_point(block, layout.resid_mid),
                attention=_first_module(block, layout.attention),
            )
        )
    return ModelMap(layout=layout, blocks=block_maps)


def discover(model: nn.Module) -> ModelMap:
    """Find the blocks and parameter roles of a supported model.

    Raises DiscoveryError naming the model class when no known layout fits.
    """
    from stabiliscope.models.transformer import TransformerLM

    if isinstance(model, TransformerLM):
        return map_model(model, REFERENCE_LAYOUT)

    children = ", ".join(f"{name} ({type(child).__name__})" for name, child in model.named_children())
    raise DiscoveryError(
        f"cannot find transformer blocks in {type(model).__name__}; top-level modules: {children or 'none'}. "
        "Supported: the stabiliscope reference transformer"
    )
