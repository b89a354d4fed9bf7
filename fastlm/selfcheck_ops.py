"""The op checks run by ``python -m fastlm check`` (see fastlm/selfcheck.py)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from fastlm.selfcheck import Check


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


def _attn_ref(upcast):
    def run(q, k, v, key_padding_mask):
        from fastlm.reference.attention import attention

        return attention(q, k, v, True, key_padding_mask, upcast=upcast)

    return run


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


def _varlen_ref(upcast):
    def run(q, k, v):
        from fastlm.reference.attention import attention_varlen

        cu = _cu(q.device)
        return attention_varlen(q, k, v, cu, cu, False, upcast=upcast)

    return run


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


def _kv_ref(upcast):
    def run(q, k_cache, v_cache, k, v, cache_seqlens):
        from fastlm.reference.attention import attention

        outs = []
        for b in range(q.shape[0]):  # full attention over the valid prefix plus the new tokens
            n = int(cache_seqlens[b])
            kk = torch.cat([k_cache[b : b + 1, :n], k[b : b + 1]], 1)
            vv = torch.cat([v_cache[b : b + 1, :n], v[b : b + 1]], 1)
            outs.append(attention(q[b : b + 1], kk, vv, True, upcast=upcast))
        return torch.cat(outs, 0)

    return run


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
        _attn_ref(True),
        _attn_ref(False),
        "fastlm.ops.attention",
        grad_args=("q", "k", "v"),
    ),
    Check(
        "attention_varlen",
        _varlen_make,
        _varlen_run,
        _varlen_ref(True),
        _varlen_ref(False),
        "fastlm.ops.attention",
        grad_args=("q", "k", "v"),
    ),
    Check(
        "attention_with_kvcache",
        _kv_make,
        _kv_run,
        _kv_ref(True),
        _kv_ref(False),
        "fastlm.ops.attention_kvcache",
        differentiable=False,
    ),
]
