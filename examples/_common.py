"""What the examples share: a word-level vocabulary with word-piece splitting (so the examples
need no tokenizer download), the training loop, and the throughput comparison with
transformers on a GPU."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>")
PIECE = 4  # characters per word piece: long words split as "trav", "##ell", "##ed"


def word_pieces(word: str) -> list[str]:
    """A word as pieces of at most PIECE characters, continuations marked "##" (WordPiece's
    convention), so that token classification has to align labels to pieces."""
    return [word[:PIECE]] + [
        "##" + word[i : i + PIECE - 1] for i in range(PIECE, len(word), PIECE - 1)
    ]


class Vocab:
    """Token <-> id over the special tokens and every piece of ``words``."""

    def __init__(self, words: Iterable[str]):
        pieces = sorted({p for w in words for p in word_pieces(w)})
        self.itos = list(SPECIALS) + pieces
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, self.stoi["[UNK]"])

    def encode_words(self, words: Iterable[str]) -> list[list[int]]:
        """Per word, the ids of its pieces."""
        return [[self[p] for p in word_pieces(w)] for w in words]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            t = self.itos[i]
            if t.startswith("##") and out:
                out[-1] += t[2:]
            else:
                out.append(t)
        return " ".join(out)


def pad_batch(
    rows: list[list[int]], pad: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (B, max_len), padded right (or left, for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def train(
    model: torch.nn.Module,
    make_batch: Callable[[int], dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    log_every: int = 10,
) -> list[float]:
    """AdamW on ``model(**make_batch(step)).loss``; prints the loss and tokens/s, returns
    every step's loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(steps):
        batch = make_batch(step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if step % log_every == 0 or step == steps - 1:
            rate = tokens / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({rate:,.0f} tokens/s)")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


def compare_with_transformers(
    model, hf_class_name: str, batch: dict[str, torch.Tensor], tmp_dir: str
):
    """On a GPU: training tokens/s of ``model`` and of the same model in transformers."""
    if not torch.cuda.is_available():
        return
    import transformers

    model.save_pretrained(tmp_dir)
    models = {
        "fastlm": model.cuda(),
        "transformers": getattr(transformers, hf_class_name).from_pretrained(tmp_dir).cuda(),
    }
    batch = {k: v.cuda() for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())
    for name, m in models.items():
        m.train()
        for i in range(13):  # 3 warm-up steps, 10 timed
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            m(**batch).loss.backward()
        torch.cuda.synchronize()
        print(f"{name:>12}: {10 * tokens / (time.perf_counter() - start):,.0f} training tokens/s")
