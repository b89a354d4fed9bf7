"""Pretrain a tiny BERT from a text file with BERT's two objectives.

* Next sentence prediction: pairs ``[CLS] s1 [SEP] s2 [SEP]`` (segment 0, then 1) where s2
  is the sentence after s1 in the same document half of the time (label 0) and a random
  sentence of another document otherwise (label 1).
* Masked LM: 15% of the word pieces are selected; of those 80% become [MASK], 10% a random
  token, 10% stay; the loss reads the selected positions only (labels -100 elsewhere).

The corpus has one sentence per line and documents separated by blank lines.

    python examples/pretrain_bert.py [--corpus FILE] [--steps N]
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile

import torch
from _common import DATA, SPECIALS, Vocab, compare_with_transformers, pad_batch, train

import fastlm.models as fm


def read_documents(path: str) -> list[list[list[str]]]:
    """Documents -> sentences -> words."""
    docs, cur = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                cur.append(line.split())
            elif cur:
                docs.append(cur)
                cur = []
    if cur:
        docs.append(cur)
    if len(docs) < 2:
        raise ValueError(
            f"{path}: NSP needs at least two documents (separate them by a blank line)"
        )
    return docs


def nsp_pairs(docs, rng: random.Random):
    """(sentence, next sentence or a random one, label) with label 1 = random, 50/50."""
    pairs = []
    for d, doc in enumerate(docs):
        for a, b in itertools.pairwise(doc):
            if rng.random() < 0.5:
                pairs.append((a, b, 0))
            else:
                other = rng.choice([o for i, o in enumerate(docs) if i != d])
                pairs.append((a, rng.choice(other), 1))
    return pairs


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, vocab_size: int, mask_id: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BERT's masking: 15% of the non-special positions; 80% [MASK], 10% random, 10% kept."""
    labels = ids.clone()
    selected = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    labels[~selected] = -100
    roll = torch.rand(ids.shape, generator=gen)
    ids = ids.clone()
    ids[selected & (roll < 0.8)] = mask_id
    random_ids = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=gen)
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    ids[swap] = random_ids[swap]
    return ids, labels


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=f"{DATA}/corpus.txt")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    docs = read_documents(args.corpus)
    vocab = Vocab(w for doc in docs for s in doc for w in s)
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    config = fm.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = fm.BertForPreTraining(config)

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        pairs = nsp_pairs(docs, rng)
        pairs = [pairs[i] for i in torch.randint(len(pairs), (args.batch_size,), generator=gen)]
        rows, segments = [], []
        for a, b, _ in pairs:
            ia = [t for w in vocab.encode_words(a) for t in w]
            ib = [t for w in vocab.encode_words(b) for t in w]
            rows.append([cls, *ia, sep, *ib, sep])
            segments.append([0] * (len(ia) + 2) + [1] * (len(ib) + 1))
        ids, mask = pad_batch(rows, vocab["[PAD]"])
        token_type_ids, _ = pad_batch(segments, 0)
        special = (ids == cls) | (ids == sep) | (mask == 0)
        ids, labels = mask_tokens(ids, special, len(vocab), vocab["[MASK]"], gen)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
            "next_sentence_label": torch.tensor([label for _, _, label in pairs]),
        }

    losses = train(model, make_batch, args.steps, lr=4e-3)
    with tempfile.TemporaryDirectory() as tmp:
        compare_with_transformers(model, "BertForPreTraining", make_batch(0), tmp)
    return losses


if __name__ == "__main__":
    main()
