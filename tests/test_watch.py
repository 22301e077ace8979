"""Watch metrics on the reference model, checked against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from torch.overrides import TorchFunctionMode

from stabiliscope.data import load_corpus
from stabiliscope.errors import DiscoveryError
from stabiliscope.models import ModelConfig, build_model
from stabiliscope.sinks.store import RunStore, StoreSink
from stabiliscope.train import TrainConfig, train_model
from stabiliscope.watch import Watch, watch
from stabiliscope.watch.spikes import MAD_TO_STD, SpikeDetector

ROLE_PARAMS = {
    "attn.q": ["attn.q.weight"],
    "attn.k": ["attn.k.weight"],
    "attn.v": ["attn.v.weight"],
    "attn.o": ["attn.o.weight"],
    "mlp.in": ["mlp.fc_in.weight", "mlp.fc_gate.weight"],
    "mlp.out": ["mlp.fc_out.weight"],
}


def make_model(strategy="hybrid", depth=3):
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=depth, width=32, heads=4, strategy=strategy, max_seq_len=16))


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 8), generator=generator)
    y = torch.randint(0, 256, (2, 8), generator=generator)
    return x, y


def frobenius(tensors):
    return math.sqrt(sum(t.detach().double().pow(2).sum().item() for t in tensors))


def manual_forward(model, x, y):
    """Forward through the blocks by hand, keeping each stream tensor's gradient."""
    hidden = model.tok_emb(x) * model.embed_multiplier
    outputs = []
    for block in model.blocks:
        hidden = block(hidden)
        hidden.retain_grad()
        outputs.append(hidden)
    if model.norm_final is not None:
        hidden = model.norm_final(hidden)
    logits = hidden @ model.tok_emb.weight.T
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    return loss, outputs


def test_grad_role_norms_by_hand():
    model = make_model()
    x, y = make_batch()
    with watch(model) as w:
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    record = w.records[0]
    for layer, block in enumerate(model.blocks):
        params = dict(block.named_parameters())
        for role, names in ROLE_PARAMS.items():
            expected = frobenius(params[name].grad for name in names)
            assert record.blocks[f"grad/{role}"][layer] == pytest.approx(expected, rel=1e-5), (role, layer)
        norm_grads = [p.grad for name, p in params.items() if "norm" in name]
        assert record.blocks["grad/norm"][layer] == pytest.approx(frobenius(norm_grads), rel=1e-5)
        assert record.blocks["grad/block"][layer] == pytest.approx(
            frobenius(p.grad for p in params.values()), rel=1e-5
        )


def test_grad_total_by_hand():
    model = make_model()
    x, y = make_batch()
    with watch(model) as w:
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    expected = frobenius(p.grad for p in model.parameters())
    assert w.records[0].scalars["grad/total"] == pytest.approx(expected, rel=1e-5)
    assert w.records[0].scalars["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_stream_gradient_and_activations_by_hand():
    model = make_model("pre")
    x, y = make_batch()
    loss, outputs = manual_forward(model, x, y)
    loss.backward()
    expected_grad = [out.grad.double().norm().item() for out in outputs]
    expected_rms = [out.detach().double().pow(2).mean().sqrt().item() for out in outputs]
    expected_absmax = [out.detach().abs().max().item() for out in outputs]
    model.zero_grad()

    with watch(model) as w:
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    blocks = w.records[0].blocks
    np.testing.assert_allclose(blocks["grad/resid_post"], expected_grad, rtol=1e-5)
    np.testing.assert_allclose(blocks["act/resid_post_rms"], expected_rms, rtol=1e-5)
    np.testing.assert_allclose(blocks["act/resid_post_absmax"], expected_absmax, rtol=1e-6)


def test_branch_output_rms_by_hand():
    model = make_model("post")
    x, y = make_batch()
    hidden = model.tok_emb(x) * model.embed_multiplier
    attn_rms, mlp_rms = [], []
    with torch.no_grad():
        for block in model.blocks:
            attn_out = block.attn(hidden)
            mid = block.norm_mid(hidden + attn_out)
            mlp_out = block.mlp(mid)
            hidden = block.norm_post(mid + mlp_out)
            attn_rms.append(attn_out.double().pow(2).mean().sqrt().item())
            mlp_rms.append(mlp_out.double().pow(2).mean().sqrt().item())

    with watch(model) as w:
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    np.testing.assert_allclose(w.records[0].blocks["act/attn_out_rms"], attn_rms, rtol=1e-5)
    np.testing.assert_allclose(w.records[0].blocks["act/mlp_out_rms"], mlp_rms, rtol=1e-5)


def test_accumulated_gradient_one_record():
    model = make_model()
    batches = [make_batch(seed) for seed in range(3)]
    with watch(model) as w:
        for x, y in batches:
            _, loss = model(x, y)
            (loss / len(batches)).backward()
        w.step(loss)
    assert len(w.records) == 1
    expected = frobenius(p.grad for p in model.parameters())
    assert w.records[0].scalars["grad/total"] == pytest.approx(expected, rel=1e-5)
    mlp_out = [frobenius([b.mlp.fc_out.weight.grad]) for b in model.blocks]
    np.testing.assert_allclose(w.records[0].blocks["grad/mlp.out"], mlp_out, rtol=1e-5)


def test_accumulated_activations_pool_micro_batches():
    model = make_model("pre")
    batches = [make_batch(seed) for seed in range(2)]
    outputs = []
    with torch.no_grad():
        for x, _ in batches:
            hidden = model.tok_emb(x)
            for block in model.blocks:
                hidden = block(hidden)
            outputs.append(hidden)
    expected_rms = torch.cat(outputs).double().pow(2).mean().sqrt().item()

    with watch(model) as w:
        for x, y in batches:
            _, loss = model(x, y)
            loss.backward()
        w.step(loss)
    assert w.records[0].blocks["act/resid_post_rms"][-1] == pytest.approx(expected_rms, rel=1e-5)


def test_norms_taken_before_clipping():
    model = make_model()
    x, y = make_batch()
    with watch(model) as w:
        _, loss = model(x, y)
        loss.backward()
        unclipped = frobenius(p.grad for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=unclipped / 10)
        w.step(loss)
    assert w.records[0].scalars["grad/total"] == pytest.approx(unclipped, rel=1e-5)


def test_eval_and_no_grad_forwards_ignored():
    model = make_model("pre")
    x, y = make_batch()
    other_x, _ = make_batch(seed=5)
    loss, outputs = manual_forward(model, x, y)
    expected_rms = outputs[-1].detach().double().pow(2).mean().sqrt().item()
    model.zero_grad()

    with watch(model) as w:
        model.eval()
        model(other_x)
        model.train()
        with torch.no_grad():
            model(other_x * 0 + 7)
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    assert w.records[0].blocks["act/resid_post_rms"][-1] == pytest.approx(expected_rms, rel=1e-5)


def test_every_n_keeps_interval_extremes():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = [3.0, 9.0, 1.0, 4.0, 2.0, 5.0]
    x, y = make_batch()
    with watch(model, optimizer, every=3) as w:
        for value in losses:
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            w.step(torch.tensor(value))
            optimizer.step()
    assert [r.step for r in w.records] == [0, 3, 5]
    assert w.records[1].scalars["loss"] == 4.0
    assert w.records[1].scalars["loss/interval_max"] == 9.0
    assert w.records[1].scalars["loss/interval_min"] == 1.0
    assert w.records[1].scalars["lr"] == 0.0
    # Steps 4 and 5 come after the last flush step, in a closing record.
    assert w.records[2].scalars["loss"] == 5.0
    assert w.records[2].scalars["loss/interval_max"] == 5.0
    assert w.records[2].scalars["loss/interval_min"] == 2.0


def test_close_keeps_late_spike(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = make_batch()
    losses = [2.0 + 0.01 * (i % 3) for i in range(43)]
    losses[42] = 50.0
    store = RunStore(tmp_path / "store.sqlite")
    store.begin_run("r", {}, strategy="hybrid", depth=model.config.depth, width=model.config.width, seed=0)
    with watch(model, optimizer, every=10, sinks=[StoreSink(store, run_id="r")]) as w:
        for value in losses:
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.step(torch.tensor(value))
    assert [r.step for r in w.records] == [0, 10, 20, 30, 40, 42]
    closing = w.records[-1]
    assert closing.scalars["loss"] == 50.0
    assert closing.scalars["loss/interval_max"] == 50.0
    assert closing.scalars["loss/interval_min"] == pytest.approx(2.02)  # steps 41 and 42
    assert closing.scalars["grad/total/interval_max"] >= closing.scalars["grad/total/interval_min"] > 0
    # The closing record has the gradient norms of its own step. Forward
    # statistics and update ratios are only taken on flush steps.
    assert len(closing.blocks["grad/mlp.out"]) == model.config.depth
    assert not any(name.startswith(("act/", "attn/", "update/")) for name in closing.blocks)
    assert any(r.blocks.get("update/mlp.out") for r in w.records[:-1])
    assert [(s.step, s.metric) for s in w.spikes] == [(42, "loss")]
    assert w.spikes[0].value == 50.0

    assert store.last_step("r", "loss") == 42
    assert store.last_step("r", "act/resid_post_rms") == 40
    store.close()


def test_spike_between_flushes_keeps_value():
    model = make_model()
    x, y = make_batch()
    losses = [2.0 + 0.01 * (i % 3) for i in range(30)]
    losses[17] = 40.0
    with watch(model, every=10) as w:
        for value in losses:
            _, loss = model(x, y)
            loss.backward()
            w.step(torch.tensor(value))
            model.zero_grad()
    loss_spikes = [s for s in w.spikes if s.metric == "loss"]
    assert [s.step for s in loss_spikes] == [17]
    assert loss_spikes[0].value == 40.0
    assert loss_spikes[0].median == pytest.approx(2.01)
    assert w.records[2].scalars["loss/interval_max"] == 40.0


def test_exception_skips_closing_record():
    model = make_model()
    x, y = make_batch()
    with pytest.raises(RuntimeError, match="boom"):
        with watch(model, every=10) as w:
            for _ in range(3):
                _, loss = model(x, y)
                loss.backward()
                w.step(loss)
                model.zero_grad()
            raise RuntimeError("boom")
    assert [r.step for r in w.records] == [0]


class CallRecorder(TorchFunctionMode):
    """Record the name of every torch function and tensor method called."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# Calls that make the host wait for the device when the tensor lives on a GPU.
SYNCING_CALLS = {"item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"}


def train_step(model, watcher, batch):
    x, y = batch
    _, loss = model(x, y)
    loss.backward()
    watcher.step(loss)
    model.zero_grad()


def test_non_flush_step_makes_no_host_sync():
    model = make_model()
    batch = make_batch()
    with watch(model, every=4) as w:
        train_step(model, w, batch)
        with CallRecorder() as between:
            for _ in range(3):
                train_step(model, w, batch)
        with CallRecorder() as flush:
            train_step(model, w, batch)
    assert SYNCING_CALLS.isdisjoint(between.names), SYNCING_CALLS & set(between.names)
    assert "cpu" in flush.names
    assert [r.step for r in w.records] == [0, 4]


def test_non_flush_forward_skips_statistics():
    model = make_model()
    x, y = make_batch()
    with watch(model, every=2) as w:
        with CallRecorder() as flush_forward:
            _, loss = model(x, y)
        loss.backward()
        w.step(loss)
        with CallRecorder() as plain_forward:
            model(x, y)
    assert any("aminmax" in name for name in flush_forward.names)
    assert not any("aminmax" in name for name in plain_forward.names)


def test_spike_detector_by_hand():
    detector = SpikeDetector(series=1, window=8, threshold=6.0, min_history=8, device=torch.device("cpu"))
    history = [2.0, 2.1, 1.9, 2.0, 2.2, 1.8, 2.0, 2.1]
    for value in history:
        detector.score(torch.tensor([value]))
    result = detector.score(torch.tensor([5.0]))

    median = float(np.median(np.float32(history)))
    mad = float(np.median(np.abs(np.float32(history) - median)))
    expected_z = (5.0 - median) / (MAD_TO_STD * mad)
    assert result[0, 0].item() == 1.0
    assert result[0, 1].item() == pytest.approx(expected_z, rel=1e-4)
    assert result[0, 2].item() == pytest.approx(median)


def test_spike_detector_ignores_small_moves():
    detector = SpikeDetector(series=1, window=8, threshold=6.0, min_history=4, device=torch.device("cpu"))
    flags = [detector.score(torch.tensor([2.0 + 0.1 * (i % 3)]))[0, 0].item() for i in range(20)]
    assert sum(flags) == 0


def test_loss_spike_event_recorded():
    model = make_model()
    x, y = make_batch()
    losses = [2.0 + 0.05 * (i % 4) for i in range(30)] + [20.0]
    with watch(model, spike_window=32, spike_min_history=16) as w:
        for value in losses:
            _, loss = model(x, y)
            loss.backward()
            model.zero_grad()  # gradients of this test are irrelevant
            w.step(torch.tensor(value))
    loss_spikes = [s for s in w.spikes if s.metric == "loss"]
    assert [s.step for s in loss_spikes] == [30]
    assert loss_spikes[0].value == 20.0


def test_close_removes_every_hook():
    model = make_model()
    w = watch(model)
    assert w.attached
    w.close()
    assert not w.attached
    for module in model.modules():
        assert not module._forward_hooks
    for param in model.parameters():
        assert not param._post_accumulate_grad_hooks


def test_exception_inside_with_removes_hooks():
    model = make_model()
    with pytest.raises(KeyError):
        with watch(model):
            raise KeyError("boom")
    for module in model.modules():
        assert not module._forward_hooks
    for param in model.parameters():
        assert not param._post_accumulate_grad_hooks


def test_step_without_attach_raises():
    w = Watch(make_model())
    with pytest.raises(RuntimeError, match="not attached"):
        w.step(1.0)


def test_unknown_model_lists_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(DiscoveryError, match="0 \\(Linear\\)"):
        watch(model)


def test_arrays_shapes():
    model = make_model(depth=3)
    x, y = make_batch()
    with watch(model) as w:
        for _ in range(4):
            _, loss = model(x, y)
            loss.backward()
            w.step(loss)
            model.zero_grad()
    arrays = w.arrays()
    assert arrays["step"].tolist() == [0, 1, 2, 3]
    assert arrays["grad/mlp.out"].shape == (4, 3)
    assert arrays["loss"].shape == (4,)


def test_describe_lists_roles():
    w = Watch(make_model(depth=2))
    text = w.describe()
    assert "block 1:" in text
    assert "mlp.fc_gate.weight" in text


def test_watch_does_not_change_training():
    corpus = load_corpus()
    model_config = ModelConfig(depth=3, width=32, heads=4, strategy="hybrid")
    train_config = TrainConfig(steps=12, batch_size=4, seq_len=32, warmup=3, grad_clip=1.0, eval_batches=2)
    losses = {True: [], False: []}
    results = {}
    for enabled in (True, False):
        results[enabled] = train_model(
            model_config,
            train_config,
            corpus,
            on_step=lambda step, loss, enabled=enabled: losses[enabled].append(loss),
            watch_enabled=enabled,
        )
    assert losses[True] == losses[False]
    watched_model, bare_model = results[True][1], results[False][1]
    for (name, a), b in zip(watched_model.named_parameters(), bare_model.parameters()):
        assert torch.equal(a, b), name
    assert results[True][0].final_val_loss == results[False][0].final_val_loss
