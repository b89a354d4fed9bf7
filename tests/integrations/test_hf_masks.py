"""attn_implementation="fastlm" serves every mask transformers hands over, and output_attentions:
each situation against transformers' own sdpa or eager output (tiny random models, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from fastlm.integrations.hf import attention as hf_attention
from fastlm.integrations.hf.mask_patterns import cu_seqlens_from_segment_ids
from tests.models.util import (
    assert_grads_close,
    padded_batch,
    param_grads,
    tiny_bert_config,
    tiny_gpt2_config,
    transformers,
)

ATOL, RTOL = 2e-5, 1e-4


def _twins(tmp_path, model_class, config, reference="sdpa"):
    """The same random weights loaded as (reference, fastlm)."""
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path)
    load = model_class.from_pretrained
    return (
        load(tmp_path, attn_implementation=reference).eval(),
        load(tmp_path, attn_implementation="fastlm").eval(),
    )


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused fastlm calls and the torch SDPA fallbacks the hook makes."""
    counts = {"attention": 0, "attention_varlen": 0, "sdpa": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(hf_attention, "attention", spy("attention", hf_attention.attention))
    monkeypatch.setattr(
        hf_attention, "attention_varlen", spy("attention_varlen", hf_attention.attention_varlen)
    )
    monkeypatch.setattr(
        hf_attention,
        "scaled_dot_product_attention",
        spy("sdpa", hf_attention.scaled_dot_product_attention),
    )
    return counts


# --- 1. static cache -----------------------------------------------------------------------


def _static_generate(model, ids, mask):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )


@pytest.mark.parametrize("lengths", [[7, 7], [7, 4]], ids=["nopad", "leftpad"])
def test_static_cache_generate_matches_sdpa(tmp_path, calls, lengths):
    ref_model, fast = _twins(tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config())
    ids, mask = padded_batch(97, lengths, 7, left=True)
    with torch.no_grad():
        ref, got = _static_generate(ref_model, ids, mask), _static_generate(fast, ids, mask)
    assert torch.equal(got.sequences, ref.sequences)
    for step, (g, r) in enumerate(zip(got.logits, ref.logits)):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL, msg=f"step {step}")
    # Served fused: queries offset into a cache whose empty slots are cut off, no fallback.
    assert calls["attention"] == 2 * 6 and calls["sdpa"] == 0


def test_static_cache_decode_never_reads_the_offset(tmp_path, calls, monkeypatch):
    """A cache offset that is a GPU tensor cannot be read without a sync: decode steps
    compare it on the device instead (one query over the whole cache, its empty slots
    masked), still fused and exact."""
    monkeypatch.setattr(hf_attention, "_host_int", lambda v: v if isinstance(v, int) else None)
    ref_model, fast = _twins(tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config())
    ids, mask = padded_batch(97, [7, 4], 7, left=True)
    with torch.no_grad():
        ref, got = _static_generate(ref_model, ids, mask), _static_generate(fast, ids, mask)
    assert torch.equal(got.sequences, ref.sequences)
    for g, r in zip(got.logits, ref.logits):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL)
    assert calls["attention"] == 2 * 6 and calls["sdpa"] == 0


def test_static_cache_generate_compiled_fullgraph(tmp_path):
    """Compiled generation (transformers' test_generate_compile_model_forward_fullgraph): the
    hook must trace without graph breaks."""
    ref_model, fast = _twins(tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config())
    ids = torch.randint(1, 97, (2, 7))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch._dynamo.reset()
    fast.forward = torch.compile(fast.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, **gen), ref_model.generate(ids, **gen))


@pytest.mark.parametrize("how", ["attn_implementation", "optimize"])
def test_compiled_static_cache_generate_never_recompiles(tmp_path, how):
    """transformers' test_generate_compile_model_forward_fullgraph: generate compiles the
    forward (fullgraph, static shapes) for its decode steps; two generations of padded
    prompts of one shape must reuse that graph at every step, and give the eager tokens."""
    import fastlm

    ref_model, fast = _twins(tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config())
    if how == "optimize":
        fast = fastlm.optimize(ref_model.__class__.from_pretrained(tmp_path).eval())
    compile_config = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    compile_config._compile_all_devices = True  # compile on CPU too (transformers' test does)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    ids, mask = padded_batch(97, [7, 5, 6, 7], 7, left=True)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (slice(0, 2), slice(2, 4)):
            got = fast.generate(
                ids[rows], attention_mask=mask[rows], compile_config=compile_config, **gen
            )
            ref = ref_model.generate(ids[rows], attention_mask=mask[rows], **gen)
            assert torch.equal(got, ref)
    assert hasattr(fast, "_compiled_call")  # the decode steps did run compiled


# --- 2. packed, padding-free batches --------------------------------------------------------


def _packed(ids, lengths_per_row):
    """Right-padded rows of ``ids`` (one sequence per row, in order) packed into rows of
    restarting position_ids, as DataCollatorWithFlattening makes them."""
    rows, positions, order, k = [], [], [], 0
    for lengths in lengths_per_row:
        rows.append(torch.cat([ids[k + i, :n] for i, n in enumerate(lengths)]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
        order += [(k + i, n) for i, n in enumerate(lengths)]
        k += len(lengths)
    return torch.stack(rows), torch.stack(positions), order


@pytest.mark.parametrize(
    "lengths_per_row", [[[5, 3, 4]], [[12], [5, 3, 4]], [[6, 6], [4, 8]]],
    ids=["one-row", "row-restarts-same-id", "two-rows"],
)  # fmt: skip
def test_packed_matches_padded(tmp_path, calls, lengths_per_row):
    """transformers' test_sdpa_padding_matches_padding_free_with_position_ids, with gradients."""
    ref_model, fast = _twins(tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config())
    lengths = [n for row in lengths_per_row for n in row]
    ids, mask = padded_batch(97, lengths, max(lengths))
    packed_ids, position_ids, order = _packed(ids, lengths_per_row)

    padded_logits = ref_model(ids, attention_mask=mask).logits
    expected = torch.cat([padded_logits[i, :n] for i, n in order])  # the valid tokens, packed
    weights = torch.randn(expected.shape)
    (expected * weights).sum().backward()
    ref_grads = param_grads(ref_model)
    packed_logits = fast(packed_ids, position_ids=position_ids, use_cache=False).logits
    flat = packed_logits.reshape(expected.shape)
    (flat * weights).sum().backward()
    assert calls["attention_varlen"] == 2 and calls["sdpa"] == 0

    torch.testing.assert_close(flat, expected, atol=ATOL, rtol=RTOL)
    assert_grads_close(param_grads(fast), ref_grads)


def test_packed_compiled_fullgraph(tmp_path):
    """Under torch.compile(fullgraph) the packed mask is materialised (closures are not
    inspected while tracing): still the sdpa result, without a graph break."""
    ref_model, fast = _twins(tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config())
    ids = torch.randint(1, 97, (1, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    torch._dynamo.reset()
    compiled = torch.compile(fast.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        ref = ref_model(ids, position_ids=position_ids, use_cache=False).logits
        got = compiled(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_cu_seqlens_from_segment_ids_restarts_each_row():
    segment_ids = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 2, 2]])
    cu_seqlens, max_seqlen = cu_seqlens_from_segment_ids(segment_ids)
    assert cu_seqlens.tolist() == [0, 4, 6, 8, 9, 10, 12] and max_seqlen == 4
    assert cu_seqlens.dtype == torch.int32


# --- 3. 4-D bool and additive masks ---------------------------------------------------------


def _custom_4d(batch, seq, causal):
    """A mask no 2-D padding mask can express: every query also skips one earlier key."""
    torch.manual_seed(1)
    allowed = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    skip = torch.randint(0, seq, (batch, 1, seq, 1))
    allowed &= torch.arange(seq) != skip
    allowed[..., 0] = True  # no query is left without keys
    return allowed


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_4d_mask_matches_sdpa(tmp_path, calls, arch, additive):
    gpt2 = arch == "gpt2"
    model_class = transformers.GPT2LMHeadModel if gpt2 else transformers.BertModel
    ref_model, fast = _twins(
        tmp_path, model_class, tiny_gpt2_config() if gpt2 else tiny_bert_config()
    )
    ids = torch.randint(1, 61, (2, 9))
    mask = _custom_4d(2, 9, causal=gpt2)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    def run(model):
        out = model(ids, attention_mask=mask)
        out = out.logits if gpt2 else out.last_hidden_state
        out.square().mean().backward()
        return out, param_grads(model)

    (ref, ref_grads), (got, grads) = run(ref_model), run(fast)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    assert_grads_close(grads, ref_grads)
    assert calls["sdpa"] == 2 and calls["attention"] == 0


# --- 4. other mask functions: overlays, sliding windows -------------------------------------


def _mask_and_attention(impl, config, make_mask, q, k, v, module):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config._attn_implementation = impl
    mask = make_mask(config)
    forward = hf_attention.fastlm_attention_forward if impl == "fastlm" else sdpa_attention_forward
    return forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


def _overlay_masks():
    from transformers import masking_utils as mu

    def every_third_key(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx % 3 == 0

    embeds = torch.zeros(2, 8, 4)
    padding = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    return {
        "or-overlay": lambda c: mu.create_causal_mask(
            c, embeds, padding, None, or_mask_function=every_third_key
        ),
        "and-overlay": lambda c: mu.create_causal_mask(
            c, embeds, padding, None, and_mask_function=every_third_key
        ),
        "sliding-window": lambda c: mu.create_sliding_window_causal_mask(c, embeds, padding, None),
        "bidirectional-overlay": lambda c: mu.create_bidirectional_mask(
            c, embeds, padding, and_mask_function=every_third_key
        ),
    }


@pytest.mark.parametrize("pattern", list(_overlay_masks()))
def test_other_mask_functions_match_sdpa(calls, pattern):
    config = tiny_gpt2_config(sliding_window=3)
    module = torch.nn.Module()
    module.is_causal = pattern != "bidirectional-overlay"
    q, k, v = torch.randn(3, 2, 2, 8, 16).unbind(0)
    make_mask = _overlay_masks()[pattern]
    ref = _mask_and_attention("sdpa", config, make_mask, q, k, v, module)
    got = _mask_and_attention("fastlm", config, make_mask, q, k, v, module)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


# --- 5. output_attentions -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_output_attentions_match_eager_with_gradients(tmp_path, arch):
    gpt2 = arch == "gpt2"
    model_class = transformers.GPT2LMHeadModel if gpt2 else transformers.BertModel
    config = tiny_gpt2_config() if gpt2 else tiny_bert_config()
    eager, fast = _twins(tmp_path, model_class, config, reference="eager")
    ids, mask = padded_batch(61, [8, 5], 8, left=gpt2)

    def run(model):
        out = model(ids, attention_mask=mask, output_attentions=True)
        assert len(out.attentions) == 2
        for a in out.attentions:
            a.retain_grad()
        sum(a.square().sum() for a in out.attentions).backward()
        return out.attentions, param_grads(model)

    (ref, ref_grads), (got, grads) = run(eager), run(fast)
    for g, r in zip(got, ref):
        valid = mask.bool()[:, None, :, None]  # rows of padding queries are not compared
        torch.testing.assert_close(g * valid, r * valid, atol=ATOL, rtol=RTOL)
        assert g.grad is not None
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("how", ["attn_implementation", "optimize"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_output_attentions_however_transformers_asks(tmp_path, how, arch):
    """The steps of transformers' test_attention_outputs, on a model running fastlm:
    forward(output_attentions=True), then config.output_attentions = True on the model's
    config (which save_pretrained validates), and a new model built from that config; every
    time one (B, H, S, S) tensor per layer, equal to eager attention."""
    import fastlm

    model_class, config = {
        "bert": (transformers.BertModel, tiny_bert_config()),
        "gpt2": (transformers.GPT2Model, tiny_gpt2_config()),
    }[arch]
    eager, fast = _twins(tmp_path, model_class, config, reference="eager")
    if how == "optimize":
        fast = fastlm.optimize(model_class.from_pretrained(tmp_path).eval())
    ids, mask = padded_batch(config.vocab_size, [6, 4], 6, left=arch == "gpt2")
    valid = mask.bool()[:, None, :, None]  # rows of padding queries are not compared
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask, output_attentions=True).attentions

    def check(attentions):
        assert len(attentions) == config.num_hidden_layers
        for g, r in zip(attentions, ref, strict=True):
            assert g.shape == (2, config.num_attention_heads, 6, 6)
            torch.testing.assert_close(g * valid, r * valid, atol=ATOL, rtol=RTOL)

    with torch.no_grad():
        check(fast(ids, attention_mask=mask, output_attentions=True).attentions)
        fast.config.output_attentions = True
        check(fast(ids, attention_mask=mask).attentions)
        fast.save_pretrained(tmp_path / "saved")  # transformers validates the config there
        rebuilt = model_class(fast.config).eval()  # the test's model_class(config)
        if how == "optimize":
            fastlm.optimize(rebuilt)
        rebuilt.load_state_dict(fast.state_dict())
        assert rebuilt.config._attn_implementation == "fastlm"
        check(rebuilt(ids, attention_mask=mask).attentions)
        fast.config.output_attentions = False
        assert fast(ids, attention_mask=mask).attentions is None
        # Asked for on an eager model, which then switches to fastlm.
        switched = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
        switched.config.output_attentions = True
        if how == "optimize":
            fastlm.optimize(switched)
        else:
            switched.set_attn_implementation("fastlm")
        check(switched(ids, attention_mask=mask).attentions)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_output_attentions_in_generate_match_eager(tmp_path, cache):
    """Decode steps: queries newest over a cache (static: empty slots included in Sk)."""
    eager, fast = _twins(
        tmp_path, transformers.GPT2LMHeadModel, tiny_gpt2_config(), reference="eager"
    )
    ids = torch.randint(1, 97, (2, 6))
    gen = dict(
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        cache_implementation=cache,
        return_dict_in_generate=True,
        output_attentions=True,
    )
    with torch.no_grad():
        ref, got = eager.generate(ids, **gen), fast.generate(ids, **gen)
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.attentions) == len(ref.attentions) == 4
    for step_got, step_ref in zip(got.attentions, ref.attentions):
        for g, r in zip(step_got, step_ref, strict=True):
            torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL)
