"""Beam search for fastlm GPT-2, step for step transformers' vectorised ``_beam_search``
(so the tokens are transformers'), on the StaticKVCache reordered in place.

Per prompt b, ``num_beams`` running hypotheses with accumulated log-probabilities
``running[b, j]`` and up to ``num_beams`` finished ones. Each step, vocab V:

    cand   = running[:, :, None] + processors(log_softmax(logits))      (B, beams, V)
    top    = topk(cand.view(B, beams * V), K)    K = max(2, 1 + #eos) * beams
    a candidate ending in eos (or reaching max_length) is finished: among the first
    ``beams`` of ``top`` it enters the finished set with score / gen_len ** length_penalty
    (kept when it beats the worst finished one); the best ``beams`` unfinished candidates
    run on, and the cache rows follow their parents (``cache.reorder(parent)``).

Search stops when no running beam can beat the worst finished one (transformers'
early-stopping heuristic for ``early_stopping=False``; all beams finished for ``True``;
``"never"``: the length-penalty bound), or at max_length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1.0e9  # transformers' "impossible" score


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b, j], ...] for (B, N, ...) t and (B, M) idx."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(model, input_ids, mask, cache, first_logits, gc, process, max_new: int, fill: int):
    """Runs the search from the prefilled ``cache`` (rows = prompts repeated ``num_beams``
    times) and ``first_logits`` (B * beams, V). ``process(scores, tokens, valid, step)``
    applies the logits processors. Returns (B * num_return_sequences, S + n) tokens."""
    beams = gc.num_beams
    flat_b, prompt_len = input_ids.shape
    bsz = flat_b // beams
    dev = input_ids.device
    eos = torch.tensor(
        [] if gc.eos_token_id is None else [gc.eos_token_id] if isinstance(gc.eos_token_id, int)
        else list(gc.eos_token_id), dtype=torch.long, device=dev,
    )  # fmt: skip
    max_length = prompt_len + max_new
    keep = max(2, 1 + eos.numel()) * beams
    top_beams = torch.arange(keep, device=dev) < beams

    running = torch.full((bsz, beams, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = input_ids.view(bsz, beams, prompt_len)
    finished = running.clone()
    running_scores = torch.zeros(bsz, beams, device=dev)
    running_scores[:, 1:] = NEG  # the beams start identical: only the first one counts
    finished_scores = torch.full((bsz, beams), NEG, device=dev)
    is_finished = torch.zeros(bsz, beams, dtype=torch.bool, device=dev)
    improvable = torch.ones(bsz, 1, dtype=torch.bool, device=dev)
    gen_len = torch.zeros(bsz, beams, dtype=torch.long, device=dev)  # of each finished one
    prompt_valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask

    logits, cur = first_logits, prompt_len
    while True:
        flat = running[:, :, :cur].reshape(flat_b, cur)
        valid = torch.cat([prompt_valid, prompt_valid.new_ones(flat_b, cur - prompt_len)], 1)
        log_probs = process(F.log_softmax(logits.float(), dim=-1), flat, valid, cur - prompt_len)
        vocab = log_probs.shape[-1]
        cand = (log_probs.view(bsz, beams, vocab) + running_scores[:, :, None]).view(bsz, -1)
        top_scores, top_idx = torch.topk(cand, keep)
        parent, token = top_idx // vocab, top_idx % vocab
        top_seqs = _gather(running, parent)
        top_seqs[:, :, cur] = token
        hits = torch.isin(token, eos) | (cur + 1 >= max_length)

        # The best `beams` candidates that did not stop run on.
        run_scores = top_scores + hits.float() * NEG
        nxt = torch.topk(run_scores, beams)[1]
        running, running_scores = _gather(top_seqs, nxt), _gather(run_scores, nxt)
        parents = _gather(parent, nxt)

        # Stopped candidates among the first `beams` compete for the finished set.
        new_len = cur + 1 - prompt_len
        just = hits & top_beams[None]
        cand_final = top_scores / new_len**gc.length_penalty
        full = is_finished.all(-1, keepdim=True) & (gc.early_stopping is True)
        cand_final = cand_final + (full | ~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.topk(torch.cat([finished_scores, cand_final], 1), beams)[1]
        finished = _gather(torch.cat([finished, top_seqs], 1), merged)
        finished_scores = _gather(torch.cat([finished_scores, cand_final], 1), merged)
        is_finished = _gather(torch.cat([is_finished, just], 1), merged)
        gen_len = _gather(
            torch.cat([gen_len, torch.full_like(just, new_len, dtype=torch.long)], 1), merged
        )

        cur += 1
        if gc.early_stopping == "never" and gc.length_penalty > 0:
            best_len = max_length - prompt_len
        else:
            best_len = cur - prompt_len
        best_running = running_scores[:, :1] / best_len**gc.length_penalty
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beam = not (gc.early_stopping is True and bool(is_finished.all()))
        if not bool(improvable.any()) or not open_beam or bool(hits.all()):
            break
        # Cache rows follow their parent beams (in place), then one token per beam.
        rows = (parents + torch.arange(bsz, device=dev)[:, None] * beams).view(-1)
        cache.reorder(rows)
        last = running[:, :, cur - 1].reshape(flat_b, 1)
        logits = model(
            last, past_key_values=cache, position_ids=cache.seqlens.long()[:, None]
        ).logits[:, -1]

    n = gc.num_return_sequences
    out = finished[:, :n].reshape(bsz * n, max_length)
    return out[:, : prompt_len + int(gen_len[:, :n].max())]
