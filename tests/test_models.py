"""Reference model: strategy wiring, norms, FFNs, rotary positions and inits.

Each wiring test recomputes a block's output from its own sublayers following
the strategy's block equation, and compares with `Block.forward`.
"""

import math

import pytest
import torch

from stabiliscope.errors import ConfigError
from stabiliscope.models import STRATEGIES, ModelConfig, build_model
from stabiliscope.models.attention import CausalSelfAttention
from stabiliscope.models.norms import LayerNorm, RMSNorm

DEPTH = 4


def tiny_model(strategy: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(depth=DEPTH, width=32, heads=4, strategy=strategy, max_seq_len=16)
    options.update(overrides)
    model = build_model(ModelConfig(**options))
    # Non-trivial gains and biases, so a norm applied at the wrong place shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith(".scale"):
                param.uniform_(0.5, 1.5)
    return model


def block_input() -> torch.Tensor:
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1)) * 3.0


def expected_pre(block, x):
    y = x + block.attn(block.norm_attn_in(x))
    return y + block.mlp(block.norm_mlp_in(y))


def expected_post(block, x):
    y = block.norm_mid(x + block.attn(x))
    return block.norm_post(y + block.mlp(y))


def expected_hybrid(block, x):
    y = x + block.attn(x)
    z = block.norm_mid(y)
    return z + block.mlp(z)


def expected_peri(block, x):
    y = x + block.norm_attn_out(block.attn(block.norm_attn_in(x)))
    return y + block.norm_mlp_out(block.mlp(block.norm_mlp_in(y)))


def expected_deepnorm(block, x):
    a = (2 * DEPTH) ** 0.25
    y = block.norm_mid(a * x + block.attn(x))
    return block.norm_post(a * y + block.mlp(y))


def expected_lns(layer):
    def expected(block, x):
        shrink = 1 / math.sqrt(layer + 1)
        y = x + block.attn(block.norm_attn_in(x) * shrink)
        return y + block.mlp(block.norm_mlp_in(y) * shrink)

    return expected


def expected_dyt(block, x):
    def dyt(norm, h):
        return norm.weight * torch.tanh(norm.scale * h) + norm.bias

    y = x + block.attn(dyt(block.norm_attn_in, x))
    return y + block.mlp(dyt(block.norm_mlp_in, y))


WIRING = {
    "pre": lambda layer: expected_pre,
    "pre_qk": lambda layer: expected_pre,
    "pre_qkv": lambda layer: expected_pre,
    "post": lambda layer: expected_post,
    "hybrid": lambda layer: expected_hybrid,
    "hybrid_star": lambda layer: expected_pre if layer == 0 else expected_hybrid,
    # floor(0.25 * 4) = 1: block 0 is Post-Norm, blocks 1-3 Pre-Norm.
    "mix": lambda layer: expected_post if layer < 1 else expected_pre,
    "peri": lambda layer: expected_peri,
    "deepnorm": lambda layer: expected_deepnorm,
    "lns": expected_lns,
    "dyt": lambda layer: expected_dyt,
}

HEAD_NORM = {
    "pre": "none",
    "pre_qk": "qk",
    "pre_qkv": "qkv",
    "post": "none",
    "hybrid": "qkv",
    "hybrid_star": "qkv",
    "mix": "none",
    "peri": "none",
    "deepnorm": "none",
    "lns": "none",
    "dyt": "none",
}
FINAL_NORM = {name: name not in ("post", "deepnorm") for name in HEAD_NORM}


@pytest.mark.parametrize("strategy", sorted(WIRING))
def test_block_matches_equation(strategy):
    model = tiny_model(strategy)
    x = block_input()
    for layer, block in enumerate(model.blocks):
        expected = WIRING[strategy](layer)(block, x)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_wiring_covers_registry():
    assert set(WIRING) == set(STRATEGIES)


def test_sandwich_is_peri():
    from stabiliscope.models import get_strategy

    assert get_strategy("sandwich") is get_strategy("peri")


def test_mix_switches_at_a_quarter():
    model = tiny_model("mix", depth=8)
    kinds = ["post" if block.norm_post is not None else "pre" for block in model.blocks]
    assert kinds == ["post", "post"] + ["pre"] * 6


def test_mix_shallow_is_all_pre():
    model = tiny_model("mix", depth=3)
    assert all(block.norm_attn_in is not None for block in model.blocks)


def test_deepnet_init_gains():
    depth, width = 6, 64
    model = build_model(ModelConfig(depth=depth, width=width, heads=4, strategy="deepnorm"))
    assert model.config.resolved_init == "deepnet"
    beta = (8 * depth) ** -0.25
    v = torch.cat([b.attn.v.weight.flatten() for b in model.blocks])
    q = torch.cat([b.attn.q.weight.flatten() for b in model.blocks])
    assert v.std().item() == pytest.approx(beta * math.sqrt(2 / (2 * width)), rel=0.05)
    assert q.std().item() == pytest.approx(math.sqrt(2 / (2 * width)), rel=0.05)


def test_dyt_replaces_every_norm():
    model = tiny_model("dyt")
    from stabiliscope.models.norms import DynamicTanh

    assert isinstance(model.norm_final, DynamicTanh)
    assert isinstance(model.blocks[0].norm_mlp_in, DynamicTanh)
    assert model.blocks[0].norm_attn_in.scale.item() == 0.5


@pytest.mark.parametrize("strategy", sorted(WIRING))
def test_head_norm_placement(strategy):
    model = tiny_model(strategy)
    attn = model.blocks[DEPTH - 1].attn
    mode = HEAD_NORM[strategy]
    assert (attn.q_norm is not None) == (mode in ("qk", "qkv"))
    assert (attn.k_norm is not None) == (mode in ("qk", "qkv"))
    assert (attn.v_norm is not None) == (mode == "qkv")


@pytest.mark.parametrize("strategy", sorted(WIRING))
def test_final_norm_presence(strategy):
    model = tiny_model(strategy)
    assert (model.norm_final is not None) == FINAL_NORM[strategy]


def test_hybrid_has_no_attention_input_norm():
    block = tiny_model("hybrid").blocks[0]
    assert block.norm_attn_in is None
    assert block.norm_mlp_in is None
    assert block.norm_post is None


def test_hybrid_star_first_block_is_pre_norm():
    model = tiny_model("hybrid_star")
    assert model.blocks[0].norm_attn_in is not None
    assert model.blocks[0].norm_mid is None
    assert model.blocks[1].norm_attn_in is None
    assert model.blocks[1].norm_mid is not None


def manual_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention by hand: per-head norms before rotary, explicit causal softmax."""
    batch, seq_len, width = x.shape
    heads, head_dim = attn.heads, attn.head_dim

    def heads_of(t):
        return t.view(batch, seq_len, heads, head_dim).transpose(1, 2)

    q, k, v = heads_of(attn.q(x)), heads_of(attn.k(x)), heads_of(attn.v(x))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.v_norm is not None:
        v = attn.v_norm(v)

    # Rotary: position t rotates feature pair (i, i + d/2) by t * 10000^(-2i/d).
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) * 2 / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()

    def rotate(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(dim=-1) @ v
    return attn.o(y.transpose(1, 2).reshape(batch, seq_len, width))


@pytest.mark.parametrize("strategy", ["pre", "pre_qk", "hybrid"])
def test_attention_matches_manual(strategy):
    attn = tiny_model(strategy).blocks[1].attn
    x = block_input()
    torch.testing.assert_close(attn(x), manual_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_qkv_norm_scale_invariance():
    attn = tiny_model("hybrid").blocks[0].attn
    x = block_input()
    before = attn(x)
    with torch.no_grad():
        attn.q.weight.mul_(7.0)
        attn.k.weight.mul_(0.1)
        attn.v.weight.mul_(3.0)
    torch.testing.assert_close(attn(x), before, rtol=1e-4, atol=1e-5)


def test_rms_norm_by_hand():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[1.0, -1.0, 3.0, 1.0]])  # mean square 3
    expected = x / math.sqrt(3.0 + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_layer_norm_option():
    model = tiny_model("pre", norm="layer")
    assert isinstance(model.blocks[0].norm_attn_in, LayerNorm)


def test_rms_norm_default():
    model = tiny_model("pre")
    assert isinstance(model.blocks[0].norm_attn_in, RMSNorm)


@pytest.mark.parametrize("ffn, hidden", [("swiglu", 88), ("gelu", 128), ("relu", 128)])
def test_ffn_hidden_size(ffn, hidden):
    mlp = tiny_model("pre", ffn=ffn).blocks[0].mlp
    assert mlp.fc_in.out_features == hidden
    assert (mlp.fc_gate is not None) == (ffn == "swiglu")


def test_swiglu_by_hand():
    mlp = tiny_model("pre").blocks[0].mlp
    x = block_input()
    expected = mlp.fc_out(torch.nn.functional.silu(mlp.fc_gate(x)) * mlp.fc_in(x))
    torch.testing.assert_close(mlp(x), expected)


def test_embeddings_are_tied():
    model = tiny_model("pre")
    idx = torch.randint(0, 256, (1, 8))
    logits, _ = model(idx)
    hidden = model.tok_emb(idx)
    for block in model.blocks:
        hidden = block(hidden)
    hidden = model.norm_final(hidden)
    torch.testing.assert_close(logits, hidden @ model.tok_emb.weight.T)


def test_loss_is_cross_entropy():
    model = tiny_model("post")
    idx = torch.randint(0, 256, (2, 8))
    targets = torch.randint(0, 256, (2, 8))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)


def output_projection_std(model):
    return torch.cat([b.mlp.fc_out.weight.flatten() for b in model.blocks]).std().item()


def input_projection_std(model):
    return torch.cat([b.attn.q.weight.flatten() for b in model.blocks]).std().item()


def test_init_normal_std():
    model = build_model(ModelConfig(depth=8, width=128, heads=4, init="normal"))
    assert input_projection_std(model) == pytest.approx(0.02, rel=0.05)
    assert output_projection_std(model) == pytest.approx(0.02, rel=0.05)


def test_init_gpt2_scales_output_projections():
    model = build_model(ModelConfig(depth=8, width=128, heads=4, init="gpt2"))
    assert output_projection_std(model) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_init_megatron_std_and_truncation():
    width, depth = 128, 8
    model = build_model(ModelConfig(depth=depth, width=width, heads=4, init="megatron"))
    small_init = math.sqrt(2 / (5 * width))
    # Truncation at 3 std keeps 99.7 % of the mass: the std drops by about 1.3 %.
    assert input_projection_std(model) == pytest.approx(small_init, rel=0.05)
    assert output_projection_std(model) == pytest.approx(small_init / math.sqrt(2 * depth), rel=0.05)
    max_q = max(b.attn.q.weight.abs().max().item() for b in model.blocks)
    assert max_q <= 3 * small_init + 1e-7


def test_init_xavier_std():
    model = build_model(ModelConfig(depth=2, width=128, heads=4, init="xavier"))
    mlp_in = model.blocks[0].mlp.fc_in.weight
    fan_out, fan_in = mlp_in.shape
    assert mlp_in.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)


def test_norm_gains_start_at_one():
    model = build_model(ModelConfig(depth=2, width=32, heads=4, strategy="hybrid", norm="layer"))
    assert torch.all(model.blocks[0].norm_mid.weight == 1)
    assert torch.all(model.blocks[0].norm_mid.bias == 0)
    assert torch.all(model.blocks[0].attn.v_norm.weight == 1)


def test_embed_scale_sqrt_d():
    model = build_model(ModelConfig(depth=2, width=64, heads=4, embed_scale="sqrt_d"))
    vectors = model.tok_emb.weight * model.embed_multiplier
    mean_squared_norm = vectors.pow(2).sum(dim=1).mean().item()
    assert mean_squared_norm == pytest.approx(64, rel=0.05)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"width": 30, "heads": 4}, "not divisible"),
        ({"depth": 0}, "depth"),
        ({"strategy": "nope"}, "expected one of"),
        ({"init": "kaiming"}, "kaiming"),
        ({"ffn": "tanh"}, "tanh"),
        ({"norm": "batch"}, "batch"),
        ({"width": 12, "heads": 4}, "odd"),
    ],
)
def test_invalid_config_rejected(overrides, fragment):
    options = dict(depth=2, width=32, heads=4)
    options.update(overrides)
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**options).validate()


def test_same_seed_same_weights():
    first = tiny_model("hybrid")
    second = tiny_model("hybrid")
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
