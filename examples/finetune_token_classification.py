"""Fine-tune a tiny BERT for named-entity recognition (token classification).

Each line of the data file is a sentence of ``word/TAG`` items (BIO tags). Words are split
into word pieces; as in transformers' token-classification recipe the first piece of a word
carries the word's label and the following pieces get -100 (ignored by the loss), so the
model predicts one tag per word.

    python examples/finetune_token_classification.py [--data FILE] [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import DATA, Vocab, compare_with_transformers, pad_batch, train

import fastlm.models as fm


def read_tagged(path: str) -> list[list[tuple[str, str]]]:
    sentences = []
    with open(path) as f:
        for line in f:
            if line.strip():
                sentences.append([tuple(item.rsplit("/", 1)) for item in line.split()])
    return sentences


def align_labels(pieces_per_word: list[list[int]], tags: list[int]) -> tuple[list[int], list[int]]:
    """(piece ids, labels): the word's tag on its first piece, -100 on the others."""
    ids, labels = [], []
    for pieces, tag in zip(pieces_per_word, tags):
        ids += pieces
        labels += [tag] + [-100] * (len(pieces) - 1)
    return ids, labels


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=f"{DATA}/ner.txt")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    sentences = read_tagged(args.data)
    vocab = Vocab(w for s in sentences for w, _ in s)
    tags = sorted({t for s in sentences for _, t in s})
    config = fm.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           id2label=dict(enumerate(tags)))  # fmt: skip
    model = fm.BertForTokenClassification(config)

    rows, label_rows = [], []
    for s in sentences:
        ids, labels = align_labels(
            vocab.encode_words(w for w, _ in s), [tags.index(t) for _, t in s]
        )
        rows.append([vocab["[CLS]"], *ids, vocab["[SEP]"]])
        label_rows.append([-100, *labels, -100])
    ids, mask = pad_batch(rows, vocab["[PAD]"])
    labels, _ = pad_batch(label_rows, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    losses = train(model, lambda step: batch, args.steps, lr=3e-3)
    model.eval()
    with torch.no_grad():
        pred = model(ids, attention_mask=mask).logits.argmax(-1)
    words = labels != -100
    print(
        f"word-level tag accuracy on the training sentences: {(pred[words] == labels[words]).float().mean():.2%}"
    )
    first = [config.id2label[int(t)] for t in pred[0][words[0]]]
    print("first sentence:", " ".join(f"{w}/{t}" for (w, _), t in zip(sentences[0], first)))
    with tempfile.TemporaryDirectory() as tmp:
        compare_with_transformers(model, "BertForTokenClassification", batch, tmp)
    return losses


if __name__ == "__main__":
    main()
