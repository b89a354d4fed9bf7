"""Autoregressive generation for fastlm GPT-2 with a StaticKVCache, as transformers' generate.

Prompts come batched and left-padded (the transformers convention). Prefill runs the whole
prompt through fastlm.attention with the padding as key_padding_mask and position ids
``cumsum(attention_mask) - 1`` as transformers' generate computes them; the cache stores
each prompt compactly, so decoding (fastlm.attention_with_kvcache) needs only the
per-sequence lengths and the next position of sequence b is simply ``seqlens[b]``.

Each step turns the last logits into the next token the way transformers does, in its order:

    scores = logits (fp32)
    scores = repetition_penalty(scores, tokens so far)        s/p if s > 0 else s*p (not padding)
    scores = no_repeat_ngram(scores)                          -inf for tokens closing a seen n-gram
    scores = min_new_tokens(scores)                           -inf for eos while too short
    greedy: argmax(scores)
    sample: temperature -> top_k -> top_p, then multinomial(softmax, generator)

The knobs take every value transformers takes, with its meaning: ``top_k`` 0 or None and
``top_p`` None or >= 1 filter nothing, ``top_p`` 0 keeps the most likely token, and with
``do_sample=False`` the sampling knobs are not read at all. An eos id outside the
vocabulary (GPT-2's default 50256 with a small vocabulary, a negative id) is never generated.

Finished rows (eos emitted) continue with ``pad_token_id`` (default: eos); generation stops
when every row has finished, a stopping criterion says so, or at max_new_tokens/max_length.
Finding out that every row finished reads the device, so it is asked every
``EOS_CHECK_EVERY`` (8) steps, not every step; the up to 7 extra steps only append padding
to finished rows and are cut from the output, which is transformers' token for token. The
decode step itself (:meth:`GPT2LMHeadModel.decode_step`) reads nothing on the host; on
CUDA it is replayed from a CUDA graph (``use_cuda_graph=False`` turns that off).
Greedy decoding returns transformers' tokens, the eos included (tests/models check it).
``num_beams > 1`` runs :func:`fastlm.models.beam_search.beam_search` on the same processors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fastlm.models._base import check_attention_mask, check_input_ids, check_values
from fastlm.models.beam_search import beam_search
from fastlm.models.decode_graph import decode_step
from fastlm.models.generation_config import GenerationConfig
from fastlm.models.outputs import _Output

WHERE = "GPT2LMHeadModel.generate"
NEG_INF = float("-inf")
# Decode steps between host reads of "has every row finished?" (see the module docstring).
EOS_CHECK_EVERY = 8


@dataclass
class GenerateDecoderOnlyOutput(_Output):
    """``return_dict_in_generate=True``: the sequences and, with ``output_scores``, the
    processed scores (B*num_return_sequences, vocab) of every step."""

    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None


def _check(gc: GenerationConfig, vocab: int) -> None:
    def positive_int(name, minimum=1, optional=False):
        v = getattr(gc, name)
        if optional and v is None:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{WHERE}: {name} must be an int >= {minimum}, got {v!r}")

    positive_int("max_new_tokens", 0, optional=True)
    positive_int("max_length", 1)
    positive_int("min_new_tokens", 0, optional=True)
    positive_int("min_length", 0)
    positive_int("no_repeat_ngram_size", 0)
    positive_int("num_return_sequences", 1)
    positive_int("num_beams", 1)
    if gc.do_sample:  # as in transformers, the sampling knobs are read (and checked) only then
        _check_sampling(gc)
    if _applies(gc.repetition_penalty, neutral=1.0) and not _positive_number(gc.repetition_penalty):
        raise ValueError(f"{WHERE}: repetition_penalty must be > 0, got {gc.repetition_penalty!r}")
    if gc.num_beams > 1:
        if gc.do_sample:
            raise NotImplementedError(
                f"{WHERE}: do_sample=True with num_beams > 1 (beam sampling) is not implemented"
            )
        if gc.output_scores:
            raise NotImplementedError(
                f"{WHERE}: output_scores with num_beams > 1 is not implemented"
            )
        if gc.num_return_sequences > gc.num_beams:
            raise ValueError(
                f"{WHERE}: num_return_sequences={gc.num_return_sequences} exceeds num_beams={gc.num_beams}"
            )
    elif gc.num_return_sequences > 1 and not gc.do_sample:
        raise ValueError(
            f"{WHERE}: num_return_sequences={gc.num_return_sequences} needs do_sample=True "
            "(greedy decoding returns one sequence per prompt)"
        )
    # An eos id outside the vocabulary (GPT-2's default 50256 with a small vocabulary, or a
    # negative id) is accepted, as transformers accepts it: it is never generated, so it
    # never stops a row. An explicit pad_token_id is fed to the model: it must be a token id.
    if any(not _is_int(t) for t in _as_list(gc.eos_token_id)):
        raise ValueError(f"{WHERE}: eos_token_id must be token ids (ints), got {gc.eos_token_id!r}")
    pad = gc.pad_token_id
    if pad is not None and not (_is_int(pad) and 0 <= pad < vocab):
        raise ValueError(f"{WHERE}: pad_token_id must be a token id in [0, {vocab}), got {pad!r}")


def _check_sampling(gc: GenerationConfig) -> None:
    """transformers' limits on the sampling knobs, for the values that apply a filter."""
    if _applies(gc.temperature, neutral=1.0) and not _positive_number(gc.temperature):
        raise ValueError(f"{WHERE}: temperature must be > 0, got {gc.temperature!r}")
    if _applies(gc.top_k, neutral=0) and not (_is_int(gc.top_k) and gc.top_k > 0):
        raise ValueError(f"{WHERE}: top_k must be an int >= 0 or None, got {gc.top_k!r}")
    if _top_p_filters(gc.top_p) and not gc.top_p >= 0:
        raise ValueError(f"{WHERE}: top_p must be >= 0 (or None), got {gc.top_p!r}")


def _applies(value, neutral) -> bool:
    """Whether a knob set to ``value`` does anything: None and its neutral value do not."""
    return value is not None and value != neutral


def _top_p_filters(top_p) -> bool:
    """top_p filters below 1; None and anything >= 1 keep every token (transformers' rule)."""
    if top_p is not None and not isinstance(top_p, (int, float)):
        raise ValueError(f"{WHERE}: top_p must be a number or None, got {top_p!r}")
    return top_p is not None and top_p < 1.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def repetition_penalty(
    scores: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty on every token present at a ``valid`` position of ``tokens`` (B, L)
    (prompt padding does not count): divide positive scores, multiply negative ones
    (transformers' RepetitionPenaltyLogitsProcessor)."""
    vocab = scores.shape[-1]
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, tokens.masked_fill(~valid, vocab), True)  # padding lands in column V
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalized, scores)


def no_repeat_ngram(scores: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for every token that would repeat an n-gram of ``tokens`` (B, L): those whose
    preceding n-1 tokens equal the last n-1. On device, no host loop."""
    length = tokens.shape[1]
    if length + 1 < n:
        return scores
    grams = tokens.unfold(1, n, 1)  # (B, L - n + 1, n)
    prefix = tokens[:, length - n + 1 :]  # (B, n - 1)
    hits = (grams[:, :, : n - 1] == prefix[:, None]).all(-1)  # (B, L - n + 1)
    banned = torch.zeros_like(scores).scatter_add_(1, grams[:, :, -1], hits.to(scores.dtype))
    return scores.masked_fill(banned > 0, NEG_INF)


def top_k_top_p(scores: torch.Tensor, temperature, top_k, top_p):
    """transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper; a knob
    that filters nothing (see :func:`_applies`, :func:`_top_p_filters`) is skipped."""
    if _applies(temperature, neutral=1.0):
        scores = scores / temperature
    if _applies(top_k, neutral=0) and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if _top_p_filters(top_p):
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), NEG_INF)
    return scores


def _process(gc, scores, tokens, valid, step: int, min_new: int, eos_ids: torch.Tensor):
    """The logits processors, in transformers' order (see the module docstring)."""
    if _applies(gc.repetition_penalty, neutral=1.0):
        scores = repetition_penalty(scores, tokens, valid, gc.repetition_penalty)
    if gc.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, tokens, gc.no_repeat_ngram_size)
    if step < min_new and eos_ids.numel():
        scores = scores.index_fill(1, eos_ids, NEG_INF)
    return scores


def _stop_requested(criteria, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) bool: any stopping criterion (transformers' StoppingCriteria or any callable
    (input_ids, scores) -> bool or (B,) bool) says stop."""
    stop = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for criterion in criteria:
        r = criterion(tokens, scores)
        stop = stop | torch.as_tensor(r, device=tokens.device).to(torch.bool).expand_as(stop)
    return stop


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    streamer=None,
    stopping_criteria: Iterable[Callable] | None = None,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool = True,
    **kwargs,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """(B, S) prompt ids (left-padded) -> (B * num_return_sequences, S + n) with
    n <= max_new_tokens new tokens (or a GenerateDecoderOnlyOutput).

    Defaults come from ``generation_config`` (else ``model.generation_config``: the
    checkpoint's generation_config.json, or its config's special tokens); ``kwargs``
    override single fields of it (``max_new_tokens=``, ``do_sample=``, ``top_p=`` ...) and
    an unknown one raises TypeError naming it. ``generator`` makes sampling reproducible;
    ``streamer`` receives ``put(prompt)``, ``put(tokens)`` per step and ``end()``.
    ``use_cuda_graph``: on CUDA, replay each decode step from a CUDA graph
    (:mod:`fastlm.models.decode_graph`); ignored on CPU.
    """
    if not isinstance(use_cuda_graph, bool):
        raise TypeError(
            f"{WHERE}: use_cuda_graph must be a bool, got {type(use_cuda_graph).__name__}"
        )
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        if not hasattr(generation_config, "to_diff_dict"):
            raise TypeError(
                f"{WHERE}: generation_config must be a fastlm or transformers GenerationConfig, "
                f"got {type(generation_config).__name__}"
            )
        # A transformers GenerationConfig: its non-default settings, each one checked.
        generation_config = GenerationConfig().update(**generation_config.to_diff_dict())
    gc = (generation_config or model.generation_config).update(**kwargs)
    cfg = model.config
    _check(gc, cfg.vocab_size)
    check_input_ids(input_ids, cfg.vocab_size, cfg.n_positions, WHERE)
    bsz, seq = input_ids.shape
    mask = check_attention_mask(attention_mask, (bsz, seq), WHERE)
    if mask is not None:  # ValueError on CPU, a device-side assert on CUDA (no sync)
        check_values(
            mask,
            lambda: mask[:, -1],
            f"{WHERE}: prompts must be left-padded (attention_mask[:, -1] all 1); got right padding",
        )
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - seq
    if max_new < 0:
        raise ValueError(
            f"{WHERE}: the prompt ({seq} tokens) is longer than max_length {gc.max_length}; "
            "pass max_new_tokens"
        )
    if seq + max_new > cfg.n_positions:
        raise ValueError(
            f"{WHERE}: prompt length {seq} + max_new_tokens {max_new} exceeds n_positions {cfg.n_positions}"
        )
    min_new = gc.min_new_tokens if gc.min_new_tokens is not None else max(gc.min_length - seq, 0)
    eos = _as_list(gc.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    # The eos ids the model can produce; the others never stop a row (see _check).
    eos_ids = torch.tensor([t for t in eos if 0 <= t < cfg.vocab_size], dtype=torch.long,
                           device=input_ids.device)  # fmt: skip
    # A finished row is fed its padding id, as in transformers, unless that id (eos[0] by
    # default) is outside the vocabulary: then it is fed its own choice (its logits are unused).
    feed_pad = 0 <= pad < cfg.vocab_size

    if gc.num_beams > 1 and (streamer is not None or stopping_criteria):
        raise NotImplementedError(
            f"{WHERE}: streamer and stopping_criteria with num_beams > 1 are not implemented"
        )
    copies = gc.num_beams if gc.num_beams > 1 else gc.num_return_sequences
    if copies > 1:
        input_ids = input_ids.repeat_interleave(copies, 0)
        mask = None if mask is None else mask.repeat_interleave(copies, 0)
        bsz = input_ids.shape[0]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    scores_out: list[torch.Tensor] = []
    if max_new == 0:
        return _result(gc, input_ids, scores_out, streamer)

    # CPU: the block weights row-major while decoding (GPT2LMHeadModel.decoding_weights).
    with model.decoding_weights(max_new):
        cache = model.new_cache(bsz, seq + max_new)
        if mask is None:
            pos = torch.arange(seq, device=input_ids.device)[None].expand(bsz, seq)
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids,
            past_key_values=cache,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=1,
        ).logits[:, -1]
        if gc.num_beams > 1:
            # transformers' fill value for beams shorter than the longest: (pad or eos[0]).
            fill = (gc.pad_token_id or eos[0]) if eos else -1
            out = beam_search(model, input_ids, mask, cache, logits, gc,
                              lambda s, t, v, step: _process(gc, s, t, v, step, min_new, eos_ids),
                              max_new, fill)  # fmt: skip
            return _result(gc, out, scores_out, streamer)
        # Preallocated outputs: a step writes its column instead of growing tensors.
        width = seq + max_new
        tokens = torch.full((bsz, width), pad, dtype=input_ids.dtype, device=input_ids.device)
        tokens[:, :seq] = input_ids
        valid = torch.ones(bsz, width, dtype=torch.bool, device=input_ids.device)
        if mask is not None:
            valid[:, :seq] = mask
        done = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
        # Steps each row ran until it finished (max_new while it runs): the output's width.
        ran = torch.full((bsz,), max_new, dtype=torch.long, device=input_ids.device)
        step_model = decode_step(model, cache, use_cuda_graph)
        # Whether every row finished is a host read; it runs every EOS_CHECK_EVERY steps (every
        # step with a streamer, which must not see tokens past the end).
        check_every = 1 if streamer is not None else EOS_CHECK_EVERY
        stops = bool(eos_ids.numel()) or bool(stopping_criteria)
        for step in range(max_new):
            length = seq + step
            scores = _process(gc, logits.float(), tokens[:, :length], valid[:, :length], step,
                              min_new, eos_ids)  # fmt: skip
            if gc.do_sample:
                scores = top_k_top_p(scores, gc.temperature, gc.top_k, gc.top_p)
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            if gc.output_scores:
                scores_out.append(scores.clone())  # logits may be a graph's reused buffer
            chosen, nxt = nxt, nxt.masked_fill(done, pad)
            tokens[:, length] = nxt
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos_ids.numel():
                done = done | torch.isin(nxt, eos_ids)
            if stopping_criteria:
                done = done | _stop_requested(stopping_criteria, tokens[:, : length + 1], scores)
            if stops:
                ran = torch.where(done, ran.clamp(max=step + 1), ran)
                if (step + 1) % check_every == 0 and bool(done.all()):
                    break
            if step + 1 < max_new:
                logits = step_model(nxt if feed_pad else chosen)
        # Steps past the last row's end only appended padding: cut them (one host read).
        n = int(ran.max()) if stops else max_new
        return _result(gc, tokens[:, : seq + n], scores_out[:n], streamer)


def _result(gc: GenerationConfig, tokens, scores, streamer):
    if streamer is not None:
        streamer.end()
    if gc.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=tokens, scores=tuple(scores) if gc.output_scores else None
        )
    return tokens
