"""Lightning and Hugging Face Trainer callbacks, run on real trainers with tiny models."""

from __future__ import annotations

import importlib
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stabiliscope.errors import DiscoveryError
from stabiliscope.models import ModelConfig, build_model
from stabiliscope.watch import Sink

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from stabiliscope.integrations import StabiliscopeCallback, StabiliscopeTrainerCallback  # noqa: E402

MAX_STEPS = 3
ACCUMULATE = 2
CLIP = 1e-3  # far below the gradient norms of a fresh model, so every step is clipped


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'the model'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'the model'}"
    for name, param in model.named_parameters():
        assert not param._post_accumulate_grad_hooks, f"gradient hook left on {name}"


class MemorySink(Sink):
    """A sink that keeps the records it receives and whether it was closed."""

    def __init__(self) -> None:
        self.records: list = []
        self.closed = False

    def write(self, records, spikes) -> None:
        self.records.extend(records)

    def close(self) -> None:
        self.closed = True


def global_norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


# ---------------------------------------------------------------- Lightning


class ReferenceModule(pl.LightningModule):
    """The reference transformer, recording what the tests compare against."""

    def __init__(self, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.model = build_model(ModelConfig(depth=2, width=32, heads=4))
        self.fail_at_batch = fail_at_batch
        self.batch_losses: list[float] = []
        self.pre_clip_norms: list[float] = []
        self.post_clip_norms: list[float] = []
        self.weights_before_step: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("planned failure")
        inputs, targets = batch
        _, loss = self.model(inputs, targets)
        self.batch_losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls this after the callbacks' hook and before clipping.
        self.pre_clip_norms.append(global_norm(self.parameters()))
        self.weights_before_step.append(self.model.blocks[1].mlp.fc_out.weight.detach().clone())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.post_clip_norms.append(global_norm(self.parameters()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 256, (MAX_STEPS * ACCUMULATE * 2, 17), generator=generator)
        dataset = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return torch.utils.data.DataLoader(dataset, batch_size=2)


def fit(module: pl.LightningModule, callback: StabiliscopeCallback, root, plugins=None) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=CLIP,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=plugins,
    )
    trainer.fit(module)
    return trainer


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    torch.manual_seed(0)
    module = ReferenceModule()
    sink = MemorySink()
    callback = StabiliscopeCallback(sinks=[sink])
    trainer = fit(module, callback, tmp_path_factory.mktemp("lightning"))
    return SimpleNamespace(module=module, callback=callback, trainer=trainer, sink=sink)


def test_lightning_one_record_per_optimizer_step(lightning_run):
    records = lightning_run.callback.watch.records
    assert len(lightning_run.module.batch_losses) == MAX_STEPS * ACCUMULATE
    assert [record.step for record in records] == list(range(MAX_STEPS))


def test_lightning_update_ratio_of_each_step(lightning_run):
    # Lightning runs forward and backward in a closure inside optimizer.step(),
    # so the optimizer step begins before step() is called.
    weights = lightning_run.module.weights_before_step + [lightning_run.module.model.blocks[1].mlp.fc_out.weight]
    expected = [((after - before).norm() / before.norm()).item() for before, after in zip(weights, weights[1:])]
    recorded = [record.blocks["update/mlp.out"][1] for record in lightning_run.callback.watch.records]
    assert recorded == pytest.approx(expected, rel=1e-4)


def test_lightning_grad_total_is_pre_clip(lightning_run):
    module = lightning_run.module
    recorded = [record.scalars["grad/total"] for record in lightning_run.callback.watch.records]
    assert recorded == pytest.approx(module.pre_clip_norms, rel=1e-5)
    assert min(module.pre_clip_norms) > 10 * CLIP
    assert max(module.post_clip_norms) == pytest.approx(CLIP, rel=1e-3)


def test_lightning_loss_is_window_mean(lightning_run):
    losses = lightning_run.module.batch_losses
    expected = [sum(losses[i : i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(losses), ACCUMULATE)]
    recorded = [record.scalars["loss"] for record in lightning_run.callback.watch.records]
    assert recorded == pytest.approx(expected, rel=1e-5)


def test_lightning_detaches_on_fit_end(lightning_run):
    assert_no_hooks(lightning_run.module)
    optimizer = lightning_run.trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks


def test_lightning_writes_and_closes_sinks(lightning_run):
    assert [record.step for record in lightning_run.sink.records] == list(range(MAX_STEPS))
    assert lightning_run.sink.closed


def test_lightning_second_fit_needs_new_sinks(lightning_run, tmp_path):
    with pytest.raises(RuntimeError, match="create a new callback with new sinks"):
        fit(ReferenceModule(), lightning_run.callback, tmp_path)


def test_lightning_watch_name_and_depth(lightning_run):
    assert lightning_run.callback.watch.name == "ReferenceModule"
    assert lightning_run.callback.watch.depth == 2


def test_lightning_amp_values_unscaled(tmp_path):
    # fp16 autocast with a GradScaler runs on the CPU too, so the scaled path
    # is covered without a GPU.
    torch.manual_seed(0)
    module = ReferenceModule()
    callback = StabiliscopeCallback()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fit(module, callback, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])

    records = callback.watch.records
    losses = module.batch_losses
    expected_losses = [sum(losses[i : i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(losses), ACCUMULATE)]
    assert callback.watch.scaler is scaler
    assert [r.scalars["loss"] for r in records] == pytest.approx(expected_losses, rel=1e-5)
    # Lightning unscales the gradients before on_before_optimizer_step.
    assert [r.scalars["grad/total"] for r in records] == pytest.approx(module.pre_clip_norms, rel=1e-4)


def test_lightning_detaches_on_exception(tmp_path):
    module = ReferenceModule(fail_at_batch=3)
    callback = StabiliscopeCallback()
    with pytest.raises(RuntimeError, match="planned failure"):
        fit(module, callback, tmp_path)
    assert len(callback.watch.records) == 1
    assert_no_hooks(module)


def test_lightning_unknown_module_path(tmp_path):
    callback = StabiliscopeCallback(module="decoder")
    with pytest.raises(DiscoveryError, match="no submodule 'decoder'"):
        fit(ReferenceModule(), callback, tmp_path)


def test_lightning_rejects_bad_every():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        StabiliscopeCallback(every=0)


@pytest.mark.parametrize("callback_class", [StabiliscopeCallback, StabiliscopeTrainerCallback])
def test_callbacks_reject_bad_update_every(callback_class):
    with pytest.raises(ValueError, match=r"multiple of every \(2\), got 3"):
        callback_class(every=2, update_every=3)


# ------------------------------------------------------------- Hugging Face


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return transformers.LlamaForCausalLM(config)


class WeightLog(transformers.TrainerCallback):
    """Trainer callback that copies one weight before each optimizer step."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.before_step: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before_step.append(self.weight.detach().clone())


def test_trainer_callback_records_each_step(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    tokens = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        max_grad_norm=CLIP,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = StabiliscopeTrainerCallback()
    weights = WeightLog(model.model.layers[1].mlp.down_proj.weight)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback, weights])
    trainer.train()

    records = callback.watch.records
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    snapshots = weights.before_step + [weights.weight.detach()]
    expected = [((after - before).norm() / before.norm()).item() for before, after in zip(snapshots, snapshots[1:])]
    assert [r.blocks["update/mlp.out"][1] for r in records] == pytest.approx(expected, rel=1e-4)
    assert [record.step for record in records] == [0, 1, 2]
    assert callback.watch.roles == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "norm"]
    assert len(records[-1].blocks["grad/mlp.out"]) == 2
    # The Trainer logs each step's loss and its gradient norm before clipping.
    assert [r.scalars["loss"] for r in records] == pytest.approx([e["loss"] for e in logged], rel=1e-5)
    assert [r.scalars["grad/total"] for r in records] == pytest.approx([e["grad_norm"] for e in logged], rel=1e-5)
    assert_no_hooks(model)


def test_trainer_callback_steps_on_step_end():
    # With a Trainer that never sends on_pre_optimizer_step, the watch steps
    # in on_step_end. The loss of a step is the mean of its micro-batch losses.
    torch.manual_seed(0)
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(average_tokens_across_devices=False, world_size=1)
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    callback = StabiliscopeTrainerCallback()
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)

    losses = []
    for seed in (1, 2):
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
        loss = model(input_ids=tokens, labels=tokens).loss
        (loss / 2).backward()
        losses.append(loss.item())
    optimizer.step()
    callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)

    records = callback.watch.records
    assert len(records) == 1
    assert records[0].scalars["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert_no_hooks(model)


def test_trainer_callback_loss_nan_without_model_loss():
    model = tiny_llama()
    callback = StabiliscopeTrainerCallback()
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    callback.on_train_begin(None, state, control, model=model, optimizer=None)

    tokens = torch.randint(0, 64, (2, 8))
    logits = model(input_ids=tokens).logits
    logits.float().square().mean().backward()
    callback.on_pre_optimizer_step(None, state, control)
    callback.close()

    assert math.isnan(callback.watch.records[0].scalars["loss"])
    assert_no_hooks(model)


# ------------------------------------------------------------ missing extras


@pytest.mark.parametrize(
    ("module_name", "missing", "command"),
    [
        ("stabiliscope.integrations.lightning", "lightning.pytorch", "pip install 'lightning>=2.2'"),
        ("stabiliscope.integrations.huggingface", "transformers", "pip install 'transformers>=4.40' accelerate"),
    ],
)
def test_missing_framework_names_install_command(monkeypatch, module_name, missing, command):
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, module_name)
    with pytest.raises(ImportError, match=re.escape(command)):
        importlib.import_module(module_name)
