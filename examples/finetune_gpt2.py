"""Causal-LM fine-tuning of a tiny GPT-2 on a text file, then generation.

Every line of the corpus is one training sequence ending with ``<|endoftext|>``; labels are
the inputs (the model shifts them) with padding set to -100. After training, greedy
generate() continues a prompt and stops at ``<|endoftext|>`` (the config's eos_token_id).

    python examples/finetune_gpt2.py [--corpus FILE] [--steps N] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import DATA, Vocab, compare_with_transformers, pad_batch, train

import fastlm.models as fm

EOS = "<|endoftext|>"


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=f"{DATA}/corpus.txt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt", default="the cat")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    with open(args.corpus) as f:
        lines = [line.split() for line in f if line.strip()]
    vocab = Vocab(w for line in lines for w in line)
    eos = vocab[EOS]
    rows = [[t for w in vocab.encode_words(line) for t in w] + [eos] for line in lines]
    config = fm.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos,
                           eos_token_id=eos, pad_token_id=vocab["[PAD]"])  # fmt: skip
    model = fm.GPT2LMHeadModel(config)

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        pick = torch.randint(len(rows), (args.batch_size,), generator=gen)
        ids, mask = pad_batch([rows[i] for i in pick], config.pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }

    losses = train(model, make_batch, args.steps, lr=3e-3)
    model.eval()
    prompt = [t for w in vocab.encode_words(args.prompt.split()) for t in w]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=20)
    print(f"{args.prompt!r} -> {vocab.decode(out[0, len(prompt) :].tolist())!r}")
    with tempfile.TemporaryDirectory() as tmp:
        compare_with_transformers(model, "GPT2LMHeadModel", make_batch(0), tmp)
    return losses


if __name__ == "__main__":
    main()
