"""fastlm BERT against transformers: MiniLM real weights (torch and triton backends), tiny
random BERT heads with gradients, checkpoint loading and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastlm.models as fm
from tests.models.util import (
    assert_model_parity,
    minilm_dir,
    padded_batch,
    tiny_bert_config,
    transformers,
)

SENTENCES = [
    "The cat sat on the mat.",
    "fastlm runs BERT on packed tokens without padding work.",
    "Hi!",
]


def _minilm_inputs(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def _hf_bert(path, dtype, layers=None):
    m = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval().to(dtype)
    if layers is not None:
        m.encoder.layer = m.encoder.layer[:layers]
    return m


def _check_minilm(backend, dtype, layers):
    path = minilm_dir()
    ids, mask, tt = _minilm_inputs(path)
    ours = fm.BertModel.from_pretrained(path, backend=backend, dtype=dtype)
    if layers is not None:
        ours.encoder.layer = ours.encoder.layer[:layers]
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        oracle = _hf_bert(path, torch.float64, layers)(
            ids, attention_mask=mask, token_type_ids=tt
        ).last_hidden_state
        base = _hf_bert(path, dtype, layers)(
            ids, attention_mask=mask, token_type_ids=tt
        ).last_hidden_state
    valid = mask.bool()
    assert (got[~valid] == 0).all(), "padded positions must hold zeros (documented)"
    assert_model_parity(got, oracle, base, f"MiniLM {backend} {dtype}", valid=valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_minilm_torch_backend_matches_transformers(dtype):
    _check_minilm("torch", dtype, None)


def test_minilm_triton_backend_matches_transformers():
    # Real MiniLM weights through the Triton kernels; 2 of the 6 layers keep the interpreter quick.
    _check_minilm("triton", torch.float32, 2 if not torch.cuda.is_available() else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("form", ["widened", "native"])
def test_minilm_half_layers_run_in_fp32_where_their_products_do(dtype, form, monkeypatch):
    """With the widened form (measured or pinned) each layer of a half-precision model runs
    wholly in fp32 (its LayerNorms see fp32) and hands on its own dtype; with the native form
    it stays in that dtype. Either way: the model parity rule against fp64."""
    from fastlm.ops import linear as linear_module

    monkeypatch.setattr(linear_module, "HALF_FORM", form)
    path = minilm_dir()
    ids, mask, tt = _minilm_inputs(path)
    ours = fm.BertModel.from_pretrained(path, backend="torch", dtype=dtype)
    ours.encoder.layer = ours.encoder.layer[:2]
    seen = {"norm": set(), "layer": set()}
    for layer in ours.encoder.layer:
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
            norm.register_forward_pre_hook(lambda m, a: seen["norm"].add(a[0].dtype))
        layer.register_forward_hook(lambda m, a, out: seen["layer"].add(out.dtype))
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        oracle = _hf_bert(path, torch.float64, 2)(ids, attention_mask=mask, token_type_ids=tt)
        base = _hf_bert(path, dtype, 2)(ids, attention_mask=mask, token_type_ids=tt)
    inner = torch.float32 if form == "widened" else dtype
    assert seen == {"norm": {inner}, "layer": {dtype}} and got.dtype == dtype
    assert_model_parity(got, oracle.last_hidden_state, base.last_hidden_state,
                        f"MiniLM {dtype} {form}", valid=mask.bool())  # fmt: skip


def _hf_and_ours(hf_cls, ours_cls, backend, **cfg):
    hf = hf_cls(tiny_bert_config(**cfg)).eval()
    ours = ours_cls.from_hf(hf, backend=backend)
    return hf, ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lengths", [[9, 9], [9, 4, 1]], ids=["nopad", "pad"])
def test_masked_lm_logits_loss_and_grads(backend, lengths):
    hf, ours = _hf_and_ours(transformers.BertForMaskedLM, fm.BertForMaskedLM, backend)
    ids, mask = padded_batch(61, lengths, 9)
    labels = ids.masked_fill(mask == 0, -100)
    ho = hf(ids, attention_mask=mask, labels=labels)
    oo = ours(ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    torch.testing.assert_close(oo.logits[valid], ho.logits[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(oo.loss, ho.loss, atol=2e-5, rtol=1e-4)
    assert oo["logits"] is oo.logits and oo[0] is oo.loss
    ho.loss.backward()
    oo.loss.backward()
    hp, op = dict(hf.named_parameters()), dict(ours.named_parameters())
    assert set(hp) == set(op)
    for name in hp:
        if hp[name].grad is None:
            continue
        torch.testing.assert_close(
            op[name].grad, hp[name].grad, atol=3e-5, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sequence_classification_matches(dtype):
    hf, ours = _hf_and_ours(
        transformers.BertForSequenceClassification, fm.BertForSequenceClassification, "torch"
    )
    ids, mask = padded_batch(61, [7, 3, 5], 7)
    labels = torch.tensor([0, 1, 1])
    oracle = hf.double()(ids, attention_mask=mask, labels=labels)
    base = hf.to(dtype)(ids, attention_mask=mask, labels=labels)
    got = ours.to(dtype)(ids, attention_mask=mask, labels=labels)
    assert_model_parity(
        got.logits.detach(), oracle.logits.detach(), base.logits.detach(), "seqcls logits"
    )
    assert_model_parity(got.loss.detach(), oracle.loss.detach(), base.loss.detach(), "seqcls loss")


def test_state_dict_keys_are_hf_keys_and_load_state_dict_works():
    for hf_cls, ours_cls in ((transformers.BertModel, fm.BertModel),
                             (transformers.BertForMaskedLM, fm.BertForMaskedLM),
                             (transformers.BertForSequenceClassification, fm.BertForSequenceClassification)):  # fmt: skip
        hf = hf_cls(tiny_bert_config())
        ours = ours_cls(fm.BertConfig.from_hf(hf.config))
        hs, os_ = hf.state_dict(), ours.state_dict()
        assert {k: tuple(v.shape) for k, v in hs.items()} == {
            k: tuple(v.shape) for k, v in os_.items()
        }
        ours.load_state_dict(hs)
    assert ours.bert.embeddings.word_embeddings.weight is not None


def test_fused_qkv_cache_follows_weight_updates():
    hf, ours = _hf_and_ours(transformers.BertModel, fm.BertModel, "torch")
    ids, mask = padded_batch(61, [6, 6], 6)
    with torch.no_grad():
        first = ours(ids, attention_mask=mask).last_hidden_state.clone()
        hf.encoder.layer[0].attention.self.key.weight.mul_(1.5)  # in-place edit on the HF model
        ours.load_state_dict(hf.state_dict())  # copy_ into the same parameters
        second = ours(ids, attention_mask=mask).last_hidden_state
        ref = hf(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, ref, atol=2e-5, rtol=1e-4)


def test_from_pretrained_bin_with_prefix(tmp_path):
    hf = transformers.BertForSequenceClassification(tiny_bert_config()).eval()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours = fm.BertModel.from_pretrained(tmp_path)  # drops the classifier head, strips "bert."
    ids, mask = padded_batch(61, [5, 3], 5)
    with torch.no_grad():
        ref = hf.bert(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)


def test_bad_checkpoint_dirs(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        fm.BertModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no config\.json"):
        fm.BertModel.from_pretrained(tmp_path)
    hf = transformers.BertModel(tiny_bert_config())
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(ValueError, match="no weights"):
        fm.BertModel.from_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    cfg = hf.config.to_dict()
    cfg["intermediate_size"] = 50
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch.*intermediate\.dense\.weight"):
        fm.BertModel.from_pretrained(tmp_path)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 48, 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected .*encoder\.layer\.1"):
        fm.BertModel.from_pretrained(tmp_path)
    os.remove(tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model_type 'gpt2', expected 'bert'"):
        fm.BertModel.from_pretrained(tmp_path)


def test_bad_inputs():
    model = fm.BertModel(fm.BertConfig.from_hf(tiny_bert_config()))
    with pytest.raises(
        ValueError, match=r"sequence length 41 exceeds .*max_position_embeddings 40"
    ):
        model(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 61\)"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 4\)"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model(torch.ones(1, 4, dtype=torch.long), inputs_embeds=torch.ones(1, 4, 32))
    with pytest.raises(NotImplementedError, match="position_embedding_type"):
        fm.BertConfig(position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        fm.BertConfig(hidden_size=30, num_attention_heads=4)


# ----------------------------------------------------- when padding is skipped (CPU rule)


def _mask_with_padding(batch: int, seq: int, padded: int) -> torch.Tensor:
    """(batch, seq) long mask with exactly ``padded`` padded positions, from the row ends."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for n in range(padded):
        mask[n % batch, seq - 1 - n // batch] = 0
    return mask


@pytest.mark.parametrize(
    "padded, packs",
    [(0, False), (3, False), (12, False), (13, True), (40, True), (64, True)],
    ids=lambda v: str(v),
)
def test_packing_starts_at_the_padding_fraction_that_pays(padded, packs):
    """64 positions: PACK_MIN_PADDING (20%) of them is 12.8, so 13 padded positions pack."""
    from fastlm.models import bert

    assert bert.PACK_MIN_PADDING == 0.20
    mask = _mask_with_padding(4, 16, padded)
    assert bert.skips_padding(mask) is packs
    assert bert.skips_padding(None) is False


@pytest.mark.parametrize("padded, packs", [(3, False), (20, True)])
@pytest.mark.parametrize("route", ["fastlm.models", "optimize"])
def test_each_route_takes_the_path_the_rule_picks(route, padded, packs, monkeypatch):
    """The model packs exactly when the rule says so, and gives transformers' valid rows
    either way."""
    import copy

    import fastlm
    from fastlm.integrations.hf import fused_layers as opt_module
    from fastlm.models import bert

    calls = []
    for module in (bert, opt_module):
        real = module.unpad_input
        monkeypatch.setattr(
            module, "unpad_input", lambda *a, real=real, **k: calls.append(1) or real(*a, **k)
        )
    torch.manual_seed(0)
    hf = transformers.BertModel(tiny_bert_config(initializer_range=0.2)).eval()
    ours = (
        fm.BertModel.from_hf(hf) if route == "fastlm.models" else fastlm.optimize(copy.deepcopy(hf))
    )
    mask = _mask_with_padding(4, 16, padded)
    ids = torch.randint(1, hf.config.vocab_size, (4, 16))
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
        want = hf(ids, attention_mask=mask).last_hidden_state
    assert bool(calls) is packs
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-4)
