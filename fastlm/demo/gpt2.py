"""The demo's GPT-2 part: greedy ``generate`` of fastlm's GPT2LMHeadModel against transformers'.

Two batches: one prompt (B=1), and four prompts of different lengths left-padded into one
batch (B=4), the layout ``generate`` expects. Both sides generate exactly ``new_tokens``
tokens per prompt (``min_new_tokens`` = ``max_new_tokens``), so tokens/s compares equal
work. Parity is the share of generated tokens on which the two agree.

The model is a local checkpoint (``--gpt2 DIR``), else random weights (seeded) of the gpt2
124M config, or with ``--quick`` of a tiny two-layer config.
"""

from __future__ import annotations

import functools

import torch

from fastlm.demo.table import Row, Section
from fastlm.demo.timing import time_calls

PATHS = ("GPT-2 generate, B=1", "GPT-2 generate, B=4 left-padded")

# --quick: small enough that the whole GPT-2 part takes well under a second on a CPU
TINY = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, bos_token_id=999,
            eos_token_id=999)  # fmt: skip


def _models(ckpt: str | None, device: torch.device, dtype: torch.dtype, quick: bool):
    import transformers

    from fastlm.models import GPT2LMHeadModel

    if ckpt:
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa")
        what = f"checkpoint {ckpt}"
    else:
        cfg = transformers.GPT2Config(**(TINY if quick else {}))
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        size = sum(p.numel() for p in hf.parameters()) / 1e6
        config = "tiny config" if quick else "gpt2 config"
        what = f"random weights, {config} ({size:.1f}M parameters)"
    hf = hf.to(device, dtype).eval()
    return hf, GPT2LMHeadModel.from_hf(hf).eval(), what


def _prompts(lengths: list[int], vocab: int, device: torch.device):
    """Random prompt ids, left-padded to the longest, with their attention mask."""
    gen = torch.Generator().manual_seed(0)
    seq = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    return ids.to(device), mask.to(device)


def agreement(got: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> float:
    """Share of the generated tokens (after the prompt) on which two outputs agree; a
    length mismatch counts the missing positions as disagreements."""
    new_got, new_ref = got[:, prompt_len:], ref[:, prompt_len:]
    n = min(new_got.shape[1], new_ref.shape[1])
    total = max(new_got.shape[1], new_ref.shape[1]) * ref.shape[0]
    if total == 0:
        return 1.0
    return (new_got[:, :n] == new_ref[:, :n]).sum().item() / total


def run(
    ckpt: str | None,
    device: torch.device,
    dtype: torch.dtype,
    runs: int,
    quick: bool,
    new_tokens: int,
) -> Section:
    hf, ours, what = _models(ckpt, device, dtype, quick)
    prompt = 8 if quick else 32
    batches = {PATHS[0]: [prompt], PATHS[1]: [prompt, prompt * 3 // 4, prompt // 2, prompt // 4]}
    pad = hf.config.pad_token_id
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=hf.config.eos_token_id if pad is None else pad)  # fmt: skip
    rows = []
    for path, lengths in batches.items():
        ids, mask = _prompts(lengths, hf.config.vocab_size, device)
        calls = {
            "hf": functools.partial(hf.generate, ids, attention_mask=mask, **kw),
            "fastlm": functools.partial(ours.generate, ids, attention_mask=mask, **kw),
        }
        with torch.inference_mode():
            outputs, ms = time_calls(calls, runs, device)
        agree = agreement(outputs["fastlm"], outputs["hf"], ids.shape[1])
        tokens = len(lengths) * new_tokens
        rows.append(Row(path, f"tokens agree {agree:.1%}", ms["fastlm"], ms["hf"], tokens))
    title = (
        f"GPT-2, {what}: greedy generate, {new_tokens} new tokens per prompt; B=1 prompt "
        f"of {prompt} tokens, B=4 prompts of {'/'.join(map(str, batches[PATHS[1]]))} tokens"
    )
    return Section(title, rows)
