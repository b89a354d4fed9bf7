"""fastlm GPT-2 against transformers on random weights: logits, greedy generate with
left-padded batches, KV-cache decode vs full recompute, sampling, bad input."""

from __future__ import annotations

import pytest
import torch

import fastlm.models as fm
from fastlm.models import gpt2
from tests.models.util import assert_model_parity, padded_batch, tiny_gpt2_config, transformers


def _pair(backend="torch", **cfg):
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(**cfg)).eval()
    return hf, fm.GPT2LMHeadModel.from_hf(hf, backend=backend)


def test_conv1d_weights_are_transformers_and_decoding_holds_row_major_copies():
    # Parameters as transformers stores them; a CPU generate holds row-major (out, in)
    # copies (what fastlm.ops.linear streams) for its duration only.
    hf, ours = _pair()
    convs = [m for m in ours.modules() if isinstance(m, gpt2.Conv1D)]
    sd = ours.state_dict()
    for name, p in hf.state_dict().items():
        assert sd[name].shape == p.shape and sd[name].is_contiguous(), name
        torch.testing.assert_close(sd[name], p, rtol=0, atol=0, msg=name)
    with ours.decoding_weights(gpt2.ROW_MAJOR_MIN_STEPS - 1):
        assert not any(m.decoding for m in convs)  # too few steps to be worth the copy
    with torch.no_grad(), ours.decoding_weights(gpt2.ROW_MAJOR_MIN_STEPS):
        for m in convs:
            w = m.linear_weight()
            assert w.is_contiguous() and torch.equal(w, m.weight.t())
            assert m.linear_weight() is w  # made once, then reused
    for m in convs:
        assert not m.decoding and m.linear_weight()._base is m.weight  # the view again
    with torch.no_grad(), ours.decoding_weights(gpt2.ROW_MAJOR_MIN_STEPS):
        for m in convs:
            m.weight.mul_(2)  # an update (optimizer step): the copy is remade
            torch.testing.assert_close(m.linear_weight(), m.weight.t(), rtol=0, atol=0)
    assert set(ours.state_dict()) == set(sd)


def test_generate_decodes_with_the_row_major_copies(monkeypatch):
    hf, ours = _pair()
    ids, mask = padded_batch(97, [6, 3], 6, left=True)
    seen = []
    real = gpt2.linear
    monkeypatch.setattr(
        gpt2, "linear", lambda x, w, b=None: seen.append(w.is_contiguous()) or real(x, w, b)
    )
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert seen and all(seen)  # every Conv1D product read a row-major weight


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lengths", [[9, 9], [9, 5, 1]], ids=["nopad", "leftpad"])
def test_logits_match(backend, lengths, dtype):
    hf, ours = _pair(backend)
    ids, mask = padded_batch(97, lengths, 9, left=True)
    valid = mask.bool()
    with torch.no_grad():
        oracle = hf.double()(ids, attention_mask=mask).logits
        base = hf.to(dtype)(ids, attention_mask=mask).logits
        got = ours.to(dtype)(ids, attention_mask=mask).logits
    assert_model_parity(got, oracle, base, f"gpt2 logits {backend}", valid=valid)


def test_tied_head_and_state_dict():
    hf, ours = _pair()
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert list(hf.state_dict()) == list(ours.state_dict())
    fresh = fm.GPT2LMHeadModel(fm.GPT2Config.from_hf(hf.config))
    fresh.load_state_dict(hf.state_dict())
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_generate_matches_transformers_left_padded(backend):
    hf, ours = _pair(backend)
    ids, mask = padded_batch(97, [7, 3, 5], 7, left=True)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got, ref)


def test_greedy_generate_with_eos_stops_like_transformers():
    hf, ours = _pair()
    ids, mask = padded_batch(97, [4, 2], 4, left=True)
    first = hf.generate(
        ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0
    )[:, -1]
    eos = int(first[0])  # make the first sequence stop at once
    ref = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=3,
    )
    got = ours.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=3
    )
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_cache_decode_equals_full_recompute(backend):
    _, ours = _pair(backend)
    ids, mask = padded_batch(97, [6, 4], 6, left=True)
    cache = ours.new_cache(2, 16)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        step = ours(ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
        seqs = [ids[b, mask[b].bool()].tolist() for b in range(2)]
        for _ in range(3):
            nxt = step.argmax(-1)
            for b in range(2):
                seqs[b].append(int(nxt[b]))
            step = ours(nxt[:, None], past_key_values=cache).logits[:, -1]
            for b in range(2):  # full recompute of each unpadded sequence
                full = ours(torch.tensor([seqs[b]])).logits[0, -1]
                torch.testing.assert_close(step[b], full, atol=1e-5, rtol=1e-4)
    assert cache.seqlens.tolist() == [9, 7]


def test_forward_use_cache_returns_static_cache():
    _, ours = _pair()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        out = ours(ids, use_cache=True)
        assert isinstance(out.past_key_values, fm.StaticKVCache)
        nxt = ours(ids[:, :1], past_key_values=out.past_key_values).logits
        full = ours(torch.cat([ids, ids[:, :1]], 1)).logits[:, -1:]
    torch.testing.assert_close(nxt, full, atol=1e-5, rtol=1e-4)


def test_sampling_respects_top_k():
    _, ours = _pair()
    ids = torch.randint(0, 97, (2, 3))
    torch.manual_seed(1)
    a = ours.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, temperature=0.7)
    b = ours.generate(ids, max_new_tokens=5, do_sample=True, top_k=None, top_p=1e-6)
    greedy = ours.generate(ids, max_new_tokens=5)
    assert torch.equal(a, greedy) and torch.equal(b, greedy)  # top-1 / tiny nucleus is greedy
    torch.manual_seed(2)
    c = ours.generate(ids, max_new_tokens=5, do_sample=True, top_k=5)
    assert c.shape == (2, 8) and int(c.max()) < 97


def test_bad_inputs():
    _, ours = _pair()
    with pytest.raises(
        ValueError, match=r"sequence length 65 exceeds .*max_position_embeddings 64"
    ):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        ours(torch.tensor([[3, 97]]))
    with pytest.raises(ValueError, match="left-padded"):
        ours.generate(
            torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])
        )
    with pytest.raises(
        ValueError, match=r"prompt length 60 \+ max_new_tokens 10 exceeds n_positions 64"
    ):
        ours.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="KV cache holds at most 4"):
        ours(torch.ones(1, 5, dtype=torch.long), past_key_values=ours.new_cache(1, 4))
    with pytest.raises(TypeError, match="StaticKVCache"):
        ours(torch.ones(1, 5, dtype=torch.long), past_key_values=())
    with pytest.raises(ValueError, match="top_p must be"):
        ours.generate(torch.ones(1, 2, dtype=torch.long), do_sample=True, top_p=-0.5)
    with pytest.raises(NotImplementedError, match="activation 'relu'"):
        fm.GPT2Config(activation_function="relu")
