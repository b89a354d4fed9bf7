"""StaticKVCache: preallocated keys/values for GPT-2 decoding.

Layout: ``k``, ``v`` of shape (L, B, S_max, H, d), one contiguous (B, S_max, H, d) slab per
layer as fastlm.attention_with_kvcache expects, and ``seqlens`` (B,) int32: how many
tokens of sequence b are stored. Sequences are stored *unpadded*: a left-padded prompt is
written compactly from row 0, so cache row j always holds position j of that sequence and
decoding needs no padding mask (``seqlens`` alone says which rows are valid). Rows at or
past ``seqlens[b]`` hold stale data that no attention reads.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, v in (("num_layers", num_layers), ("batch_size", batch_size), ("max_len", max_len),
                        ("num_heads", num_heads), ("head_dim", head_dim)):  # fmt: skip
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {v!r}")
        shape = (num_layers, batch_size, max_len, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_len = max_len
        # Host-side upper bound of seqlens (no device sync needed to check capacity).
        self.max_filled = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def is_empty(self) -> bool:
        return self.max_filled == 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def get_seq_length(self) -> int:
        """The longest stored sequence (transformers' Cache method name)."""
        return self.max_filled

    def check_room(self, new_tokens: int, where: str) -> None:
        if self.max_filled + new_tokens > self.max_len:
            raise ValueError(
                f"{where}: the KV cache holds at most {self.max_len} tokens per sequence; "
                f"{self.max_filled} stored + {new_tokens} new exceed it"
            )

    def write_compact(
        self, i: int, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor | None
    ) -> None:
        """Prefill layer i from an empty cache: k, v (B, S, H, d); ``order`` (B, S) int64 puts each
        sequence's valid tokens first (None: no padding)."""
        s = k.shape[1]
        if order is not None:
            idx = order[:, :, None, None].expand_as(k)
            k, v = k.gather(1, idx), v.gather(1, idx)
        self.k[i, :, :s].copy_(k)
        self.v[i, :, :s].copy_(v)

    def advance(self, counts: torch.Tensor | int, max_count: int) -> None:
        """After every layer wrote its tokens: seqlens += counts (per sequence or one int)."""
        self.seqlens += counts if isinstance(counts, int) else counts.to(torch.int32)
        self.max_filled += max_count

    def reorder(self, rows: torch.Tensor) -> None:
        """Row b takes the contents of row ``rows[b]`` (beam search following parent beams),
        in place: the cache keeps its buffers."""
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))
        self.seqlens.copy_(self.seqlens.index_select(0, rows))

    def reset(self) -> None:
        self.seqlens.zero_()
        self.max_filled = 0
