"""Watch a Hugging Face Llama model in a plain PyTorch loop.

Builds a small `LlamaForCausalLM` from a config (random weights, nothing is
downloaded), trains it on the built-in corpus read as byte ids, and prints
the depth profile of the FFN output-weight gradient at the first and last
step. Needs the `hf` extra: `pip install '.[hf]'` in the repository.

    python examples/hf_llama.py --steps 50 --depth 6
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stabiliscope
from stabiliscope.data import load_corpus, sample_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--depth", type=int, default=6, help="decoder layers")
    args = parser.parse_args()

    torch.manual_seed(0)
    corpus = load_corpus()
    config = LlamaConfig(
        vocab_size=256,  # byte ids
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=args.depth,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    with stabiliscope.watch(model, optimizer) as w:
        for _ in range(args.steps):
            # sample_batch's targets are the inputs shifted by one token, and
            # Llama shifts `labels` itself, so the inputs serve as labels.
            x, _ = sample_batch(corpus.train, batch_size=8, seq_len=64, generator=generator)
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            w.step(loss)
            optimizer.step()

    print(w.describe().splitlines()[0])
    arrays = w.arrays()
    print(f"loss: {arrays['loss'][0]:.3f} -> {arrays['loss'][-1]:.3f}")
    for label, row in (("first step", 0), ("last step", -1)):
        profile = " ".join(f"{value:.3g}" for value in arrays["grad/mlp.out"][row])
        print(f"grad/mlp.out by layer, {label}: {profile}")


if __name__ == "__main__":
    main()
