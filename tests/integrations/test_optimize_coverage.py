"""fastlm.optimize() serves every BERT and GPT-2 configuration transformers runs: BERT as a
decoder (generate, beam search, assisted decoding, dynamic and static caches),
cross-attention (EncoderDecoderModel, BERT and GPT-2 with add_cross_attention), masks
prepared for another attention implementation, and the pieces it leaves to transformers.
Each situation against the same transformers model un-optimized (tiny random models, CPU,
fp32): outputs, gradients where training uses them, and identical generated token ids."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fastlm
from fastlm.nn import SelfAttention
from tests.models.util import (
    assert_grads_close,
    padded_batch,
    param_grads,
    tiny_bert_config,
    tiny_gpt2_config,
    transformers,
)

ATOL, RTOL = 2e-5, 1e-4
BERT_VOCAB = 61
ENC_LEN = 6
DECODER_START = 1
# At transformers' default initializer_range (0.02) a tiny model's attention barely moves its
# outputs (a wrong mask changes logits by ~1e-5); at 0.2 it moves them by ~1.
INIT_RANGE = 0.2


def _bert_config(**kw):
    return tiny_bert_config(initializer_range=INIT_RANGE, **kw)


def _gpt2_config(**kw):
    return tiny_gpt2_config(initializer_range=INIT_RANGE, **kw)


def _twins(model, reference="sdpa"):
    """(reference, optimized): the same weights, the reference on transformers' ``reference``
    attention implementation, the twin optimized by fastlm."""
    model.eval().set_attn_implementation(reference)
    return model, fastlm.optimize(copy.deepcopy(model))


def _decoder_bert(**kw):
    torch.manual_seed(0)
    return transformers.BertLMHeadModel(_bert_config(is_decoder=True, **kw))


def _encoder_decoder(decoder: str):
    torch.manual_seed(0)
    if decoder == "bert":
        dec = _bert_config(is_decoder=True, add_cross_attention=True)
    else:
        dec = _gpt2_config(is_decoder=True, add_cross_attention=True, vocab_size=BERT_VOCAB)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(_bert_config(), dec)
    model = transformers.EncoderDecoderModel(config=config)
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = (
        DECODER_START
    )
    model.config.pad_token_id = model.generation_config.pad_token_id = 0
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that run BERT's self-attention fused (fastlm.nn.SelfAttention)."""
    counts = {"self_attention": 0}
    forward = SelfAttention.forward

    def counted(self, *args, **kwargs):
        counts["self_attention"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SelfAttention, "forward", counted)
    return counts


def _lm_labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def _loss_and_grads(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    return out.logits, param_grads(model)


def _assert_trains_alike(ref, fast, valid=None, **inputs) -> dict:
    """The same logits (on ``valid`` positions) and parameter gradients of the loss; returns
    the optimized model's gradients."""
    (ref_logits, ref_grads), (logits, grads) = (
        _loss_and_grads(ref, **inputs),
        _loss_and_grads(fast, **inputs),
    )
    where = slice(None) if valid is None else valid
    torch.testing.assert_close(logits[where], ref_logits[where], atol=ATOL, rtol=RTOL)
    assert_grads_close(grads, ref_grads)
    return grads


# --- BERT as a decoder ----------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_decoder_bert_trains_fused_and_matches(fused_calls, reference):
    """Causal self-attention with right padding, no cache (labels turn use_cache off): fused."""
    ref, fast = _twins(_decoder_bert(), reference)
    ids, mask = padded_batch(BERT_VOCAB, [9, 5], 9)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_lm_labels(ids, mask))
    _assert_trains_alike(ref, fast, mask.bool(), **inputs)
    assert fused_calls["self_attention"] == 2  # one per layer: the causal path ran fused


def _generate(model, ids, **kw):
    out = model.generate(
        ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        output_logits=True, **kw,
    )  # fmt: skip
    return out.sequences, out.logits


def _assert_same_generation(got, ref):
    (seq, logits), (ref_seq, ref_logits) = got, ref
    assert torch.equal(seq, ref_seq)
    for step, (g, r) in enumerate(zip(logits, ref_logits, strict=True)):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL, msg=f"step {step}")


@pytest.mark.parametrize(
    "kw", [{}, {"num_beams": 3}, {"cache_implementation": "static"}],
    ids=["greedy-dynamic-cache", "beam-search", "static-cache"],
)  # fmt: skip
def test_decoder_bert_generate_matches(kw):
    ref, fast = _twins(_decoder_bert())
    ids, mask = padded_batch(BERT_VOCAB, [7, 4], 7, left=True)
    with torch.no_grad():
        _assert_same_generation(
            _generate(fast, ids, attention_mask=mask, **kw),
            _generate(ref, ids, attention_mask=mask, **kw),
        )


def test_decoder_bert_assisted_generate_matches():
    """Assisted decoding: multi-token queries verified over a cache that is cropped back."""
    ref, fast = _twins(_decoder_bert())
    torch.manual_seed(1)
    assistant = transformers.BertLMHeadModel(_bert_config(is_decoder=True, num_hidden_layers=1))
    ref_assistant, fast_assistant = _twins(assistant)
    ids = torch.randint(1, BERT_VOCAB, (1, 6))
    with torch.no_grad():
        _assert_same_generation(
            _generate(fast, ids, assistant_model=fast_assistant),
            _generate(ref, ids, assistant_model=ref_assistant),
        )


# --- cross-attention ------------------------------------------------------------------------


def _encoder_states(batch, width):
    torch.manual_seed(2)
    states = torch.randn(batch, ENC_LEN, width)
    mask = torch.ones(batch, ENC_LEN, dtype=torch.long)
    mask[1, ENC_LEN - 2 :] = 0  # padded encoder positions: the cross-attention must skip them
    return states, mask


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_cross_attention_forward_and_grads_match(fused_calls, arch):
    torch.manual_seed(0)
    if arch == "bert":
        model = transformers.BertLMHeadModel(
            _bert_config(is_decoder=True, add_cross_attention=True)
        )
    else:
        model = transformers.GPT2LMHeadModel(_gpt2_config(add_cross_attention=True))
    ref, fast = _twins(model)
    ids, mask = padded_batch(BERT_VOCAB, [8, 6], 8)
    states, enc_mask = _encoder_states(2, 32)
    inputs = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=states,
                  encoder_attention_mask=enc_mask, labels=_lm_labels(ids, mask))  # fmt: skip
    grads = _assert_trains_alike(ref, fast, mask.bool(), **inputs)
    assert any("crossattention" in name for name in grads)
    assert fused_calls["self_attention"] == (2 if arch == "bert" else 0)


def test_gpt2_cross_attention_generate_matches():
    torch.manual_seed(0)
    ref, fast = _twins(transformers.GPT2LMHeadModel(_gpt2_config(add_cross_attention=True)))
    ids = torch.randint(1, 97, (2, 5))
    states, enc_mask = _encoder_states(2, 32)
    kw = dict(encoder_hidden_states=states, encoder_attention_mask=enc_mask)
    with torch.no_grad():
        _assert_same_generation(_generate(fast, ids, **kw), _generate(ref, ids, **kw))


@pytest.mark.parametrize("decoder", ["bert", "gpt2"], ids=["bert2bert", "bert2gpt2"])
def test_encoder_decoder_model_trains_and_generates(decoder):
    ref, fast = _twins(_encoder_decoder(decoder))
    ids, mask = padded_batch(BERT_VOCAB, [7, 4], 7)
    targets, target_mask = padded_batch(BERT_VOCAB, [5, 3], 5)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_lm_labels(targets, target_mask))
    _assert_trains_alike(ref, fast, **inputs)
    for kw in ({}, {"num_beams": 2}):
        with torch.no_grad():
            _assert_same_generation(
                _generate(fast, ids, attention_mask=mask, **kw),
                _generate(ref, ids, attention_mask=mask, **kw),
            )


# --- masks prepared for another attention implementation -------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_implementation_switched_after_optimize(fused_calls, impl, decoder):
    """set_attn_implementation after optimize(): the layers get that implementation's mask
    (4-D with padding) and serve it exactly, with gradients."""
    torch.manual_seed(0)
    model_class = transformers.BertLMHeadModel if decoder else transformers.BertForMaskedLM
    ref, fast = _twins(model_class(_bert_config(is_decoder=decoder)), impl)
    fast.set_attn_implementation(impl)
    ids, mask = padded_batch(BERT_VOCAB, [8, 5], 8)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_lm_labels(ids, mask))
    _assert_trains_alike(ref, fast, mask.bool(), **inputs)
    assert fused_calls["self_attention"] == 0  # 4-D masks: transformers' self-attention ran


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "float"])
def test_custom_4d_mask(additive):
    ref, fast = _twins(transformers.BertModel(_bert_config()))
    ids = torch.randint(1, BERT_VOCAB, (2, 7))
    allowed = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed[..., 0] = True  # every query sees at least one key
    mask = allowed
    if additive:
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        got = fast(ids, attention_mask=mask).last_hidden_state
        want = ref(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("cross", [False, True], ids=["encoder", "cross-attention"])
def test_output_attentions_while_optimized(cross):
    """Self- and cross-attention probabilities (Sq != Sk, encoder padding) as eager's."""
    torch.manual_seed(0)
    config = _bert_config(is_decoder=cross, add_cross_attention=cross)
    ref, fast = _twins(transformers.BertModel(config), "eager")
    ids, mask = padded_batch(BERT_VOCAB, [7, 4], 7)
    kw = dict(attention_mask=mask, output_attentions=True)
    if cross:
        kw["encoder_hidden_states"], kw["encoder_attention_mask"] = _encoder_states(2, 32)
    with torch.no_grad():
        got, want = fast(ids, **kw), ref(ids, **kw)
    kinds = ("attentions", "cross_attentions") if cross else ("attentions",)
    valid = mask.bool()[:, None, :, None]  # rows of padding queries are not compared
    for kind in kinds:
        assert len(getattr(got, kind)) == len(getattr(want, kind)) == 2, kind
        for g, w in zip(getattr(got, kind), getattr(want, kind)):
            torch.testing.assert_close(g * valid, w * valid, atol=ATOL, rtol=RTOL, msg=kind)


# --- what is left to transformers -----------------------------------------------------------


def _layer_classes(model):
    return [type(m) for m in model.modules()]


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """caplog, with fastlm's logged-once memory empty (another test may have logged first)."""
    from fastlm.integrations.hf import log

    monkeypatch.setattr(log, "_logged", set())
    return caplog


def _assert_left_and_logged(caplog, model, what):
    ids = torch.randint(1, BERT_VOCAB, (2, 6))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    with caplog.at_level(logging.INFO, logger="fastlm"):
        fastlm.optimize(model)
    assert any(what in r.getMessage() for r in caplog.records), caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, want, atol=ATOL, rtol=RTOL)


def test_relative_positions_leave_the_backbone_unchanged(fresh_log):
    """transformers < 5 kept relative position scores inside its eager self-attention (the
    layer's ``position_embedding_type``); such a backbone is left to transformers entirely.
    The attribute is set by hand here: transformers 5.x has no such layers."""
    model = transformers.BertModel(_bert_config()).eval()
    for layer in model.encoder.layer:
        layer.attention.self.position_embedding_type = "relative_key"
    classes, impl = _layer_classes(model), model.config._attn_implementation
    _assert_left_and_logged(fresh_log, model, "position_embedding_type")
    assert _layer_classes(model) == classes and model.config._attn_implementation == impl


def test_relative_position_config_is_ignored_as_transformers_does():
    """transformers 5.x reads no position_embedding_type: such a config runs (and is
    optimized) with absolute positions, as un-optimized."""
    ref, fast = _twins(transformers.BertModel(_bert_config(position_embedding_type="relative_key")))
    assert type(fast.encoder.layer[0]).__name__ == "FastLMBertLayer"
    ids = torch.randint(1, BERT_VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids)[0], ref(ids)[0], atol=ATOL, rtol=RTOL)


def test_unfusable_layers_are_left_unchanged(fresh_log):
    bert_layer = transformers.models.bert.modeling_bert.BertLayer

    class CustomLayer(bert_layer):  # a user subclass: its forward must keep running
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 0.5

    model = transformers.BertModel(_bert_config(hidden_act="relu")).eval()
    _assert_left_and_logged(fresh_log, model, "activation 'relu'")
    assert type(model.encoder.layer[0]) is bert_layer
    assert type(model.encoder.layer[0].output.LayerNorm).__name__ == "LayerNorm"
    assert model.config._attn_implementation == "fastlm"  # the attention still runs fused

    class CustomNorm(torch.nn.LayerNorm):  # the fastlm layer would call it with residual=
        pass

    model = transformers.BertModel(_bert_config(num_hidden_layers=3)).eval()
    model.encoder.layer[1].__class__ = CustomLayer
    model.encoder.layer[2].output.LayerNorm.__class__ = CustomNorm
    _assert_left_and_logged(fresh_log, model, "CustomLayer left to transformers")
    assert "CustomNorm left to transformers" in fresh_log.text
    assert type(model.encoder.layer[0]).__name__ == "FastLMBertLayer"
    assert type(model.encoder.layer[1]) is CustomLayer
    assert type(model.encoder.layer[2]) is bert_layer


# --- revert ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [
        _decoder_bert,
        lambda: transformers.GPT2LMHeadModel(_gpt2_config(add_cross_attention=True)),
        lambda: _encoder_decoder("bert"),
        lambda: _encoder_decoder("gpt2"),
    ], ids=["decoder-bert", "gpt2-cross", "bert2bert", "bert2gpt2"],
)  # fmt: skip
def test_revert_restores_classes_and_logits(make):
    model = make().eval()
    classes = _layer_classes(model)
    ids = torch.randint(1, BERT_VOCAB, (2, 6))
    states, enc_mask = _encoder_states(2, 32)
    if isinstance(model, transformers.EncoderDecoderModel):
        inputs = dict(input_ids=ids, decoder_input_ids=ids[:, :4], attention_mask=enc_mask)
    elif model.config.add_cross_attention:
        inputs = dict(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=enc_mask)
    else:
        inputs = dict(input_ids=ids)

    def logits():
        with torch.no_grad():
            return model(**inputs).logits

    before = logits()
    fastlm.optimize(model)
    assert _layer_classes(model) != classes
    torch.testing.assert_close(logits(), before, atol=ATOL, rtol=RTOL)
    fastlm.revert(model)
    assert _layer_classes(model) == classes
    assert torch.equal(logits(), before)
