"""The op checks run by ``python -m fastlm check``: what each check is (:class:`Check`) and
the table of them (:data:`CHECKS`). The runner, fastlm/selfcheck.py, imports this module;
nothing here imports it back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Args = dict[str, object]


@dataclass
class Check:
    """One public op's check: ``make(dtype, device)`` builds its inputs, ``run(backend,
    **inputs)`` calls the op, ``oracle(**inputs)`` is the high-precision answer (run on fp64
    copies) and ``lowp(**inputs)`` PyTorch's own op in the input dtype, the parity rule's
    baseline (and what ``python -m fastlm bench`` times fastlm against)."""

    op: str
    make: Callable[[torch.dtype, torch.device], Args]
    run: Callable[..., object]  # run(backend, **args)
    oracle: Callable[..., object]  # oracle(**args) on fp64 copies
    lowp: Callable[..., object]  # PyTorch in the input dtype
    module: str  # the op's module; the check is skipped when it is absent
    differentiable: bool = True
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    grad_args: tuple[str, ...] = field(default=())


def _ln_make(dtype, device):
    m, n = 37, 1000
    return {
        "x": torch.randn(m, n, device=device).to(dtype),
        "weight": (1 + 0.2 * torch.randn(n, device=device)).to(dtype),
        "bias": (0.2 * torch.randn(n, device=device)).to(dtype),
        "residual": torch.randn(m, n, device=device).to(dtype),
    }


def _ln_run(backend, x, weight, bias, residual):
    from fastlm.ops.layer_norm import layer_norm

    return layer_norm(x, weight, bias, 1e-5, residual=residual, backend=backend)


def _ln_oracle(x, weight, bias, residual):
    from fastlm.reference.layer_norm import layer_norm

    return layer_norm(x, weight, bias, 1e-5, residual)


def _ln_lowp(x, weight, bias, residual):
    z = x + residual
    return F.layer_norm(z, z.shape[-1:], weight, bias, 1e-5), z


CHECKS: list[Check] = [
    Check(
        op="layer_norm",
        make=_ln_make,
        run=_ln_run,
        oracle=_ln_oracle,
        lowp=_ln_lowp,
        module="fastlm.ops.layer_norm",
        grad_args=("x", "weight", "bias", "residual"),
    ),
]


# ------------------------------------------------------------------ feed-forward


def _ffn_make(dtype, device):
    m, k, n = 33, 384, 1000
    g = lambda *s, scale=1.0: (scale * torch.randn(*s, device=device)).to(dtype)
    return {
        "x": g(m, k),
        "w1": g(n, k, scale=k**-0.5),
        "b1": g(n, scale=0.1),
        "w2": g(k, n, scale=n**-0.5),
        "b2": g(k, scale=0.1),
        "residual": g(m, k),
    }


def _lg_run(backend, x, w1, b1, w2, b2, residual):
    from fastlm.ops.ffn import linear_gelu

    return linear_gelu(x, w1, b1, approximate="tanh", backend=backend)


def _lg_oracle(x, w1, b1, w2, b2, residual):
    from fastlm.reference.ffn import linear_gelu

    return linear_gelu(x, w1, b1, "tanh")


def _lg_lowp(x, w1, b1, w2, b2, residual):
    return F.gelu(F.linear(x, w1, b1), approximate="tanh")


def _ffn_run(backend, x, w1, b1, w2, b2, residual):
    from fastlm.ops.ffn import gelu_ffn

    return gelu_ffn(x, w1, b1, w2, b2, approximate="none", residual=residual, backend=backend)


def _ffn_oracle(x, w1, b1, w2, b2, residual):
    from fastlm.reference.ffn import gelu_ffn

    return gelu_ffn(x, w1, b1, w2, b2, "none", residual)


def _ffn_lowp(x, w1, b1, w2, b2, residual):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + residual


# ------------------------------------------------------------------ attention


def _attn_make(dtype, device):
    b, s, h, hkv, d = 2, 67, 4, 2, 64
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1, 40:] = False
    return {
        "q": torch.randn(b, s, h, d, device=device).to(dtype),
        "k": torch.randn(b, s, hkv, d, device=device).to(dtype),
        "v": torch.randn(b, s, hkv, d, device=device).to(dtype),
        "key_padding_mask": mask,
    }


def _attn_run(backend, q, k, v, key_padding_mask):
    from fastlm.ops.attention import attention

    return attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, backend=backend)


def _attn_oracle(q, k, v, key_padding_mask):
    from fastlm.reference.attention import attention

    return attention(q, k, v, True, key_padding_mask, upcast=True)


def _sdpa(q, k, v, causal, key_padding_mask=None):
    """PyTorch's own attention (F.scaled_dot_product_attention) on (B, S, H, D) tensors, with
    fastlm's conventions: causal aligned bottom-right (query i sees keys j <= i + Sk - Sq),
    key_padding_mask (B, Sk) True = attend, GQA by repeating the kv heads."""
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        mask = keep if mask is None else mask & keep
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


def _attn_lowp(q, k, v, key_padding_mask):
    return _sdpa(q, k, v, True, key_padding_mask)


_CU = (0, 1, 30, 77)


def _varlen_make(dtype, device):
    total, h, d = _CU[-1], 4, 80
    return {
        "q": torch.randn(total, h, d, device=device).to(dtype),
        "k": torch.randn(total, h, d, device=device).to(dtype),
        "v": torch.randn(total, h, d, device=device).to(dtype),
    }


def _cu(device):
    return torch.tensor(_CU, dtype=torch.int32, device=device)


def _varlen_run(backend, q, k, v):
    from fastlm.ops.attention import attention_varlen

    cu, longest = _cu(q.device), max(b - a for a, b in itertools.pairwise(_CU))
    return attention_varlen(q, k, v, cu, cu, longest, longest, causal=False, backend=backend)


def _varlen_oracle(q, k, v):
    from fastlm.reference.attention import attention_varlen

    cu = _cu(q.device)
    return attention_varlen(q, k, v, cu, cu, False, upcast=True)


def _varlen_lowp(q, k, v):
    segments = [slice(a, b) for a, b in itertools.pairwise(_CU)]
    return torch.cat([_sdpa(q[None, s], k[None, s], v[None, s], False)[0] for s in segments])


def _kv_make(dtype, device):
    b, s_max, h, hkv, d, sq = 3, 96, 4, 1, 64, 1
    return {
        "q": torch.randn(b, sq, h, d, device=device).to(dtype),
        "k_cache": torch.randn(b, s_max, hkv, d, device=device).to(dtype),
        "v_cache": torch.randn(b, s_max, hkv, d, device=device).to(dtype),
        "k": torch.randn(b, sq, hkv, d, device=device).to(dtype),
        "v": torch.randn(b, sq, hkv, d, device=device).to(dtype),
        "cache_seqlens": torch.tensor([0, 17, 95], dtype=torch.int32, device=device),
    }


def _kv_run(backend, q, k_cache, v_cache, k, v, cache_seqlens):
    from fastlm.ops.attention_kvcache import attention_with_kvcache

    return attention_with_kvcache(
        q, k_cache.clone(), v_cache.clone(), cache_seqlens, k=k, v=v, backend=backend
    )


def _kv_per_sequence(attend):
    """Attention of each sequence's new tokens over its valid cache prefix plus themselves,
    by ``attend(q, k, v)`` (causal, bottom-right) one sequence at a time."""

    def run(q, k_cache, v_cache, k, v, cache_seqlens):
        outs = []
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            kk = torch.cat([k_cache[b : b + 1, :n], k[b : b + 1]], 1)
            vv = torch.cat([v_cache[b : b + 1, :n], v[b : b + 1]], 1)
            outs.append(attend(q[b : b + 1], kk, vv))
        return torch.cat(outs, 0)

    return run


def _kv_oracle(q, k, v):
    from fastlm.reference.attention import attention

    return attention(q, k, v, True, upcast=True)


CHECKS += [
    Check(
        "linear_gelu",
        _ffn_make,
        _lg_run,
        _lg_oracle,
        _lg_lowp,
        "fastlm.ops.ffn",
        grad_args=("x", "w1", "b1"),
    ),
    Check(
        "gelu_ffn",
        _ffn_make,
        _ffn_run,
        _ffn_oracle,
        _ffn_lowp,
        "fastlm.ops.ffn",
        grad_args=("x", "w1", "b1", "w2", "b2", "residual"),
    ),
    Check(
        "attention",
        _attn_make,
        _attn_run,
        _attn_oracle,
        _attn_lowp,
        "fastlm.ops.attention",
        grad_args=("q", "k", "v"),
    ),
    Check(
        "attention_varlen",
        _varlen_make,
        _varlen_run,
        _varlen_oracle,
        _varlen_lowp,
        "fastlm.ops.attention",
        grad_args=("q", "k", "v"),
    ),
    Check(
        "attention_with_kvcache",
        _kv_make,
        _kv_run,
        _kv_per_sequence(_kv_oracle),
        _kv_per_sequence(lambda q, k, v: _sdpa(q, k, v, True)),
        "fastlm.ops.attention_kvcache",
        differentiable=False,
    ),
]
