"""Discovery of blocks, hook points and parameter roles across model families.

Hugging Face models are real transformers classes built from tiny configs
(nothing is downloaded); those tests are skipped when transformers is not
installed. The nanoGPT-style model below follows nanoGPT's module names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import stabiliscope.watch
from stabiliscope.errors import ConfigError, DiscoveryError
from stabiliscope.models import ModelConfig, build_model
from stabiliscope.watch.discovery import (
    HF_DECODER_LAYOUT,
    HF_GPT2_LAYOUT,
    HF_POST_SUBLAYER_NORM_LAYOUT,
    NANOGPT_LAYOUT,
    REFERENCE_LAYOUT,
    HookPoint,
    ModelLayout,
    discover,
    layout_from_dict,
    load_mapping,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Importing torch._dynamo (torch.compile, DDP) warns about torch.jit internals.
ignore_dynamo_import_warning = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)

WIDTH = 32
HEADS = 4
DEPTH = 2
VOCAB = 64
HF_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": DEPTH,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def tokens(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 8), generator=generator)


def hand_norm(tensors) -> float:
    return math.sqrt(sum(t.detach().double().pow(2).sum().item() for t in tensors))


def role_names(block) -> dict[str, list[str]]:
    return {role: [part.name for part in parts] for role, parts in block.params.items() if parts}


# ----------------------------------------------------------- test models


class NanoAttention(nn.Module):
    """Causal self-attention with one fused nn.Linear for q, k and v, as in nanoGPT."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), is_causal=True)
        return self.c_proj(mixed.transpose(1, 2).reshape(batch, length, width))


class NanoMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = NanoAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = NanoMLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Pre-Norm GPT with nanoGPT's module tree: transformer.{wte, wpe, h, ln_f} and a tied lm_head."""

    def __init__(self, depth: int = DEPTH, width: int = WIDTH, heads: int = HEADS, context: int = 16) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, width),
                "wpe": nn.Embedding(context, width),
                "h": nn.ModuleList(NanoBlock(width, heads) for _ in range(depth)),
                "ln_f": nn.LayerNorm(width),
            }
        )
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class GroupedQueryBlock(nn.Module):
    """A block whose fused QKV projection has shorter k and v than q (two key/value heads)."""

    def __init__(self, width: int = WIDTH, kv_width: int = WIDTH // 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, width + 2 * kv_width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.ffn = nn.Linear(width, width)


class GroupedQueryModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.ModuleList(GroupedQueryBlock() for _ in range(3))


class OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(4))


class OddEncoder(nn.Module):
    """A model none of the built-in layouts fits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(OddBlock() for _ in range(3))


def torch_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)


# A mapping for PyTorch's own nn.TransformerEncoder, whose attention keeps q,
# k and v in one (3 * width, width) `in_proj_weight`.
ENCODER_MAPPING = {
    "name": "torch TransformerEncoder",
    "blocks": "layers",
    "roles": {
        "attn.o": [r"^self_attn\.out_proj\.(weight|bias)$"],
        "mlp.in": [r"^linear1\.(weight|bias)$"],
        "mlp.out": [r"^linear2\.(weight|bias)$"],
        "norm": [r"^norm[12]\.(weight|bias)$"],
    },
    "fused_qkv": [
        {"pattern": r"^self_attn\.in_proj_weight$", "dim": 0, "sizes": [WIDTH, WIDTH, WIDTH]},
        {"pattern": r"^self_attn\.in_proj_bias$", "dim": 0},
    ],
    "attn_out": ["dropout1"],
    "mlp_out": ["dropout2"],
    "resid_mid": [["norm2", "input"]],
    "attention": ["self_attn"],
}


# ----------------------------------------------------- stream algebra check


def capture_positions(model_map, run) -> dict[tuple[int, str], torch.Tensor]:
    """Run `run()` with a hook on every discovered position and return the tensors seen there."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for block in model_map.blocks:
        for position, point in block.positions.items():

            def hook(module, args, kwargs, output, key=(block.index, position), point=point):
                captured[key] = point.read(args, kwargs, output).detach().clone()

            handles.append(point.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def assert_residual_algebra(model_map, run) -> None:
    """Check that the positions add up as a residual stream: pre + attn_out = mid, mid + mlp_out = post."""
    seen = capture_positions(model_map, run)
    for block in model_map.blocks:
        i = block.index
        assert torch.allclose(seen[i, "resid_pre"] + seen[i, "attn_out"], seen[i, "resid_mid"], atol=1e-5), i
        assert torch.allclose(seen[i, "resid_mid"] + seen[i, "mlp_out"], seen[i, "resid_post"], atol=1e-5), i
        if i > 0:
            assert torch.equal(seen[i - 1, "resid_post"], seen[i, "resid_pre"]), i


# ---------------------------------------------------- Llama-style decoders

LLAMA_ROLES = {
    "attn.q": ["self_attn.q_proj.weight"],
    "attn.k": ["self_attn.k_proj.weight"],
    "attn.v": ["self_attn.v_proj.weight"],
    "attn.o": ["self_attn.o_proj.weight"],
    "mlp.in": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.out": ["mlp.down_proj.weight"],
    "norm": ["input_layernorm.weight", "post_attention_layernorm.weight"],
}
QWEN2_ROLES = {
    **LLAMA_ROLES,
    "attn.q": ["self_attn.q_proj.weight", "self_attn.q_proj.bias"],
    "attn.k": ["self_attn.k_proj.weight", "self_attn.k_proj.bias"],
    "attn.v": ["self_attn.v_proj.weight", "self_attn.v_proj.bias"],
}
QWEN3_ROLES = {
    **LLAMA_ROLES,
    "norm": [
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ],
}

# family: (config class, model class, extra config, blocks path, roles)
LLAMA_STYLE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "model.layers", LLAMA_ROLES),
    "llama-base": ("LlamaConfig", "LlamaModel", {}, "layers", LLAMA_ROLES),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, "model.layers", LLAMA_ROLES),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "model.layers", QWEN2_ROLES),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": WIDTH // HEADS}, "model.layers", QWEN3_ROLES),
}


def build_hf(hf, config_class: str, model_class: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(hf, config_class)(**HF_SIZES, **extra)
    return getattr(hf, model_class)(config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.layers


@pytest.mark.parametrize("family", list(LLAMA_STYLE))
def test_llama_style_roles_and_hook_points(hf, family):
    config_class, model_class, extra, blocks_path, roles = LLAMA_STYLE[family]
    model = build_hf(hf, config_class, model_class, **extra)
    model_map = discover(model)

    assert model_map.layout is HF_DECODER_LAYOUT
    assert model_map.blocks_path == blocks_path
    assert len(model_map.blocks) == DEPTH
    layers = decoder_layers(model)
    for block, layer in zip(model_map.blocks, layers):
        assert role_names(block) == roles
        assert block.unmatched == []
        assert block.module is layer
        assert block.path == f"{blocks_path}.{block.index}"
        assert block.attn_out is layer.self_attn
        assert block.mlp_out is layer.mlp
        assert block.attention is layer.self_attn
        assert block.resid_mid.module is layer.post_attention_layernorm
        assert block.resid_mid.side == "input"
        assert block.positions["attn_out"].path == f"{blocks_path}.{block.index}.self_attn"

    assert_residual_algebra(model_map, lambda: model(input_ids=tokens()))


POST_SUBLAYER_NORM = {
    # family: (config class, model class, extra config, FFN input position)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": WIDTH // HEADS}, "pre_feedforward_layernorm"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "mlp"),
}


@pytest.mark.parametrize("family", list(POST_SUBLAYER_NORM))
def test_post_sublayer_norm_hook_points(hf, family):
    config_class, model_class, extra, mid_module = POST_SUBLAYER_NORM[family]
    model = build_hf(hf, config_class, model_class, **extra)
    model_map = discover(model)

    assert model_map.layout is HF_POST_SUBLAYER_NORM_LAYOUT
    assert len(model_map.blocks) == DEPTH
    for block, layer in zip(model_map.blocks, model.model.layers):
        assert block.attn_out is layer.post_attention_layernorm
        assert block.mlp_out is layer.post_feedforward_layernorm
        assert block.resid_mid.module is getattr(layer, mid_module)
        assert role_names(block)["mlp.in"] == ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
        assert "post_feedforward_layernorm.weight" in role_names(block)["norm"]
        assert block.unmatched == []

    assert_residual_algebra(model_map, lambda: model(input_ids=tokens()))


# ------------------------------------------------------------ GPT-2 family


def tiny_gpt2(hf, head: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = hf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=WIDTH,
        n_layer=DEPTH,
        n_head=HEADS,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return hf.GPT2LMHeadModel(config) if head else hf.GPT2Model(config)


GPT_ROLE_NAMES = {
    "attn.q": ["attn.c_attn.weight", "attn.c_attn.bias"],
    "attn.k": ["attn.c_attn.weight", "attn.c_attn.bias"],
    "attn.v": ["attn.c_attn.weight", "attn.c_attn.bias"],
    "attn.o": ["attn.c_proj.weight", "attn.c_proj.bias"],
    "mlp.in": ["mlp.c_fc.weight", "mlp.c_fc.bias"],
    "mlp.out": ["mlp.c_proj.weight", "mlp.c_proj.bias"],
    "norm": ["ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"],
}


def assert_fused_thirds(block, weight_dim: int) -> None:
    """Check that the q, k, v slices of c_attn cover equal thirds and reassemble the weight and bias."""
    weight = block.module.attn.c_attn.weight
    bias = block.module.attn.c_attn.bias
    weight_parts, bias_parts = [], []
    for third, role in enumerate(("attn.q", "attn.k", "attn.v")):
        weight_slice, bias_slice = block.params[role]
        assert (weight_slice.dim, weight_slice.start, weight_slice.stop) == (weight_dim, third * WIDTH, (third + 1) * WIDTH)
        assert (bias_slice.dim, bias_slice.start, bias_slice.stop) == (0, third * WIDTH, (third + 1) * WIDTH)
        assert weight_slice.param is weight
        weight_parts.append(weight_slice.select(weight))
        bias_parts.append(bias_slice.select(bias))
    assert torch.equal(torch.cat(weight_parts, dim=weight_dim), weight)
    assert torch.equal(torch.cat(bias_parts, dim=0), bias)


@pytest.mark.parametrize("head", [True, False], ids=["lm-head", "base"])
def test_gpt2_fused_qkv_split_along_columns(hf, head):
    model = tiny_gpt2(hf, head)
    model_map = discover(model)

    assert model_map.layout is HF_GPT2_LAYOUT
    assert model_map.blocks_path == ("transformer.h" if head else "h")
    assert len(model_map.blocks) == DEPTH
    layers = model.transformer.h if head else model.h
    for block, layer in zip(model_map.blocks, layers):
        assert role_names(block) == GPT_ROLE_NAMES
        assert_fused_thirds(block, weight_dim=1)
        assert block.attn_out is layer.attn
        assert block.mlp_out is layer.mlp
        assert block.resid_mid.module is layer.ln_2
        assert block.resid_mid.side == "input"

    model.eval()
    assert_residual_algebra(model_map, lambda: model(input_ids=tokens()))


def test_nanogpt_fused_qkv_split_along_rows():
    torch.manual_seed(0)
    model = NanoGPT()
    model_map = discover(model)

    assert model_map.layout is NANOGPT_LAYOUT
    assert model_map.blocks_path == "transformer.h"
    assert len(model_map.blocks) == DEPTH
    for block, layer in zip(model_map.blocks, model.transformer.h):
        assert role_names(block) == GPT_ROLE_NAMES
        assert_fused_thirds(block, weight_dim=0)
        assert block.attn_out is layer.attn
        assert block.resid_mid.module is layer.ln_2

    assert_residual_algebra(model_map, lambda: model(tokens()))


def test_reference_model_layout_and_algebra():
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=3, width=WIDTH, heads=HEADS, strategy="pre", max_seq_len=16))
    model_map = discover(model)

    assert model_map.layout is REFERENCE_LAYOUT
    assert len(model_map.blocks) == 3
    assert role_names(model_map.blocks[0])["mlp.in"] == ["mlp.fc_in.weight", "mlp.fc_gate.weight"]
    assert_residual_algebra(model_map, lambda: model(tokens()))


# --------------------------------------------------------------- wrappers


@ignore_dynamo_import_warning
def test_compiled_model_maps_inner_modules():
    torch.manual_seed(0)
    model = NanoGPT()
    model_map = discover(torch.compile(model))

    assert model_map.unwrapped == ("_orig_mod",)
    assert model_map.blocks_path == "transformer.h"
    assert model_map.blocks[1].module is model.transformer.h[1]
    assert model_map.blocks[1].params["attn.q"][0].param is model.transformer.h[1].attn.c_attn.weight


def test_data_parallel_wrapper_is_unwrapped():
    model = NanoGPT()
    model_map = discover(nn.DataParallel(model))

    assert model_map.unwrapped == ("module",)
    assert model_map.blocks[0].module is model.transformer.h[0]
    assert "mapped inside the wrapper at 'module'" in model_map.describe()


@ignore_dynamo_import_warning
def test_ddp_wrapper_is_unwrapped(tmp_path):
    distributed = torch.distributed
    if not distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = NanoGPT()
        wrapped = nn.parallel.DistributedDataParallel(model)
        model_map = discover(torch.compile(wrapped))
    finally:
        distributed.destroy_process_group()

    assert model_map.unwrapped == ("_orig_mod", "module")
    assert model_map.blocks[0].module is model.transformer.h[0]


# ------------------------------------------------------ unmappable models


def test_unmappable_model_lists_module_lists():
    with pytest.raises(DiscoveryError) as caught:
        discover(OddEncoder())
    message = str(caught.value)

    assert message.startswith("Cannot find transformer blocks in OddEncoder")
    assert "  encoder.layers (3 x OddBlock)" in message
    assert "  encoder.layers.*.heads (3 lists, the first with 4 x Linear)" in message
    assert "top-level modules: embed (Embedding), encoder (Module)" in message
    assert '{"blocks": "encoder.layers", "roles": {' in message
    assert len(message.splitlines()) <= 6


def test_unmappable_model_without_module_lists():
    with pytest.raises(DiscoveryError, match="no nn.ModuleList found\ntop-level modules: 0 \\(Linear\\)"):
        discover(nn.Sequential(nn.Linear(4, 4)))


def test_discovery_error_is_config_error():
    assert issubclass(DiscoveryError, ConfigError)
    assert issubclass(DiscoveryError, ValueError)


def test_two_fitting_block_lists_are_ambiguous():
    twins = nn.Module()
    twins.left = NanoGPT()
    twins.right = NanoGPT()
    with pytest.raises(DiscoveryError, match="'left.transformer.h', 'right.transformer.h'"):
        discover(twins)


# ----------------------------------------------------------- user mappings


def test_user_mapping_splits_fused_in_proj():
    torch.manual_seed(0)
    model = torch_encoder()
    model_map = discover(model, mapping=ENCODER_MAPPING)

    assert model_map.layout.name == "torch TransformerEncoder"
    assert len(model_map.blocks) == DEPTH
    for block, layer in zip(model_map.blocks, model.layers):
        assert role_names(block) == {
            "attn.q": ["self_attn.in_proj_weight", "self_attn.in_proj_bias"],
            "attn.k": ["self_attn.in_proj_weight", "self_attn.in_proj_bias"],
            "attn.v": ["self_attn.in_proj_weight", "self_attn.in_proj_bias"],
            "attn.o": ["self_attn.out_proj.weight", "self_attn.out_proj.bias"],
            "mlp.in": ["linear1.weight", "linear1.bias"],
            "mlp.out": ["linear2.weight", "linear2.bias"],
            "norm": ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"],
        }
        parts = [block.params[role][0] for role in ("attn.q", "attn.k", "attn.v")]
        assert torch.equal(torch.cat([part.select(part.param) for part in parts]), layer.self_attn.in_proj_weight)
        assert block.attn_out is layer.dropout1
        assert block.attention is layer.self_attn

    model.train()
    assert_residual_algebra(model_map, lambda: model(torch.randn(2, 8, WIDTH)))


def test_user_mapping_grouped_query_sizes():
    mapping = {
        "blocks": "stack",
        "roles": {"attn.o": ["^out\\.weight$"], "mlp.in": ["^ffn\\."], "norm": ["^norm\\."]},
        "fused_qkv": {"pattern": "^qkv\\.weight$", "dim": 0, "sizes": [WIDTH, WIDTH // 2, WIDTH // 2]},
    }
    model = GroupedQueryModel()
    model_map = discover(model, mapping=mapping)

    assert len(model_map.blocks) == 3
    block = model_map.blocks[2]
    ranges = [(part.start, part.stop) for role in ("attn.q", "attn.k", "attn.v") for part in block.params[role]]
    assert ranges == [(0, 32), (32, 48), (48, 64)]
    assert "qkv.weight[32:48]" in model_map.describe()
    assert block.attn_out is None
    assert "attn_out" not in block.positions


def test_user_mapping_as_layout_object():
    layout = layout_from_dict(ENCODER_MAPPING)
    assert isinstance(layout, ModelLayout)
    model_map = discover(torch_encoder(), mapping=layout)
    assert model_map.layout is layout


def test_user_mapping_blocks_path_suffix():
    model = nn.Module()
    model.backbone = torch_encoder()
    model_map = discover(model, mapping=ENCODER_MAPPING)
    assert model_map.blocks_path == "backbone.layers"


def test_builtin_layout_round_trips_through_dict(hf):
    model = tiny_gpt2(hf)
    layout = layout_from_dict(json.loads(json.dumps(HF_GPT2_LAYOUT.to_dict())))
    from_dict = discover(model, mapping=layout)
    built_in = discover(model)

    assert from_dict.to_dict()["blocks"] == built_in.to_dict()["blocks"]


def bad(**changes):
    mapping = {key: value for key, value in ENCODER_MAPPING.items() if key not in changes}
    mapping.update({key: value for key, value in changes.items() if value is not None})
    return mapping


BAD_MAPPINGS = {
    "unknown key": (bad(heads=4), "unknown key 'heads'"),
    "missing blocks": (bad(blocks=None), "mapping blocks: expected the dotted path"),
    "unknown role": (bad(roles={"attn.x": ["^a$"]}), "unknown role 'attn.x'"),
    "invalid regex": (bad(roles={"norm": ["norm[12"]}), "roles.norm: invalid regular expression 'norm\\[12'"),
    "role matches nothing": (bad(roles={"mlp.out": ["^linear3\\."]}), "roles.mlp.out: no parameter of any block"),
    "bad side": (bad(resid_mid=[["norm2", "inside"]]), "side 'inside' of 'norm2' is invalid"),
    "two sizes": (
        bad(fused_qkv={"pattern": "^self_attn\\.in_proj_weight$", "sizes": [32, 32]}),
        "fused_qkv.sizes: expected three positive integers",
    ),
    "sizes do not add up": (
        bad(fused_qkv={"pattern": "^self_attn\\.in_proj_weight$", "sizes": [32, 32, 16]}),
        "sizes \\[32, 32, 16\\] add up to 80",
    ),
    "fused matches nothing": (
        bad(fused_qkv={"pattern": "^qkv\\.weight$"}),
        "fused_qkv: pattern '\\^qkv\\\\\\\\.weight\\$' matches no parameter",
    ),
    "blocks not found": (bad(blocks="decoder.layers"), "no non-empty nn.ModuleList at 'decoder.layers'"),
    "attn_out not found": (bad(attn_out=["attention_dropout"]), "mapping attn_out: no block has a module"),
    "attn_out not a path": (bad(attn_out=[3]), "mapping attn_out: expected a module path"),
    "no roles": (bad(roles=None, fused_qkv=None), "missing key 'roles'"),
    "not a dict": (42, "a mapping must be a dict or a ModelLayout, got int"),
}


@pytest.mark.parametrize("case", list(BAD_MAPPINGS))
def test_bad_mapping_names_the_value(case):
    mapping, expected = BAD_MAPPINGS[case]
    with pytest.raises(DiscoveryError, match=expected):
        discover(torch_encoder(), mapping=mapping)


def test_load_mapping_file(tmp_path):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(ENCODER_MAPPING))
    assert load_mapping(path).blocks == "layers"

    path.write_text("{not json")
    with pytest.raises(DiscoveryError, match="is not valid JSON"):
        load_mapping(path)
    with pytest.raises(DiscoveryError, match="cannot read mapping file"):
        load_mapping(tmp_path / "missing.json")


# ------------------------------------------------------- describe and dict


def test_describe_lists_positions_and_slices():
    text = discover(NanoGPT()).describe()
    lines = text.splitlines()

    assert lines[0] == "nanoGPT-style GPT: 2 blocks at 'transformer.h'"
    assert "block 1: transformer.h.1 (NanoBlock)" in lines
    assert "  resid_pre   transformer.h.1 (input)" in lines
    assert "  attn_out    transformer.h.1.attn (output)" in lines
    assert "  resid_mid   transformer.h.1.ln_2 (input)" in lines
    assert "  mlp_out     transformer.h.1.mlp (output)" in lines
    assert "  resid_post  transformer.h.1 (output)" in lines
    assert "  attn.k      attn.c_attn.weight[32:64], attn.c_attn.bias[32:64]" in lines


def test_describe_column_slices_of_conv1d(hf):
    text = discover(tiny_gpt2(hf)).describe()
    assert "  attn.v      attn.c_attn.weight[:, 64:96], attn.c_attn.bias[64:96]" in text.splitlines()


def test_to_dict_is_json_ready():
    data = json.loads(json.dumps(discover(NanoGPT()).to_dict()))

    assert data["depth"] == DEPTH
    assert data["blocks_path"] == "transformer.h"
    assert data["layout"]["name"] == "nanoGPT-style GPT"
    block = data["blocks"][0]
    assert block["positions"]["resid_mid"] == {"module": "transformer.h.0.ln_2", "side": "input"}
    assert block["params"]["attn.v"][0] == {
        "name": "attn.c_attn.weight",
        "shape": [3 * WIDTH, WIDTH],
        "dim": 0,
        "start": 2 * WIDTH,
        "stop": 3 * WIDTH,
    }
    assert block["params"]["mlp.out"][0]["dim"] is None


def test_hook_point_read_kwargs_and_tuples():
    point_in = HookPoint(nn.Identity(), "input")
    point_out = HookPoint(nn.Identity(), "output")
    tensor = torch.ones(2)

    assert point_in.read((), {"hidden_states": tensor}, None) is tensor
    assert point_in.read((tensor,), {}, None) is tensor
    assert point_out.read((), {}, (tensor, None)) is tensor
    assert point_out.read((), {}, "not a tensor") is None


# ------------------------------------------------- watch, end to end


def train_one_step(model: nn.Module, forward) -> dict[str, list[float]]:
    model.train()
    with stabiliscope.watch(model) as w:
        loss = forward()
        loss.backward()
        w.step(loss)
    return w.records[0].blocks


def assert_role_norms(blocks: dict[str, list[float]], expected: dict[str, list[list[torch.Tensor]]]) -> None:
    for role, per_block in expected.items():
        for index, grads in enumerate(per_block):
            assert blocks[f"grad/{role}"][index] == pytest.approx(hand_norm(grads), rel=1e-5), (role, index)


def test_watch_llama_grad_roles_by_hand(hf):
    model = build_hf(hf, "LlamaConfig", "LlamaForCausalLM")
    x = tokens()

    def forward():
        return model(input_ids=x, labels=x).loss

    blocks = train_one_step(model, forward)

    expected: dict[str, list[list[torch.Tensor]]] = {role: [] for role in LLAMA_ROLES}
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        expected["attn.q"].append([attn.q_proj.weight.grad])
        expected["attn.k"].append([attn.k_proj.weight.grad])
        expected["attn.v"].append([attn.v_proj.weight.grad])
        expected["attn.o"].append([attn.o_proj.weight.grad])
        expected["mlp.in"].append([mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad])
        expected["mlp.out"].append([mlp.down_proj.weight.grad])
        expected["norm"].append([layer.input_layernorm.weight.grad, layer.post_attention_layernorm.weight.grad])
    assert_role_norms(blocks, expected)


def test_watch_gpt2_grad_roles_by_hand(hf):
    model = tiny_gpt2(hf)
    x = tokens()

    def forward():
        return model(input_ids=x, labels=x).loss

    blocks = train_one_step(model, forward)

    expected: dict[str, list[list[torch.Tensor]]] = {role: [] for role in GPT_ROLE_NAMES}
    for layer in model.transformer.h:
        weight_grad, bias_grad = layer.attn.c_attn.weight.grad, layer.attn.c_attn.bias.grad
        for third, role in enumerate(("attn.q", "attn.k", "attn.v")):
            columns = slice(third * WIDTH, (third + 1) * WIDTH)
            expected[role].append([weight_grad[:, columns], bias_grad[columns]])
        expected["attn.o"].append([layer.attn.c_proj.weight.grad, layer.attn.c_proj.bias.grad])
        expected["mlp.in"].append([layer.mlp.c_fc.weight.grad, layer.mlp.c_fc.bias.grad])
        expected["mlp.out"].append([layer.mlp.c_proj.weight.grad, layer.mlp.c_proj.bias.grad])
        expected["norm"].append([p.grad for norm in (layer.ln_1, layer.ln_2) for p in norm.parameters()])
    assert_role_norms(blocks, expected)


def test_watch_nanogpt_grad_roles_by_hand():
    torch.manual_seed(0)
    model = NanoGPT()
    x = tokens()
    blocks = train_one_step(model, lambda: model(x, x)[1])

    expected: dict[str, list[list[torch.Tensor]]] = {"attn.q": [], "attn.k": [], "attn.v": []}
    for layer in model.transformer.h:
        weight_grad, bias_grad = layer.attn.c_attn.weight.grad, layer.attn.c_attn.bias.grad
        for third, role in enumerate(("attn.q", "attn.k", "attn.v")):
            rows = slice(third * WIDTH, (third + 1) * WIDTH)
            expected[role].append([weight_grad[rows], bias_grad[rows]])
    assert_role_norms(blocks, expected)


def test_readme_mapping_file_maps_encoder(tmp_path) -> None:
    """The README's mapping, saved as a JSON file, maps nn.TransformerEncoder like the tested mapping."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```json\n") + len("```json\n")
    text = readme[start : readme.index("```", start)]
    path = tmp_path / "mapping.json"
    path.write_text(text)
    model = torch_encoder()

    from_file = discover(model, mapping=path)
    # The README leaves out `attention`, which serves attention statistics on modules that capture q and k.
    expected = discover(model, mapping={key: value for key, value in ENCODER_MAPPING.items() if key != "attention"})

    assert from_file.describe() == expected.describe()
    with stabiliscope.watch(model, mapping=str(path)) as w:
        model(torch.randn(2, 5, WIDTH)).sum().backward()
        w.step()
    assert len(w.records[0].blocks["act/resid_mid_rms"]) == DEPTH
