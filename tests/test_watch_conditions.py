"""The watch under real training conditions: mixed precision, checkpointing,
in-place edits, compilation, several models, and repeated attach/detach."""

import gc
import math
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from stabiliscope.models import ModelConfig, build_model
from stabiliscope.watch import Watch, watch


def make_model(strategy="pre", depth=3, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(depth=depth, width=32, heads=4, strategy=strategy, max_seq_len=16))


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 8), generator=generator)
    y = torch.randint(0, 256, (2, 8), generator=generator)
    return x, y


def frobenius(tensors):
    return math.sqrt(sum(t.detach().double().pow(2).sum().item() for t in tensors))


def no_hooks_left(model):
    modules_clean = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    params_clean = all(not p._post_accumulate_grad_hooks for p in model.parameters())
    return modules_clean and params_clean


def test_bf16_autocast_grad_norms():
    model = make_model()
    x, y = make_batch()
    with watch(model) as w:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        w.step(loss)
    record = w.records[0]
    assert record.scalars["grad/total"] == pytest.approx(frobenius(p.grad for p in model.parameters()), rel=1e-5)
    assert all(math.isfinite(v) for v in record.blocks["act/resid_post_rms"])


def test_grad_scaler_norms_unscaled():
    reference = make_model()
    x, y = make_batch()
    _, loss = reference(x, y)
    loss.backward()
    expected = frobenius(p.grad for p in reference.parameters())
    expected_mlp_out = [frobenius([b.mlp.fc_out.weight.grad]) for b in reference.blocks]

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with watch(model, optimizer, scaler=scaler) as w:
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        w.step(loss)
        scaler.step(optimizer)
        scaler.update()
    assert w.records[0].scalars["grad/total"] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(w.records[0].blocks["grad/mlp.out"], expected_mlp_out, rtol=1e-5)


def test_grad_scaler_stream_gradient_unscaled():
    x, y = make_batch()
    plain = make_model()
    with watch(plain) as w_plain:
        _, loss = plain(x, y)
        loss.backward()
        w_plain.step(loss)

    scaled = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with watch(scaled, scaler=scaler) as w_scaled:
        _, loss = scaled(x, y)
        scaler.scale(loss).backward()
        w_scaled.step(loss)
    np.testing.assert_allclose(
        w_scaled.records[0].blocks["grad/resid_post"], w_plain.records[0].blocks["grad/resid_post"], rtol=1e-5
    )


def test_fp16_autocast_with_scaler_unscaled():
    x, y = make_batch()
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    captured = {}
    with watch(model, scaler=scaler) as w:
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        w.step(loss)
        captured["total"] = frobenius(p.grad for p in model.parameters()) / 2.0**8
    assert w.records[0].scalars["grad/total"] == pytest.approx(captured["total"], rel=1e-4)


def test_fp16_overflow_step_still_recorded():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = make_batch()
    with watch(model, optimizer, scaler=scaler) as w:
        for poisoned in (True, False):
            _, loss = model(x, y)
            scaler.scale(loss * (math.inf if poisoned else 1.0)).backward()
            w.step(loss)
            scaler.step(optimizer)  # skipped on the poisoned step: its grads are not finite
            scaler.update()
            optimizer.zero_grad()
    assert [r.step for r in w.records] == [0, 1]
    assert not any(name.startswith("update/") for name in w.records[0].blocks)
    assert "update/mlp.out" in w.records[1].blocks


class CheckpointedModel(torch.nn.Module):
    """The reference model with each block run under activation checkpointing."""

    def __init__(self, inner, use_reentrant=False):
        super().__init__()
        self.inner = inner
        self.blocks = inner.blocks
        self.use_reentrant = use_reentrant

    def forward(self, x, y):
        hidden = self.inner.tok_emb(x)
        for block in self.blocks:
            hidden = checkpoint(block, hidden, use_reentrant=self.use_reentrant)
        logits = self.inner.norm_final(hidden) @ self.inner.tok_emb.weight.T
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_not_counted_twice(use_reentrant):
    x, y = make_batch()
    plain = make_model()
    with watch(plain) as w_plain:
        _, loss = plain(x, y)
        loss.backward()
        w_plain.step(loss)

    wrapped = CheckpointedModel(make_model(), use_reentrant=use_reentrant)
    mapping = {
        "blocks": "blocks",
        "roles": {"mlp.out": [r"^mlp\.fc_out\.weight$"], "attn.q": [r"^attn\.q\.weight$"]},
        "attn_out": ["attn"],
        "mlp_out": ["mlp"],
    }
    with watch(wrapped, mapping=mapping) as w_ckpt:
        loss = wrapped(x, y)
        loss.backward()
        w_ckpt.step(loss)

    plain_blocks, ckpt_blocks = w_plain.records[0].blocks, w_ckpt.records[0].blocks
    for metric in ("act/resid_post_rms", "act/attn_out_rms", "act/mlp_out_rms", "grad/mlp.out", "grad/resid_post"):
        np.testing.assert_allclose(ckpt_blocks[metric], plain_blocks[metric], rtol=1e-5, err_msg=metric)


def test_inplace_edit_of_block_output():
    model = make_model(depth=2)
    x, y = make_batch()

    def double_in_place(module, args, output):
        output.mul_(2.0)

    with watch(model) as w:
        model.blocks[0].register_forward_hook(double_in_place)
        _, loss = model(x, y)
        loss.backward()
        w.step(loss)

    # By hand: the watch describes block 0's output as the block produced it,
    # before the user's in-place doubling.
    torch.manual_seed(0)
    reference = make_model(depth=2)
    produced = reference.blocks[0](reference.tok_emb(x))
    doubled = produced * 2.0
    doubled.retain_grad()
    logits = reference.norm_final(reference.blocks[1](doubled)) @ reference.tok_emb.weight.T
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).backward()
    record = w.records[0].blocks
    assert record["act/resid_post_rms"][0] == pytest.approx(produced.detach().pow(2).mean().sqrt().item(), rel=1e-5)
    assert record["grad/resid_post"][0] == pytest.approx((doubled.grad * 2.0).norm().item(), rel=1e-5)


def test_compiled_model_records_like_eager():
    x, y = make_batch()
    eager = make_model(depth=2)
    with watch(eager) as w_eager:
        _, loss = eager(x, y)
        loss.backward()
        w_eager.step(loss)

    compiled = torch.compile(make_model(depth=2))
    with watch(compiled) as w_compiled:
        _, loss = compiled(x, y)
        loss.backward()
        w_compiled.step(loss)
    for metric in ("grad/mlp.out", "act/resid_post_rms", "grad/resid_post"):
        np.testing.assert_allclose(
            w_compiled.records[0].blocks[metric], w_eager.records[0].blocks[metric], rtol=1e-4, err_msg=metric
        )


def test_two_models_watched_at_once():
    first, second = make_model(depth=2, seed=1), make_model(depth=3, seed=2)
    x, y = make_batch()
    with watch(first, name="first") as w_first, watch(second, name="second") as w_second:
        _, loss_first = first(x, y)
        _, loss_second = second(x, y)
        (loss_first + loss_second).backward()
        w_first.step(loss_first)
        w_second.step(loss_second)
    assert w_first.records[0].scalars["grad/total"] == pytest.approx(frobenius(p.grad for p in first.parameters()), rel=1e-5)
    assert w_second.records[0].scalars["grad/total"] == pytest.approx(frobenius(p.grad for p in second.parameters()), rel=1e-5)
    assert len(w_second.records[0].blocks["grad/mlp.out"]) == 3


def test_thousands_of_attach_detach():
    model = make_model(depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(50):
        Watch(model, optimizer).attach().close()
    gc.collect()
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(2000):
        Watch(model, optimizer).attach().close()
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert no_hooks_left(model)
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks
    assert end - start < 256 * 1024


def test_closed_watch_cannot_reattach():
    w = watch(make_model())
    w.close()
    with pytest.raises(RuntimeError, match="was closed"):
        w.attach()


def test_exception_in_step_loop_removes_hooks():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batch()
    with pytest.raises(ValueError):
        with watch(model, optimizer) as w:
            _, loss = model(x, y)
            loss.backward()
            w.step(loss)
            raise ValueError("user code failed")
    assert no_hooks_left(model)
    assert not optimizer._optimizer_step_post_hooks


def test_log_dir_and_store_sinks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stabiliscope.sinks.store import RunStore

    model = make_model(depth=2)
    x, y = make_batch()
    with watch(model, name="my-run", log_dir=tmp_path / "tb", store=tmp_path / "runs.sqlite") as w:
        for _ in range(2):
            _, loss = model(x, y)
            loss.backward()
            w.step(loss)
            model.zero_grad()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert len(events.Scalars("loss")) == 2
    with RunStore(tmp_path / "runs.sqlite") as store:
        run = store.get_run("my-run")
        assert run.status == "completed"
        assert run.depth == 2
        assert store.block_profile("my-run", "grad/mlp.out", 1) == pytest.approx(w.records[1].blocks["grad/mlp.out"])
