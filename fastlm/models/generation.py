"""Autoregressive generation for fastlm GPT-2 with a StaticKVCache.

Prompts come batched and left-padded (the transformers convention). Prefill runs the whole
prompt through fastlm.attention with the padding as key_padding_mask and position ids
``cumsum(attention_mask) - 1`` as transformers' generate computes them; the cache stores
each prompt compactly, so decoding (fastlm.attention_with_kvcache) needs only the
per-sequence lengths and the next position of sequence b is simply ``seqlens[b]``.

Greedy decoding returns the same tokens as ``transformers`` ``generate(do_sample=False)``
on the same weights (tests/models check it). Finished sequences (eos emitted) continue
with ``pad_token_id`` (default: eos) as transformers does; generation stops when every
sequence has finished or after ``max_new_tokens``.
"""

from __future__ import annotations

import torch

from fastlm.models._base import check_attention_mask, check_input_ids
from fastlm.models.generation_config import GenerationConfig

_UNSUPPORTED = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": None,
    "min_length": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
}


def _filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
):
    """transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def _check_args(max_new_tokens, temperature, top_k, top_p, vocab):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs,
) -> torch.Tensor:
    """(B, S) prompt ids (left-padded) -> (B, S + n) with n <= max_new_tokens new tokens.

    Defaults come from ``generation_config`` (else ``model.generation_config``: the
    checkpoint's generation_config.json or its config's special tokens); ``kwargs`` override
    single fields. A knob fastlm does not implement raises, naming it."""
    where = "GPT2LMHeadModel.generate"
    gc = (generation_config or model.generation_config).update(**kwargs)
    unsupported = {
        k: v for k, v in gc.to_dict().items() if k in _UNSUPPORTED and v != _UNSUPPORTED[k]
    }
    if unsupported:
        raise NotImplementedError(f"{where}: {sorted(unsupported)} not supported yet")
    cfg = model.config
    check_input_ids(input_ids, cfg.vocab_size, cfg.n_positions, where)
    bsz, seq = input_ids.shape
    max_new_tokens = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - seq
    do_sample, temperature = gc.do_sample, gc.temperature
    top_k, top_p = (gc.top_k, gc.top_p) if do_sample else (None, None)
    eos_token_id, pad_token_id = gc.eos_token_id, gc.pad_token_id
    _check_args(max_new_tokens, temperature, top_k, top_p, cfg.vocab_size)
    mask = check_attention_mask(attention_mask, (bsz, seq), where)
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError(
            f"{where}: prompts must be left-padded (attention_mask[:, -1] all 1); got right padding"
        )
    if mask is not None and not bool(mask.any(1).all()):
        raise ValueError(f"{where}: every prompt needs at least one token with attention_mask 1")
    if seq + max_new_tokens > cfg.n_positions:
        raise ValueError(
            f"{where}: prompt length {seq} + max_new_tokens {max_new_tokens} exceeds n_positions {cfg.n_positions}"
        )
    if max_new_tokens == 0:
        return input_ids
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0

    cache = model.new_cache(bsz, seq + max_new_tokens)
    if mask is None:
        pos = torch.arange(seq, device=input_ids.device)[None].expand(bsz, seq)
    else:
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids, past_key_values=cache, attention_mask=mask, position_ids=pos, logits_to_keep=1
    )
    tokens = [input_ids]
    done = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        logits = logits.float()
        if do_sample:
            probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            done = done | (nxt == eos_token_id)
        tokens.append(nxt[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        pos = cache.seqlens.long()[:, None]
        logits = model(nxt[:, None], past_key_values=cache, position_ids=pos).logits[:, -1]
    return torch.cat(tokens, dim=1)
