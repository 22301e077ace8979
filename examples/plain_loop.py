"""Watch a plain PyTorch training loop.

Trains the reference transformer on the built-in corpus with an ordinary
loop, attaches `stabiliscope.watch` in two lines, and prints the depth
profile of the FFN output-weight gradient at the first and last step.

    python examples/plain_loop.py --steps 50 --strategy hybrid
"""

from __future__ import annotations

import argparse

import torch

import stabiliscope
from stabiliscope.data import load_corpus, sample_batch
from stabiliscope.models import STRATEGIES, ModelConfig, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--depth", type=int, default=6, help="transformer blocks")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="pre")
    args = parser.parse_args()

    torch.manual_seed(0)
    corpus = load_corpus()
    model = build_model(ModelConfig(depth=args.depth, width=64, heads=4, strategy=args.strategy))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    with stabiliscope.watch(model, optimizer) as w:
        for _ in range(args.steps):
            x, y = sample_batch(corpus.train, batch_size=8, seq_len=64, generator=generator)
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            w.step(loss)
            optimizer.step()

    arrays = w.arrays()
    print(f"loss: {arrays['loss'][0]:.3f} -> {arrays['loss'][-1]:.3f}")
    for label, row in (("first step", 0), ("last step", -1)):
        profile = " ".join(f"{value:.3g}" for value in arrays["grad/mlp.out"][row])
        print(f"grad/mlp.out by layer, {label}: {profile}")


if __name__ == "__main__":
    main()
