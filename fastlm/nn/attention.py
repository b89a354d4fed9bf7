"""fastlm.nn.SelfAttention: multi-head self-attention (QKV projection, fastlm attention,
output projection) as one module, over padded or packed (varlen) batches."""

from __future__ import annotations

import torch
from torch import nn

from fastlm.nn._projection import weight_and_bias
from fastlm.nn.attention_layouts import Packed, Padded
from fastlm.ops.linear import linear

_NAME = "SelfAttention"


class SelfAttention(nn.Module):
    """y = out_proj(attention(q, k, v)) with [q | k | v] = x W_qkv^T + b_qkv split into
    ``num_heads`` heads of ``head_dim = embed_dim / num_heads``:

        attention(q, k, v) = softmax(q k^T * softmax_scale + mask) v   per head

    (fastlm.attention; ``softmax_scale`` defaults to 1/sqrt(head_dim), ``causal`` aligns
    bottom-right, ``dropout`` applies to the attention probabilities in training mode only).

    Two input layouts:

    * padded: ``forward(x, key_padding_mask)``, x (B, S, E), key_padding_mask None or bool
      (B, S) with True = token -> (B, S, E);
    * packed: ``forward(x, cu_seqlens=cu, max_seqlen=n)``, x (T, E) the tokens of all
      sequences back to back, cu (B + 1,) int32 offsets (fastlm.unpad_input makes them)
      -> (T, E); each sequence attends only within itself (fastlm.attention_varlen).

    Parameters: ``qkv`` Linear(E, 3E) (rows: all q, then all k, then all v) and ``out_proj``
    Linear(E, E). :meth:`from_linears` wraps existing layers instead, sharing their
    parameters: GPT-2's fused ``c_attn``/``c_proj`` (Conv1D) or BERT's separate
    ``query``/``key``/``value`` Linears (three GEMMs, no concatenated copy to keep in sync).
    """

    backend: str | None = None  # None: automatic choice (fastlm.backends)

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, dropout: float = 0.0,
                 softmax_scale: float | None = None, bias: bool = True, device=None, dtype=None,
                 backend: str | None = None):  # fmt: skip
        super().__init__()
        _check_heads(embed_dim, num_heads)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self._configure(embed_dim, num_heads, causal, dropout, softmax_scale, backend)

    @classmethod
    def from_linears(cls, qkv: nn.Module | tuple[nn.Module, nn.Module, nn.Module], out_proj: nn.Module,
                     num_heads: int, *, causal: bool = False, dropout: float = 0.0,
                     softmax_scale: float | None = None, backend: str | None = None) -> SelfAttention:  # fmt: skip
        """A SelfAttention over existing projections, sharing their parameters (no copy).

        ``qkv``: one fused projection to 3E features (nn.Linear or Conv1D, q then k then v:
        GPT-2's ``c_attn``) or a tuple ``(query, key, value)`` of projections to E features
        (BERT's ``self.query``, ``self.key``, ``self.value``). ``out_proj``: E -> E
        (BERT's ``output.dense``, GPT-2's ``c_proj``).
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        w_out, _ = weight_and_bias(out_proj, _NAME, "out_proj")
        embed_dim = w_out.shape[0]
        if isinstance(qkv, (tuple, list)):
            if len(qkv) != 3:
                raise ValueError(
                    f"fastlm.nn.{_NAME}: qkv must be one module or (query, key, value), got {len(qkv)} modules"
                )
            for name, module in zip(("query", "key", "value"), qkv):
                _check_projection(module, name, embed_dim, embed_dim)
                setattr(new, name, module)
        else:
            _check_projection(qkv, "qkv", embed_dim, 3 * embed_dim)
            new.qkv = qkv
        _check_projection(out_proj, "out_proj", embed_dim, embed_dim)
        new.out_proj = out_proj
        _check_heads(embed_dim, num_heads)
        new._configure(embed_dim, num_heads, causal, dropout, softmax_scale, backend)
        return new

    def _configure(self, embed_dim, num_heads, causal, dropout, softmax_scale, backend) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fastlm.nn.{_NAME}: dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.dropout, self.softmax_scale = causal, float(dropout), softmax_scale
        self.backend = backend
        # Decided once here so forward does not test module types on every call.
        self._fused_qkv = "qkv" in self._modules

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (..., H, D): strided views of one (..., 3E) GEMM output, or three GEMMs."""
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        if self._fused_qkv:
            qkv = linear(x, *weight_and_bias(self.qkv, _NAME, "qkv"))
            return qkv.view(*x.shape[:-1], 3, self.num_heads, self.head_dim).unbind(-3)
        return tuple(
            linear(x, *weight_and_bias(m, _NAME, "qkv")).view(heads)
            for m in (self.query, self.key, self.value)
        )

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:  # fmt: skip
        packed = cu_seqlens is not None
        if x.dim() != (2 if packed else 3) or x.shape[-1] != self.embed_dim:
            layout = (
                "(total_tokens, embed_dim) with cu_seqlens" if packed else "(batch, seq, embed_dim)"
            )
            raise ValueError(
                f"fastlm.nn.{_NAME}: x must be {layout} with embed_dim {self.embed_dim}, got shape {tuple(x.shape)}"
            )
        q, k, v = self._project(x)
        p = self.dropout if self.training else 0.0
        if packed:
            if key_padding_mask is not None:
                raise ValueError(
                    f"fastlm.nn.{_NAME}: pass key_padding_mask (padded x) or cu_seqlens (packed x), not both"
                )
            layout = Packed(cu_seqlens, max_seqlen)
        else:
            layout = Padded(x.shape[0], x.shape[1], key_padding_mask)
        a = layout.attend(
            q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, dropout_p=p,
            backend=self.backend,
        )  # fmt: skip
        return linear(a.flatten(-2), *weight_and_bias(self.out_proj, _NAME, "out_proj"))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, "
            f"dropout={self.dropout}, softmax_scale={self.softmax_scale}"
        )


def _check_heads(embed_dim: int, num_heads: int) -> None:
    if num_heads < 1 or embed_dim % num_heads != 0:
        raise ValueError(
            f"fastlm.nn.{_NAME}: embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
        )


def _check_projection(module: nn.Module, name: str, in_features: int, out_features: int) -> None:
    w, _ = weight_and_bias(module, _NAME, name)
    if tuple(w.shape) != (out_features, in_features):
        raise ValueError(
            f"fastlm.nn.{_NAME}: {name} must map {in_features} -> {out_features} features, "
            f"got {w.shape[1]} -> {w.shape[0]}"
        )
