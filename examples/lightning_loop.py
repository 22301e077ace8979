"""Watch a Lightning training run.

Wraps the reference transformer in a LightningModule, trains it on the
built-in corpus with gradient accumulation and clipping, and records it with
`StabiliscopeCallback`. Prints the depth profile of the FFN output-weight
gradient (before clipping) at the first and last optimizer step. Needs
the `lightning` extra (`pip install '.[lightning]'` in the repository); writes no files.

    python examples/lightning_loop.py --steps 50 --accumulate 2 --strategy hybrid
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from stabiliscope.data import load_corpus, sample_batch
from stabiliscope.integrations.lightning import StabiliscopeCallback
from stabiliscope.models import STRATEGIES, ModelConfig, build_model


class CorpusBatches(IterableDataset):
    """An endless stream of random (inputs, targets) windows of a token tensor."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield sample_batch(self.tokens, self.batch_size, self.seq_len, generator)


class LanguageModel(pl.LightningModule):
    """The reference transformer as a LightningModule."""

    def __init__(self, config: ModelConfig, lr: float) -> None:
        super().__init__()
        self.model = build_model(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        _, loss = self.model(inputs, targets)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--depth", type=int, default=6, help="transformer blocks")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="pre")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    args = parser.parse_args()

    # A single-process example has no use for data-loader workers.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    torch.manual_seed(0)
    corpus = load_corpus()
    module = LanguageModel(ModelConfig(depth=args.depth, width=64, heads=4, strategy=args.strategy), lr=1e-3)
    loader = DataLoader(CorpusBatches(corpus.train, batch_size=8, seq_len=64, seed=0), batch_size=None)

    callback = StabiliscopeCallback()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    arrays = callback.watch.arrays()
    print(f"optimizer steps recorded: {len(arrays['step'])}")
    print(f"loss: {arrays['loss'][0]:.3f} -> {arrays['loss'][-1]:.3f}")
    print(f"grad/total before clipping to {args.clip}: {arrays['grad/total'][0]:.3g} -> {arrays['grad/total'][-1]:.3g}")
    for label, row in (("first step", 0), ("last step", -1)):
        profile = " ".join(f"{value:.3g}" for value in arrays["grad/mlp.out"][row])
        print(f"grad/mlp.out by layer, {label}: {profile}")


if __name__ == "__main__":
    main()
