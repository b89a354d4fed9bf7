"""transformers integration: attn_implementation="fastlm", optimize()/revert(), registration."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.integrations.hf.projections import Conv1D, FastLMConv1D
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers


def _saved(tmp_path, model):
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("lengths", [[9, 9, 9], [9, 5, 2]], ids=["nopad", "pad"])
def test_attn_implementation_fastlm_gpt2(tmp_path, lengths):
    path = _saved(tmp_path, transformers.GPT2LMHeadModel(tiny_gpt2_config()))
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    fast = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="fastlm"
    ).eval()
    ids, mask = padded_batch(97, lengths, 9, left=True)
    with torch.no_grad():
        ref, got = eager(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=1e-4)
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, **gen), eager.generate(ids, **gen))


@pytest.mark.parametrize("lengths", [[7, 7], [7, 3]], ids=["nopad", "pad"])
def test_attn_implementation_fastlm_bert(tmp_path, lengths):
    path = _saved(tmp_path, transformers.BertModel(tiny_bert_config()))
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    fast = transformers.AutoModel.from_pretrained(path, attn_implementation="fastlm").eval()
    ids, mask = padded_batch(61, lengths, 7)
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).last_hidden_state
        got = fast(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    # Without the mask registration the padding would be ignored: check it mattered.
    with torch.no_grad():
        unmasked = fast(ids).last_hidden_state
    if 0 in mask:
        assert not torch.allclose(unmasked[mask.bool()], ref[mask.bool()], atol=1e-4)


@pytest.mark.parametrize(
    "make", [
        lambda: transformers.BertForSequenceClassification(tiny_bert_config()),
        lambda: transformers.BertForMaskedLM(tiny_bert_config()),
        lambda: transformers.GPT2LMHeadModel(tiny_gpt2_config()),
        lambda: transformers.GPT2Model(tiny_gpt2_config()),
    ], ids=["bert-seqcls", "bert-mlm", "gpt2-lm", "gpt2"],
)  # fmt: skip
def test_optimize_revert_round_trip(make):
    model = make().eval()
    is_bert = "Bert" in type(model).__name__
    ids, mask = padded_batch(61 if is_bert else 97, [8, 4], 8, left=not is_bert)
    params = {k: v.data_ptr() for k, v in model.state_dict().items()}
    before = model.state_dict().keys()

    def run():
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    ref = run()
    plain = [m for m in model.modules() if type(m) in (torch.nn.Linear, Conv1D)]
    assert fastlm.optimize(model) is model
    assert model.config._attn_implementation == "fastlm"
    # Every projection computes through fastlm.ops.linear (heads and attention included).
    assert plain and all(type(m) in (fastlm.nn.Linear, FastLMConv1D) for m in plain)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params  # shared, not copied
    assert model.state_dict().keys() == before
    got = run()
    valid = (
        mask.bool() if ref.dim() == 3 else slice(None)
    )  # per-token outputs: compare valid tokens
    torch.testing.assert_close(got[valid], ref[valid], atol=3e-5, rtol=1e-4)
    fastlm.revert(model)
    assert model.config._attn_implementation != "fastlm"
    assert {type(m) for m in plain} <= {torch.nn.Linear, Conv1D}
    assert torch.equal(run(), ref)
    with pytest.raises(ValueError, match="was not optimized"):
        fastlm.revert(model)


def test_optimize_trains_and_rejects_other_models():
    model = transformers.GPT2LMHeadModel(tiny_gpt2_config()).train()
    fastlm.optimize(model)
    ids = torch.randint(0, 97, (2, 6))
    model(ids, labels=ids).loss.backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
    with pytest.raises(NotImplementedError, match="contains none of them"):
        fastlm.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        fastlm.optimize("model")


def test_mask_hook_forms():
    """Plain masks stay 2-D (or None); a pattern fastlm cannot express is materialised exactly
    as transformers' sdpa mask (its tests against sdpa outputs: test_hf_masks.py)."""
    from transformers import masking_utils as mu

    from fastlm.integrations.hf.attention import fastlm_mask

    window = mu.sliding_window_causal_mask_function(2)
    dense = fastlm_mask(1, 4, 4, mask_function=window)
    assert torch.equal(
        dense, mu.sdpa_mask(1, 4, 4, mask_function=window, allow_is_causal_skip=False)
    )
    m = torch.tensor([[True, True, False]])
    assert torch.equal(
        fastlm_mask(1, 3, 3, mask_function=mu.bidirectional_mask_function, attention_mask=m), m
    )
    assert (
        fastlm_mask(1, 3, 3, mask_function=mu.causal_mask_function, attention_mask=m | True) is None
    )


def test_import_fastlm_does_not_import_transformers_and_registers_later():
    code = (
        "import sys, fastlm\n"
        "assert 'transformers' not in sys.modules, 'import fastlm pulled in transformers'\n"
        "from transformers.modeling_utils import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'fastlm' in AttentionInterface._global_mapping\n"
        "assert 'fastlm' in AttentionMaskInterface._global_mapping\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_output_attentions_config_validates_when_transformers_was_imported_first(tmp_path):
    """A config class defined before fastlm registers (transformers and BertConfig imported
    first) accepts output_attentions=True on "fastlm" too, save_pretrained's check included."""
    code = (
        "import sys, torch\n"
        "from transformers import BertConfig, BertModel\n"
        "import fastlm\n"
        "config = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,\n"
        "                    intermediate_size=16, vocab_size=11)\n"
        "model = BertModel._from_config(config, attn_implementation='fastlm').eval()\n"
        "model.config.output_attentions = True\n"
        "model.save_pretrained(sys.argv[1])\n"
        "assert len(model(torch.ones(1, 3, dtype=torch.long)).attentions) == 1\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_revert_keeps_state_set_while_optimized():
    model = transformers.BertModel(tiny_bert_config()).eval()
    fastlm.optimize(model)
    model.train()
    model.gradient_checkpointing_enable()
    layer = model.encoder.layer[0]
    assert layer._fastlm_parts.attention.training  # the unregistered parts follow train()
    fastlm.revert(model)
    assert type(layer) is transformers.models.bert.modeling_bert.BertLayer
    assert not hasattr(layer, "_fastlm_parts")
    assert model.training and layer.training and layer.attention.self.training
    assert layer.gradient_checkpointing and model.is_gradient_checkpointing


@pytest.mark.parametrize("make", [lambda: transformers.BertModel(tiny_bert_config()),
                                  lambda: transformers.GPT2LMHeadModel(tiny_gpt2_config())],
                         ids=["bert", "gpt2"])  # fmt: skip
def test_optimized_model_round_trips_through_torch_save(tmp_path, make):
    model = fastlm.optimize(make().eval())
    ids = torch.randint(1, 61, (2, 5))
    with torch.no_grad():
        ref = model(ids)[0]
    torch.save(model, tmp_path / "m.pt")  # PicklingError when the classes were made by type()
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], ref)
    fastlm.revert(loaded)
    assert loaded.config._attn_implementation != "fastlm"


def test_optimize_finds_every_model_inside_a_wrapper():
    class Wrapper(torch.nn.Module):  # no .config: optimize() used to read model.config
        def __init__(self):
            super().__init__()
            self.encoder = transformers.BertModel(tiny_bert_config())
            self.decoder = transformers.GPT2Model(tiny_gpt2_config())

        def forward(self, ids):
            return self.encoder(ids).last_hidden_state, self.decoder(ids).last_hidden_state

    wrapper = Wrapper().eval()
    ids = torch.randint(1, 61, (2, 6))
    with torch.no_grad():
        ref = wrapper(ids)
    fastlm.optimize(wrapper)
    assert type(wrapper.encoder.encoder.layer[0]).__name__ == "FastLMBertLayer"
    assert type(wrapper.decoder.h[1]).__name__ == "FastLMGPT2Block"
    with torch.no_grad():
        for got, want in zip(wrapper(ids), ref):
            torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    fastlm.revert(wrapper)
    assert wrapper.encoder.config._attn_implementation != "fastlm"
    assert type(wrapper.decoder.h[1]).__name__ == "GPT2Block"


def test_optimize_bert_trains_with_dropout():
    model = transformers.BertModel(
        tiny_bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    )
    fastlm.optimize(model).train()
    ids = torch.randint(1, 61, (2, 6))
    out = model(ids).last_hidden_state
    assert not torch.equal(out, model(ids).last_hidden_state)  # dropout is on
    out.sum().backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


def test_mask_on_a_device_is_passed_through_unread():
    # Dropping an all-ones mask needs its values: a host sync on a GPU. Only CPU masks are
    # inspected; a meta tensor (no values at all) shows no other device is read.
    from transformers import masking_utils as mu

    from fastlm.integrations.hf.attention import fastlm_mask

    m = torch.ones(2, 3, dtype=torch.bool, device="meta")
    assert fastlm_mask(2, 3, 3, mask_function=mu.causal_mask_function, attention_mask=m) is not None


def test_optimized_bert_runs_valid_tokens_only_on_cpu():
    # Eager CPU: each layer packs the valid tokens, so padded rows come out as zeros, while
    # valid rows and every gradient of a loss over them match transformers' sdpa.
    ref = transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).train()
    model = fastlm.optimize(transformers.BertModel(tiny_bert_config(), add_pooling_layer=False))
    model.load_state_dict(ref.state_dict())
    model.train()
    ids, mask = padded_batch(61, [9, 4, 1], 9)
    valid = mask.bool()
    got, want = model(ids, attention_mask=mask)[0], ref(ids, attention_mask=mask)[0]
    assert torch.count_nonzero(got[~valid]) == 0
    torch.testing.assert_close(got[valid], want[valid], atol=3e-5, rtol=1e-4)
    weights = torch.randn_like(got)
    (got[valid] * weights[valid]).sum().backward()
    (want[valid] * weights[valid]).sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-4, msg=name)
