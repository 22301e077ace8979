"""Discovery of transformer blocks, hook positions and parameter roles.

A `ModelMap` records, for each block of a model, where each stream position
(`resid_pre`, `attn_out`, `resid_mid`, `mlp_out`, `resid_post`) can be read
and which parameters play each role (`attn.q`, ..., `norm`). The watch
attaches its hooks from this map and never changes the model.

`discover` first unwraps `torch.compile` and data-parallel wrappers, so that
hooks go on the modules that really run. It then tries the built-in layouts
in `LAYOUTS` order and uses the first one whose module paths exist in every
block. A model no built-in layout fits needs a mapping: a `ModelLayout` or a
plain dict in the form that `layout_from_dict` accepts.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stabiliscope.errors import DiscoveryError

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "norm")
STREAM_POSITIONS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
SIDES = ("input", "output")

# Keyword argument that carries the stream tensor when a Hugging Face layer is
# called with keywords instead of positionally.
HIDDEN_STATES_KWARG = "hidden_states"


# ----------------------------------------------------------------- layouts


@dataclass(frozen=True)
class FusedQKV:
    """A fused query/key/value parameter and how it splits into q, k and v.

    `pattern` is a regular expression matched against parameter names
    relative to a block. `dim` is the dimension that stacks the q, k and v
    blocks, in that order: 0 for an `nn.Linear` weight (out, in) and for a
    bias, 1 for a transformers `Conv1D` weight (in, out). `sizes` are the q,
    k and v lengths along `dim`; None splits the dimension into equal thirds.
    """

    pattern: str
    dim: int = 0
    sizes: tuple[int, int, int] | None = None

    def split(self, name: str, param: nn.Parameter) -> list[ParamSlice]:
        """Split `param` into its q, k and v slices. Raises DiscoveryError when the sizes do not fit its shape."""
        if self.dim >= param.dim():
            raise DiscoveryError(
                f"fused QKV parameter '{name}' has shape {tuple(param.shape)}, "
                f"which has no dimension {self.dim} to split"
            )
        length = param.shape[self.dim]
        if self.sizes is None:
            if length % 3 != 0:
                raise DiscoveryError(
                    f"fused QKV parameter '{name}' has {length} entries along dimension {self.dim}, "
                    "which do not split into equal thirds; give the q, k, v sizes in the mapping"
                )
            sizes = (length // 3,) * 3
        else:
            sizes = self.sizes
            if sum(sizes) != length:
                raise DiscoveryError(
                    f"fused QKV sizes {list(sizes)} add up to {sum(sizes)}, but parameter '{name}' "
                    f"has {length} entries along dimension {self.dim} (shape {tuple(param.shape)})"
                )

        slices = []
        start = 0
        for size in sizes:
            slices.append(ParamSlice(name, param, dim=self.dim, start=start, stop=start + size))
            start += size
        return slices

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"pattern": self.pattern, "dim": self.dim}
        if self.sizes is not None:
            result["sizes"] = list(self.sizes)
        return result


@dataclass(frozen=True)
class ModelLayout:
    """Block list path, hook module paths and parameter role rules of one model family.

    `blocks` is the dotted path of the `nn.ModuleList` of blocks. When no
    module has that exact path, a unique module list whose path ends with
    `.<blocks>` is used, so `"layers"` finds `model.layers`. `roles` maps a
    role to regular expressions matched against parameter names relative to
    a block; the first role with a matching pattern wins. `fused_qkv`
    parameters are split into `attn.q`, `attn.k` and `attn.v` slices before
    `roles` is consulted. `attn_out` and `mlp_out` list dotted paths,
    relative to a block, of the modules whose outputs are the branch outputs.
    For every list of paths, the first path that exists in a block is used.
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
    fused_qkv: tuple[FusedQKV, ...] = ()
    # Module paths, relative to a block, that must all exist in every block
    # for a built-in layout to be chosen by `discover`.
    signature: tuple[str, ...] = ()
    # Extra structural test of a block, for layouts that share a signature.
    matches_block: Callable[[nn.Module], bool] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the layout in the plain-dict form that `layout_from_dict` reads back."""
        result: dict[str, Any] = {
            "name": self.name,
            "blocks": self.blocks,
            "roles": {role: list(patterns) for role, patterns in self.roles.items()},
            "attn_out": list(self.attn_out),
            "mlp_out": list(self.mlp_out),
            "resid_mid": [[path, side] for path, side in self.resid_mid],
            "attention": list(self.attention),
        }
        if self.fused_qkv:
            result["fused_qkv"] = [spec.to_dict() for spec in self.fused_qkv]
        return result


def _has_output_features_in_dim(path: str, dim: int) -> Callable[[nn.Module], bool]:
    """Build a block test: the module at `path` stores its output features along weight dimension `dim`."""

    def fits(block: nn.Module) -> bool:
        module = _get_submodule(block, path)
        if dim == 0:
            return isinstance(module, nn.Linear)
        # transformers' Conv1D keeps its output size in `nf` and its weight as (in, out).
        weight = getattr(module, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == getattr(module, "nf", -1)

    return fits


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
    signature=("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc_out"),
)

# Roles of the Hugging Face decoders that follow Llama's module names
# (Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3, OLMo 2, ...). Biases, where a
# model has them, count toward their projection's role.
_HF_DECODER_ROLES = {
    "attn.q": (r"^self_attn\.q_proj\.(weight|bias)$",),
    "attn.k": (r"^self_attn\.k_proj\.(weight|bias)$",),
    "attn.v": (r"^self_attn\.v_proj\.(weight|bias)$",),
    "attn.o": (r"^self_attn\.o_proj\.(weight|bias)$",),
    "mlp.in": (r"^mlp\.gate_proj\.(weight|bias)$", r"^mlp\.up_proj\.(weight|bias)$"),
    "mlp.out": (r"^mlp\.down_proj\.(weight|bias)$",),
    # Block norms (input_layernorm, ...) and per-head q/k norms (q_norm, k_norm).
    "norm": (r"norm\.(weight|bias)$",),
}
_HF_DECODER_SIGNATURE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.down_proj",
)

# Gemma 2/3 and OLMo 2 normalize each sublayer's output before the residual
# add, and there `post_attention_layernorm` is that output norm rather than the
# FFN's input norm. This layout is tried before HF_DECODER_LAYOUT, whose
# signature these models also satisfy.
HF_POST_SUBLAYER_NORM_LAYOUT = ModelLayout(
    name="Hugging Face decoder with norms after each sublayer (Gemma 2/3, OLMo 2)",
    blocks="layers",
    roles=_HF_DECODER_ROLES,
    attn_out=("post_attention_layernorm",),
    mlp_out=("post_feedforward_layernorm",),
    resid_mid=(("pre_feedforward_layernorm", "input"), ("mlp", "input")),
    attention=("self_attn",),
    signature=_HF_DECODER_SIGNATURE + ("post_attention_layernorm", "post_feedforward_layernorm"),
)

HF_DECODER_LAYOUT = ModelLayout(
    name="Hugging Face Llama-style decoder (Llama, Mistral, Qwen2, Qwen3)",
    blocks="layers",
    roles=_HF_DECODER_ROLES,
    attn_out=("self_attn",),
    mlp_out=("mlp",),
    resid_mid=(("post_attention_layernorm", "input"),),
    attention=("self_attn",),
    signature=_HF_DECODER_SIGNATURE + ("input_layernorm", "post_attention_layernorm"),
)

# GPT-2 and nanoGPT share module names. Their fused `c_attn` splits into
# equal q, k, v thirds. NOTE: a grouped-query fused projection, whose k and v
# are shorter than q, is not split automatically, so such a model needs a
# mapping with explicit `sizes`.
_GPT_ROLES = {
    "attn.o": (r"^attn\.c_proj\.(weight|bias)$",),
    "mlp.in": (r"^mlp\.c_fc\.(weight|bias)$",),
    "mlp.out": (r"^mlp\.c_proj\.(weight|bias)$",),
    "norm": (r"^ln_[12]\.(weight|bias)$",),
}
_GPT_SIGNATURE = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")

HF_GPT2_LAYOUT = ModelLayout(
    name="Hugging Face GPT-2",
    blocks="h",
    roles=_GPT_ROLES,
    attn_out=("attn",),
    mlp_out=("mlp",),
    resid_mid=(("ln_2", "input"),),
    attention=("attn",),
    fused_qkv=(FusedQKV(r"^attn\.c_attn\.weight$", dim=1), FusedQKV(r"^attn\.c_attn\.bias$", dim=0)),
    signature=_GPT_SIGNATURE,
    matches_block=_has_output_features_in_dim("attn.c_attn", 1),
)

NANOGPT_LAYOUT = ModelLayout(
    name="nanoGPT-style GPT",
    blocks="h",
    roles=_GPT_ROLES,
    attn_out=("attn",),
    mlp_out=("mlp",),
    resid_mid=(("ln_2", "input"),),
    attention=("attn",),
    fused_qkv=(FusedQKV(r"^attn\.c_attn\.weight$", dim=0), FusedQKV(r"^attn\.c_attn\.bias$", dim=0)),
    signature=_GPT_SIGNATURE,
    matches_block=_has_output_features_in_dim("attn.c_attn", 0),
)

LAYOUTS: tuple[ModelLayout, ...] = (
    REFERENCE_LAYOUT,
    HF_POST_SUBLAYER_NORM_LAYOUT,
    HF_DECODER_LAYOUT,
    HF_GPT2_LAYOUT,
    NANOGPT_LAYOUT,
)
"""Built-in layouts in the order `discover` tries them."""


# ------------------------------------------------------------ user mappings

MAPPING_KEYS = ("name", "blocks", "roles", "attn_out", "mlp_out", "resid_mid", "attention", "fused_qkv")


def mapping_example(blocks: str = "encoder.layers") -> str:
    """Return a one-line JSON example of a mapping whose block list is at `blocks`."""
    example = {
        "blocks": blocks,
        "roles": {"attn.q": [r"^attn\.q_proj\.weight$"], "mlp.out": [r"^mlp\.fc2\.weight$"]},
        "attn_out": ["attn"],
        "mlp_out": ["mlp"],
        "resid_mid": [["norm2", "input"]],
    }
    return json.dumps(example)


def _check_regex(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str):
        raise DiscoveryError(f"mapping {where}: expected a regular expression string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise DiscoveryError(f"mapping {where}: invalid regular expression {pattern!r} ({error})") from None
    return pattern


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    """Read a mapping value that is one string or a list of strings."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise DiscoveryError(f"mapping {key}: expected a module path or a list of module paths, got {value!r}")


def _parse_roles(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise DiscoveryError(f"mapping roles: expected a dict from role to regular expressions, got {value!r}")
    roles = {}
    for role, patterns in value.items():
        if role not in ROLES:
            raise DiscoveryError(f"mapping roles: unknown role {role!r}; expected one of: {', '.join(ROLES)}")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, Sequence) or not patterns:
            raise DiscoveryError(f"mapping roles.{role}: expected a non-empty list of regular expressions, got {patterns!r}")
        roles[role] = tuple(_check_regex(pattern, f"roles.{role}") for pattern in patterns)
    return roles


def _parse_resid_mid(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise DiscoveryError(f"mapping resid_mid: expected a list of [path, side] pairs, got {value!r}")
    pairs = []
    for item in value:
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
            raise DiscoveryError(f"mapping resid_mid: expected a [path, side] pair, got {item!r}")
        path, side = item
        if not isinstance(path, str):
            raise DiscoveryError(f"mapping resid_mid: expected a module path string, got {path!r}")
        if side not in SIDES:
            raise DiscoveryError(f"mapping resid_mid: side {side!r} of '{path}' is invalid; expected 'input' or 'output'")
        pairs.append((path, side))
    return tuple(pairs)


def _parse_fused(value: Any) -> tuple[FusedQKV, ...]:
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise DiscoveryError(f"mapping fused_qkv: expected a dict or a list of dicts, got {value!r}")
    specs = []
    for item in items:
        if not isinstance(item, Mapping):
            raise DiscoveryError(f"mapping fused_qkv: expected a dict with pattern, dim and sizes, got {item!r}")
        unknown = set(item) - {"pattern", "dim", "sizes"}
        if unknown:
            raise DiscoveryError(
                f"mapping fused_qkv: unknown key {sorted(unknown)[0]!r}; expected pattern, dim and optional sizes"
            )
        if "pattern" not in item:
            raise DiscoveryError(f"mapping fused_qkv: missing key 'pattern' in {dict(item)!r}")
        pattern = _check_regex(item["pattern"], "fused_qkv.pattern")
        dim = item.get("dim", 0)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise DiscoveryError(f"mapping fused_qkv.dim: expected a non-negative integer, got {dim!r}")
        sizes = item.get("sizes")
        if sizes is not None:
            valid = (
                isinstance(sizes, Sequence)
                and len(sizes) == 3
                and all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes)
            )
            if not valid:
                raise DiscoveryError(f"mapping fused_qkv.sizes: expected three positive integers [q, k, v], got {sizes!r}")
            sizes = tuple(sizes)
        specs.append(FusedQKV(pattern, dim, sizes))
    return tuple(specs)


def layout_from_dict(mapping: Mapping[str, Any]) -> ModelLayout:
    """Validate a plain-dict mapping and build its `ModelLayout`.

    `blocks` (required) is the dotted path of the block list. `roles` maps a
    role to regular expressions over parameter names relative to a block.
    `attn_out`, `mlp_out` and `attention` are lists of module paths relative
    to a block, and `resid_mid` is a list of `[path, "input"|"output"]`.
    `fused_qkv` is a dict, or a list of dicts, with `pattern`, `dim` and
    optional `sizes` `[q, k, v]`. `name` labels the layout. At least one of
    `roles` and `fused_qkv` is required. Raises DiscoveryError naming the
    first invalid key or value.
    """
    if not isinstance(mapping, Mapping):
        raise DiscoveryError(f"a mapping must be a dict or a ModelLayout, got {type(mapping).__name__}")
    for key in mapping:
        if key not in MAPPING_KEYS:
            raise DiscoveryError(f"mapping: unknown key {key!r}; expected keys: {', '.join(MAPPING_KEYS)}")

    blocks = mapping.get("blocks")
    if not isinstance(blocks, str):
        raise DiscoveryError(f"mapping blocks: expected the dotted path of the block list, got {blocks!r}")
    name = mapping.get("name", "user mapping")
    if not isinstance(name, str):
        raise DiscoveryError(f"mapping name: expected a string, got {name!r}")

    roles = _parse_roles(mapping.get("roles", {}))
    fused = _parse_fused(mapping.get("fused_qkv", []))
    if not roles and not fused:
        raise DiscoveryError("mapping: missing key 'roles' (or 'fused_qkv'); the mapping assigns no parameter to a role")

    return ModelLayout(
        name=name,
        blocks=blocks,
        roles=roles,
        attn_out=_string_list(mapping.get("attn_out", ()), "attn_out"),
        mlp_out=_string_list(mapping.get("mlp_out", ()), "mlp_out"),
        resid_mid=_parse_resid_mid(mapping.get("resid_mid", ())),
        attention=_string_list(mapping.get("attention", ()), "attention"),
        fused_qkv=fused,
    )


def load_mapping(path: str | Path) -> ModelLayout:
    """Read a JSON mapping file and validate it with `layout_from_dict`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DiscoveryError(f"cannot read mapping file '{path}': {error.strerror or error}") from None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise DiscoveryError(f"mapping file '{path}' is not valid JSON: {error}") from None
    return layout_from_dict(mapping)


# -------------------------------------------------------------- model maps


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

    @property
    def label(self) -> str:
        """The name with the covered range in indexing notation, such as `attn.c_attn.weight[:, 0:64]`."""
        if self.dim is None:
            return self.name
        leading = ":, " * self.dim
        return f"{self.name}[{leading}{self.start}:{self.stop}]"


@dataclass(frozen=True)
class HookPoint:
    """A stream position read from the input or the output of a module.

    `path` is the module's dotted path from the mapped model's root ("" for
    the root itself).
    """

    module: nn.Module
    side: str  # "input" or "output"
    path: str = ""

    def read(self, args: tuple, kwargs: Mapping[str, Any] | None, output: Any) -> torch.Tensor | None:
        """Return the stream tensor at this point from a forward hook's arguments.

        An input is the first positional argument, or the `hidden_states`
        keyword argument when the module was called with keywords (register
        the hook with `with_kwargs=True` to receive them). An output that is a
        tuple or list gives its first element, as Hugging Face layers return
        (hidden_states, ...). Returns None when no tensor is found.
        """
        if self.side == "input":
            value = args[0] if args else (kwargs or {}).get(HIDDEN_STATES_KWARG)
        else:
            value = output[0] if isinstance(output, (tuple, list)) and output else output
        return value if isinstance(value, torch.Tensor) else None


@dataclass
class BlockMap:
    """Hook targets and parameters of one block.

    `module` is the block itself: its input is `resid_pre` and its output
    `resid_post`. `attn_out` and `mlp_out` are modules whose outputs are the
    branch outputs. A position the model does not expose is None.
    `positions` contains the same hook targets, and the block's own input
    and output, as `HookPoint`s with module paths. A position the block does
    not expose is absent from it. `unmatched` lists the parameter names that
    no role claimed.
    """

    index: int
    module: nn.Module
    attn_out: nn.Module | None
    mlp_out: nn.Module | None
    params: dict[str, list[ParamSlice]] = field(default_factory=dict)
    resid_mid: HookPoint | None = None
    attention: nn.Module | None = None
    path: str = ""
    positions: dict[str, HookPoint] = field(default_factory=dict)
    attention_path: str | None = None
    unmatched: list[str] = field(default_factory=list)


@dataclass
class ModelMap:
    """The blocks of a model, in forward order, and the layout that found them.

    `blocks_path` is where the block list was found, relative to the mapped
    model. `unwrapped` lists the wrapper attributes followed from the model
    passed to `discover` to the mapped one, such as `("_orig_mod",)` for a
    `torch.compile` result.
    """

    layout: ModelLayout
    blocks: list[BlockMap]
    blocks_path: str = ""
    unwrapped: tuple[str, ...] = ()

    @property
    def roles(self) -> list[str]:
        """Roles present in at least one block, in `ROLES` order."""
        present = {role for block in self.blocks for role, params in block.params.items() if params}
        return [role for role in ROLES if role in present]

    def describe(self) -> str:
        """Format a block-by-block text listing of the hook points and role parameters."""
        blocks_path = self.blocks_path or self.layout.blocks
        count = len(self.blocks)
        lines = [f"{self.layout.name}: {count} block{'' if count == 1 else 's'} at '{blocks_path}'"]
        if self.unwrapped:
            lines.append(f"mapped inside the wrapper at '{'.'.join(self.unwrapped)}'")
        roles = self.roles
        for block in self.blocks:
            lines.append(f"block {block.index}: {block.path or '-'} ({type(block.module).__name__})")
            for position in STREAM_POSITIONS:
                point = block.positions.get(position)
                where = f"{point.path or '<root>'} ({point.side})" if point is not None else "- (not exposed)"
                lines.append(f"  {position:11s} {where}")
            if block.attention_path is not None:
                lines.append(f"  {'attention':11s} {block.attention_path}")
            for role in roles:
                names = ", ".join(part.label for part in block.params.get(role, [])) or "-"
                lines.append(f"  {role:11s} {names}")
            if block.unmatched:
                lines.append(f"  {'no role':11s} {', '.join(block.unmatched)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return the map as JSON-serializable data: the layout and, per block, hook points and role parameters."""
        blocks = []
        for block in self.blocks:
            positions: dict[str, dict[str, str] | None] = {}
            for position in STREAM_POSITIONS:
                point = block.positions.get(position)
                positions[position] = None if point is None else {"module": point.path, "side": point.side}
            params = {
                role: [
                    {
                        "name": part.name,
                        "shape": list(part.param.shape),
                        "dim": part.dim,
                        "start": part.start if part.dim is not None else None,
                        "stop": part.stop if part.dim is not None else None,
                    }
                    for part in block.params.get(role, [])
                ]
                for role in self.roles
            }
            blocks.append(
                {
                    "index": block.index,
                    "path": block.path,
                    "class": type(block.module).__name__,
                    "positions": positions,
                    "attention": block.attention_path,
                    "params": params,
                    "unmatched": list(block.unmatched),
                }
            )
        return {
            "layout": self.layout.to_dict(),
            "blocks_path": self.blocks_path or self.layout.blocks,
            "unwrapped": list(self.unwrapped),
            "depth": len(self.blocks),
            "roles": self.roles,
            "blocks": blocks,
        }


# ---------------------------------------------------------------- mapping


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) else None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _first_module(block: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for path in paths:
        module = _get_submodule(block, path)
        if module is not None:
            return path, module
    return None


def _first_hook_point(block: nn.Module, candidates: tuple[tuple[str, str], ...], prefix: str) -> HookPoint | None:
    for path, side in candidates:
        module = _get_submodule(block, path)
        if module is not None:
            return HookPoint(module, side, _join(prefix, path))
    return None


def _match_role(name: str, patterns: dict[str, list[re.Pattern]]) -> str | None:
    for role, role_patterns in patterns.items():
        if any(pattern.search(name) for pattern in role_patterns):
            return role
    return None


def _is_block_list(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0


def _find_block_lists(root: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """Return the block list at `path`, or else every block list whose path ends with `.<path>`."""
    exact = _get_submodule(root, path)
    if _is_block_list(exact):
        return [(path, exact)]
    suffix = "." + path
    return [(name, module) for name, module in root.named_modules() if name.endswith(suffix) and _is_block_list(module)]


def _block_fits(layout: ModelLayout, block: nn.Module) -> bool:
    if any(_get_submodule(block, path) is None for path in layout.signature):
        return False
    return layout.matches_block is None or layout.matches_block(block)


def _map_block(
    layout: ModelLayout,
    index: int,
    block: nn.Module,
    path: str,
    patterns: dict[str, list[re.Pattern]],
    fused: list[tuple[re.Pattern, FusedQKV]],
) -> BlockMap:
    params: dict[str, list[ParamSlice]] = {role: [] for role in ROLES if role in layout.roles}
    if fused:
        for role in ("attn.q", "attn.k", "attn.v"):
            params.setdefault(role, [])
    unmatched = []
    for name, param in block.named_parameters():
        spec = next((spec for pattern, spec in fused if pattern.search(name)), None)
        if spec is not None:
            for role, part in zip(("attn.q", "attn.k", "attn.v"), spec.split(name, param)):
                params[role].append(part)
            continue
        role = _match_role(name, patterns)
        if role is None:
            unmatched.append(name)
        else:
            params[role].append(ParamSlice(name, param))

    attn_out = _first_module(block, layout.attn_out)
    mlp_out = _first_module(block, layout.mlp_out)
    attention = _first_module(block, layout.attention)
    resid_mid = _first_hook_point(block, layout.resid_mid, path)

    positions = {"resid_pre": HookPoint(block, "input", path)}
    if attn_out is not None:
        positions["attn_out"] = HookPoint(attn_out[1], "output", _join(path, attn_out[0]))
    if resid_mid is not None:
        positions["resid_mid"] = resid_mid
    if mlp_out is not None:
        positions["mlp_out"] = HookPoint(mlp_out[1], "output", _join(path, mlp_out[0]))
    positions["resid_post"] = HookPoint(block, "output", path)

    return BlockMap(
        index=index,
        module=block,
        attn_out=attn_out[1] if attn_out else None,
        mlp_out=mlp_out[1] if mlp_out else None,
        params=params,
        resid_mid=resid_mid,
        attention=attention[1] if attention else None,
        path=path,
        positions=positions,
        attention_path=_join(path, attention[0]) if attention else None,
        unmatched=unmatched,
    )


def _check_everything_matched(layout: ModelLayout, model_map: ModelMap) -> None:
    """Raise DiscoveryError for a role pattern, fused pattern or module path that nothing in any block matched."""
    blocks = model_map.blocks
    names = [name for name, _ in blocks[0].module.named_parameters()]
    available = ", ".join(names) or "none"
    for role, patterns in layout.roles.items():
        claimed = any(
            part.dim is None and any(re.search(pattern, part.name) for pattern in patterns)
            for block in blocks
            for part in block.params.get(role, [])
        )
        if not claimed:
            raise DiscoveryError(
                f"mapping roles.{role}: no parameter of any block matches {list(patterns)}; "
                f"parameters of block 0: {available}"
            )
    for spec in layout.fused_qkv:
        if not any(re.search(spec.pattern, name) for name in names):
            raise DiscoveryError(
                f"mapping fused_qkv: pattern {spec.pattern!r} matches no parameter of block 0; "
                f"its parameters: {available}"
            )
    for key in ("attn_out", "mlp_out", "attention"):
        paths = getattr(layout, key)
        if paths and all(_first_module(block.module, paths) is None for block in blocks):
            raise DiscoveryError(f"mapping {key}: no block has a module at {list(paths)}")
    if layout.resid_mid and all(block.resid_mid is None for block in blocks):
        raise DiscoveryError(f"mapping resid_mid: no block has a module at {[path for path, _ in layout.resid_mid]}")


def _map_blocks(layout: ModelLayout, blocks_path: str, blocks: nn.Module, unwrapped: tuple[str, ...]) -> ModelMap:
    patterns = {role: [re.compile(p) for p in ps] for role, ps in layout.roles.items()}
    fused = [(re.compile(spec.pattern), spec) for spec in layout.fused_qkv]
    block_maps = [
        _map_block(layout, index, block, _join(blocks_path, str(index)), patterns, fused)
        for index, block in enumerate(blocks)
    ]
    return ModelMap(layout=layout, blocks=block_maps, blocks_path=blocks_path, unwrapped=unwrapped)


def map_model(model: nn.Module, layout: ModelLayout, *, strict: bool = False) -> ModelMap:
    """Map `model` with `layout`. Raises DiscoveryError when the blocks are not found.

    With `strict`, as for user mappings, a role pattern, fused QKV pattern or
    module path of the layout that matches nothing in any block also raises
    DiscoveryError, because it is almost always a typo.
    """
    root, unwrapped = unwrap_model(model)
    found = _find_block_lists(root, layout.blocks)
    if not found:
        raise DiscoveryError(
            f"{type(root).__name__} has no non-empty nn.ModuleList at '{layout.blocks}' "
            f"(expected by the {layout.name} layout); {_module_list_summary(root)}"
        )
    if len(found) > 1:
        paths = ", ".join(f"'{path}'" for path, _ in found)
        raise DiscoveryError(
            f"'{layout.blocks}' matches several block lists in {type(root).__name__}: {paths}; "
            "give the full path of one as 'blocks'"
        )

    blocks_path, blocks = found[0]
    model_map = _map_blocks(layout, blocks_path, blocks, unwrapped)
    if strict:
        _check_everything_matched(layout, model_map)
    return model_map


# -------------------------------------------------------------- discovery


def unwrap_model(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """Follow `torch.compile` and data-parallel wrappers to the model that runs.

    A `torch.compile` result keeps the model in `_orig_mod`. DDP,
    DataParallel and similar wrappers keep it in `module`, which is then
    their only child. Returns the inner model and the attributes followed.
    """
    followed = []
    while True:
        children = dict(model.named_children())
        if isinstance(children.get("_orig_mod"), nn.Module):
            attribute = "_orig_mod"
        elif isinstance(children.get("module"), nn.Module) and len(children) == 1:
            attribute = "module"
        else:
            return model, tuple(followed)
        model = children[attribute]
        followed.append(attribute)


def _child_classes(container: nn.Module) -> str:
    counts = Counter(type(child).__name__ for child in container.children())
    return ", ".join(f"{count} x {name}" for name, count in counts.items()) or "empty"


def _module_list_summary(root: nn.Module, limit: int = 12) -> str:
    """List the module lists of `root` with their lengths and child classes.

    Lists repeated inside every block (per-head or per-expert lists) are
    grouped under one path with `*` in place of the block index.
    """
    groups: dict[str, list[nn.Module]] = {}
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList):
            key = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)
            groups.setdefault(key, []).append(module)

    lines = []
    for key, modules in list(groups.items())[:limit]:
        if len(modules) == 1:
            lines.append(f"  {key or '<root>'} ({_child_classes(modules[0])})")
        else:
            lines.append(f"  {key} ({len(modules)} lists, the first with {_child_classes(modules[0])})")
    if len(groups) > limit:
        lines.append(f"  ... and {len(groups) - limit} more")

    top_level = ", ".join(f"{name} ({type(child).__name__})" for name, child in root.named_children()) or "none"
    listing = "nn.ModuleLists found:\n" + "\n".join(lines) if lines else "no nn.ModuleList found"
    return f"{listing}\ntop-level modules: {top_level}"


def _unmappable_error(root: nn.Module) -> DiscoveryError:
    block_lists = [name for name, module in root.named_modules() if isinstance(module, nn.ModuleList) and name]
    example = mapping_example(block_lists[0]) if block_lists else mapping_example()
    return DiscoveryError(
        f"Cannot find transformer blocks in {type(root).__name__}: none of the {len(LAYOUTS)} built-in layouts "
        f"({'; '.join(layout.name for layout in LAYOUTS)}) fits.\n"
        f"{_module_list_summary(root)}\n"
        "Pass a mapping to watch(model, mapping=...) or discover(model, mapping=...), or a JSON file to "
        "'stabiliscope inspect --mapping'. A template to adapt to this model's parameter and module "
        f"names: {example}"
    )


def discover(model: nn.Module, mapping: ModelLayout | Mapping[str, Any] | str | os.PathLike | None = None) -> ModelMap:
    """Find the blocks, hook points and parameter roles of `model`.

    Without `mapping`, the built-in `LAYOUTS` are tried in order and the
    first whose module paths exist in every block of a unique block list is
    used. `mapping` is a `ModelLayout`, a dict accepted by `layout_from_dict`
    or the path of a JSON file with such a dict, checked strictly (see
    `map_model`). Raises DiscoveryError listing the model's module lists when
    nothing fits.
    """
    if mapping is not None:
        if isinstance(mapping, ModelLayout):
            layout = mapping
        elif isinstance(mapping, (str, os.PathLike)):
            layout = load_mapping(mapping)
        else:
            layout = layout_from_dict(mapping)
        return map_model(model, layout, strict=True)

    root, unwrapped = unwrap_model(model)
    for layout in LAYOUTS:
        fitting = [
            (path, blocks)
            for path, blocks in _find_block_lists(root, layout.blocks)
            if all(_block_fits(layout, block) for block in blocks)
        ]
        if len(fitting) == 1:
            path, blocks = fitting[0]
            return _map_blocks(layout, path, blocks, unwrapped)
        if len(fitting) > 1:
            paths = ", ".join(f"'{path}'" for path, _ in fitting)
            raise DiscoveryError(
                f"{type(root).__name__} has several block lists that fit the {layout.name} layout: {paths}. "
                f"Pass a mapping whose 'blocks' is one of them, for example: {mapping_example(fitting[0][0])}"
            )
    raise _unmappable_error(root)
