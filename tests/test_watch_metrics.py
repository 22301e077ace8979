"""Watch metrics beyond gradient norms: stream positions, updates, attention, non-finite values."""

import math

import numpy as np
import pytest
import torch

from stabiliscope.models import ModelConfig, build_model
from stabiliscope.watch import watch


def make_model(strategy="pre", depth=3, width=32):
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=depth, width=width, heads=4, strategy=strategy, max_seq_len=16))


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 8), generator=generator)
    y = torch.randint(0, 256, (2, 8), generator=generator)
    return x, y


def rms(tensor):
    return tensor.detach().double().pow(2).mean().sqrt().item()


def absmax(tensor):
    return tensor.detach().abs().max().item()


def one_step(model, optimizer=None, **options):
    x, y = make_batch()
    with watch(model, optimizer, **options) as w:
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
        if optimizer is not None:
            optimizer.step()
    return w


def test_stream_positions_by_hand():
    model = make_model("pre")
    x, _ = make_batch()
    expected = {name: [] for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}
    with torch.no_grad():
        hidden = model.tok_emb(x)
        for block in model.blocks:
            attn_out = block.attn(block.norm_attn_in(hidden))
            resid_mid = hidden + attn_out
            mlp_out = block.mlp(block.norm_mlp_in(resid_mid))
            for name, tensor in zip(expected, (hidden, attn_out, resid_mid, mlp_out, resid_mid + mlp_out)):
                expected[name].append(tensor)
            hidden = resid_mid + mlp_out

    blocks = one_step(model).records[0].blocks
    for name, tensors in expected.items():
        np.testing.assert_allclose(blocks[f"act/{name}_rms"], [rms(t) for t in tensors], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(blocks[f"act/{name}_absmax"], [absmax(t) for t in tensors], rtol=1e-6, err_msg=name)


def test_resid_mid_after_post_norm():
    model = make_model("hybrid")
    x, _ = make_batch()
    expected = []
    with torch.no_grad():
        hidden = model.tok_emb(x)
        for block in model.blocks:
            mid = block.norm_mid(hidden + block.attn(hidden))
            expected.append(rms(mid))
            hidden = block(hidden)
    blocks = one_step(model).records[0].blocks
    np.testing.assert_allclose(blocks["act/resid_mid_rms"], expected, rtol=1e-5)


def test_update_ratio_by_hand():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    w = one_step(model, optimizer)
    after = dict(model.named_parameters())
    for layer in range(3):
        prefix = f"blocks.{layer}."
        for role, names in {"attn.o": ["attn.o.weight"], "mlp.in": ["mlp.fc_in.weight", "mlp.fc_gate.weight"]}.items():
            change = math.sqrt(sum((after[prefix + n] - before[prefix + n]).double().pow(2).sum().item() for n in names))
            size = math.sqrt(sum(before[prefix + n].double().pow(2).sum().item() for n in names))
            assert w.records[0].blocks[f"update/{role}"][layer] == pytest.approx(change / size, rel=1e-4), (role, layer)


def test_update_ratio_optimizer_first():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.blocks[1].mlp.fc_out.weight.detach().clone()
    x, y = make_batch()
    with watch(model, optimizer) as w:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        w.step(loss)
    change = (model.blocks[1].mlp.fc_out.weight - before).norm() / before.norm()
    assert w.records[0].blocks["update/mlp.out"][1] == pytest.approx(change.item(), rel=1e-4)
    assert w.records[0].scalars["lr"] == 0.5


def train_steps(model, optimizer, steps, optimizer_first=False, **options):
    """Train `steps` steps on fixed batches, returning the watch and each step's update ratio of block 1's FFN output."""
    weight = model.blocks[1].mlp.fc_out.weight
    ratios = []
    with watch(model, optimizer, **options) as w:
        for step in range(steps):
            x, y = make_batch(seed=step)
            before = weight.detach().clone()
            optimizer.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            if optimizer_first:
                optimizer.step()
                w.step(loss)
            else:
                w.step(loss)
                optimizer.step()
            ratios.append(((weight - before).norm() / before.norm()).item())
    return w, ratios


@pytest.mark.parametrize("optimizer_first", [False, True])
def test_update_every_takes_ratios_on_schedule(optimizer_first):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    w, ratios = train_steps(model, optimizer, 7, optimizer_first, update_every=3)
    assert [r.step for r in w.records] == list(range(7))
    for record in w.records:
        if record.step % 3 == 0:
            assert record.blocks["update/mlp.out"][1] == pytest.approx(ratios[record.step], rel=1e-4)
        else:
            assert not any(name.startswith("update/") for name in record.blocks), record.step
        assert record.scalars["lr"] == 0.5
        assert "act/resid_post_rms" in record.blocks
    arrays = w.arrays()
    assert np.isnan(arrays["update/mlp.out"][[1, 2, 4, 5]]).all()


@pytest.mark.parametrize("optimizer_first", [False, True])
@pytest.mark.parametrize(("update_every", "expected"), [(None, [0, 2, 4, 6, 8]), (4, [0, 4, 8])])
def test_update_ratio_of_own_step(update_every, expected, optimizer_first):
    # With every=2, each flush record carries the change made by its own
    # optimizer step, not by the step before it.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    w, ratios = train_steps(model, optimizer, 9, optimizer_first, every=2, update_every=update_every)
    with_update = {r.step: r.blocks["update/mlp.out"][1] for r in w.records if "update/mlp.out" in r.blocks}
    assert sorted(with_update) == expected
    for step, value in with_update.items():
        assert value == pytest.approx(ratios[step], rel=1e-4), step


@pytest.mark.parametrize("value", [0, -2, 3, 2.0, True, "4"])
def test_update_every_rejects_bad_values(value):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=r"a positive integer that is a multiple of every \(2\)"):
        watch(model, optimizer, every=2, update_every=value)
    assert not model.blocks[0]._forward_hooks


def test_update_every_accepts_numpy_integers():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    w, _ = train_steps(model, optimizer, 5, update_every=np.int64(2))
    assert w.update_every == 2
    assert [r.step for r in w.records if "update/mlp.out" in r.blocks] == [0, 2, 4]


def test_update_every_needs_optimizer():
    with pytest.raises(ValueError, match="update_every needs the optimizer"):
        watch(make_model(), update_every=4)


def test_no_update_without_optimizer():
    blocks = one_step(make_model()).records[0].blocks
    assert not any(name.startswith("update/") for name in blocks)


def attention_by_hand(block, hidden):
    attn = block.attn
    h = block.norm_attn_in(hidden) if block.norm_attn_in is not None else hidden
    q = attn.split_heads(attn.q(h))
    k = attn.split_heads(attn.k(h))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rotary(q), attn.rotary(k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    length = logits.shape[-1]
    logit_max, entropies = 0.0, []
    for b in range(1):  # the watch measures the first sequence of each micro-batch
        for head in range(logits.shape[1]):
            for t in range(length):
                row = logits[b, head, t, : t + 1].double()
                logit_max = max(logit_max, row.abs().max().item())
                p = row.softmax(dim=0)
                entropies.append(-(p * p.log()).sum().item())
    return logit_max, sum(entropies) / len(entropies)


@pytest.mark.parametrize("strategy", ["pre", "pre_qk", "hybrid"])
def test_attention_logits_by_hand(strategy):
    model = make_model(strategy)
    x, _ = make_batch()
    expected = []
    with torch.no_grad():
        hidden = model.tok_emb(x)
        for block in model.blocks:
            expected.append(attention_by_hand(block, hidden))
            hidden = block(hidden)
    blocks = one_step(model).records[0].blocks
    np.testing.assert_allclose(blocks["attn/logit_max"], [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(blocks["attn/entropy"], [e[1] for e in expected], rtol=1e-5)


def test_capture_flag_restored_on_close():
    model = make_model()
    one_step(model)
    assert all(not block.attn.capture_qk for block in model.blocks)
    assert all(block.attn.captured_qk is None for block in model.blocks)


def test_nonfinite_forward_located():
    model = make_model(depth=4)

    def poison(module, args, output):
        output = output.clone()
        output[0, 3, 5] = float("nan")
        output[1, 2, 0] = float("inf")
        return output

    model.blocks[2].mlp.register_forward_hook(poison)
    w = one_step(model)
    event = w.first_nonfinite
    assert (event.step, event.block, event.position, event.direction) == (0, 2, "mlp_out", "forward")
    assert event.count == 2
    assert w.records[0].first_nonfinite == event
    counts = w.records[0].blocks["nonfinite/mlp_out"]
    assert counts[:3] == [0.0, 0.0, 2.0]
    assert counts[3] > 0  # the NaN has spread through the stream into block 3


def test_nonfinite_backward_located():
    model = make_model(depth=4)

    def poison_gradient(module, args, output):
        def hook(grad):
            grad = grad.clone()
            grad[0, 0, 0] = float("nan")
            return grad

        output.register_hook(hook)

    # Registered after the watch's hooks, so the poisoned gradient reaches
    # the watch only in the blocks below block 1.
    x, y = make_batch()
    with watch(model) as w:
        model.blocks[1].register_forward_hook(poison_gradient)
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    event = w.first_nonfinite
    assert (event.step, event.block, event.position, event.direction) == (0, 0, "resid_post", "backward")


def test_nonfinite_loss_between_flushes():
    model = make_model()
    x, y = make_batch()
    with watch(model, every=4) as w:
        for value in (2.0, 2.0, float("nan"), 2.0, 2.0):
            _, loss = model(x, y)
            loss.backward()
            model.zero_grad()
            w.step(torch.tensor(value))
    event = w.first_nonfinite
    assert (event.step, event.block, event.position) == (2, None, "loss")


def test_finite_run_has_no_event():
    w = one_step(make_model())
    assert w.first_nonfinite is None
    assert w.records[0].blocks["nonfinite/resid_post"] == [0.0, 0.0, 0.0]


def position_module(block, position):
    """Return the module whose output is the stream tensor at `position` in a Pre-Norm block."""
    return {"attn_out": block.attn, "mlp_out": block.mlp, "resid_post": block}[position]


@pytest.mark.parametrize("block_index", [0, 1, 2])
@pytest.mark.parametrize("position", ["attn_out", "mlp_out", "resid_post"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_injection_with_sinks(block_index, position, value, tmp_path):
    model = make_model(depth=3)

    def poison(module, args, output):
        output = output.clone()
        output[0, 1, 2] = value
        return output

    position_module(model.blocks[block_index], position).register_forward_hook(poison)
    x, y = make_batch()
    with watch(model, log_dir=tmp_path / "tb", store=tmp_path / "store.sqlite") as w:
        for _ in range(2):
            _, loss = model(x, y)
            loss.backward()
            w.step(loss)
            model.zero_grad()
    event = w.first_nonfinite
    assert (event.step, event.block, event.position, event.direction) == (0, block_index, position, "forward")
    assert event.count == 1
    assert w.records[0].blocks[f"nonfinite/{position}"][block_index] == 1.0
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("block_index", [0, 1, 2])
def test_nonfinite_gradient_injection_located(block_index, tmp_path):
    model = make_model(depth=3)
    x, y = make_batch()
    with watch(model, log_dir=tmp_path / "tb", store=tmp_path / "store.sqlite") as w:

        def poison_gradient(module, args, output):
            def hook(grad):
                grad = grad.clone()
                grad[0, 0, 0] = float("inf")
                return grad

            output.register_hook(hook)

        # Registered after the watch's hooks: the poisoned gradient flows
        # into the blocks below this one.
        model.blocks[block_index].register_forward_hook(poison_gradient)
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    event = w.first_nonfinite
    if block_index == 0:
        # Nothing in the stream lies below block 0, so the Inf shows up only
        # in the parameter gradients: grad/total turns non-finite.
        assert (event.step, event.block, event.position) == (0, None, "grad/total")
    else:
        assert (event.step, event.block, event.position, event.direction) == (0, block_index - 1, "resid_post", "backward")


def attention_stats_by_hand(q, k):
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    length = logits.shape[-1]
    logit_max, entropy = 0.0, 0.0
    for head in range(logits.shape[1]):
        for t in range(length):
            row = logits[0, head, t, : t + 1]
            logit_max = max(logit_max, row.abs().max().item())
            p = row.softmax(dim=0)
            entropy -= torch.special.xlogy(p, p).sum().item()
    return logit_max, entropy


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_attention_stats_peaked_rows(scale):
    from stabiliscope.watch import stats

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 12, 8, generator=generator) * scale
    k = torch.randn(1, 2, 12, 8, generator=generator) * scale
    logit_max, entropy = stats.attention_stats(q, k)
    expected_max, expected_entropy = attention_stats_by_hand(q, k)
    assert logit_max.item() == pytest.approx(expected_max, rel=1e-5)
    assert entropy.item() == pytest.approx(expected_entropy, rel=1e-4, abs=1e-3)


def test_attention_stats_ignore_autocast():
    from stabiliscope.watch import stats

    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 12, 8, generator=generator)
    k = torch.randn(1, 2, 12, 8, generator=generator)
    plain = stats.attention_stats(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = stats.attention_stats(q, k)
        sum_sq = stats.sum_of_squares(q)
    assert cast[0].dtype == torch.float32
    assert cast[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert cast[1].item() == pytest.approx(plain[1].item(), rel=1e-6)
    assert sum_sq.item() == pytest.approx(q.double().pow(2).sum().item(), rel=1e-6)
