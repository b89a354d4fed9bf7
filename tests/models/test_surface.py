"""The transformers model surface: save_pretrained (read back by transformers and fastlm),
.device, .dtype, generation_config, output flags, and an all-padding batch."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

import fastlm.models as fm
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers

PAIRS = [
    ("BertModel", fm.BertModel, tiny_bert_config),
    ("BertForMaskedLM", fm.BertForMaskedLM, tiny_bert_config),
    ("BertForPreTraining", fm.BertForPreTraining, tiny_bert_config),
    ("BertForSequenceClassification", fm.BertForSequenceClassification, tiny_bert_config),
    ("GPT2LMHeadModel", fm.GPT2LMHeadModel, tiny_gpt2_config),
    ("GPT2ForTokenClassification", fm.GPT2ForTokenClassification, tiny_gpt2_config),
]


def _first_output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name,cls,config", PAIRS, ids=[p[0] for p in PAIRS])
def test_save_pretrained_is_read_by_transformers_and_fastlm(tmp_path, name, cls, config, safe):
    cfg = config(num_labels=3)
    ours = cls(fm.BertConfig.from_hf(cfg) if "Bert" in name else fm.GPT2Config.from_hf(cfg)).eval()
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [name]
    hf = getattr(transformers, name).from_pretrained(tmp_path).eval()
    back = cls.from_pretrained(tmp_path)
    vocab = cfg.vocab_size
    ids, mask = padded_batch(vocab, [6, 6], 6)
    with torch.no_grad():
        ref = _first_output(hf(ids, attention_mask=mask))
        got = _first_output(ours(ids, attention_mask=mask))
        again = _first_output(back(ids, attention_mask=mask))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(again, got)
    if name == "BertForSequenceClassification":
        assert hf.config.num_labels == back.config.num_labels == 3


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


LABEL_HEADS = [
    (fm.BertForSequenceClassification, tiny_bert_config),
    (fm.BertForTokenClassification, tiny_bert_config),
    (fm.GPT2ForSequenceClassification, tiny_gpt2_config),
    (fm.GPT2ForTokenClassification, tiny_gpt2_config),
]


@pytest.mark.parametrize("num_labels", [1, 2, 3])
@pytest.mark.parametrize("cls,config", LABEL_HEADS, ids=[h[0].__name__ for h in LABEL_HEADS])
def test_saved_labels_are_what_transformers_writes(tmp_path, cls, config, num_labels):
    """A head built from a fastlm config (no id2label given) saves the labels transformers
    would (LABEL_0 ...), so transformers reloads it without a warning and with the same
    id2label/label2id as its own save of the same config."""
    hf_cfg = config(num_labels=num_labels)
    fields = {k: v for k, v in hf_cfg.to_dict().items() if k not in ("id2label", "label2id")}
    ours = cls(cls.config_class.from_dict({**fields, "num_labels": num_labels})).eval()
    ours.save_pretrained(tmp_path / "ours")
    getattr(transformers, cls.__name__)(hf_cfg).save_pretrained(tmp_path / "hf")
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            back = getattr(transformers, cls.__name__).from_pretrained(tmp_path / "ours")
    finally:
        hf_logger.removeHandler(records)
    assert records.messages == [] and [str(w.message) for w in caught] == []
    theirs = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert back.config.id2label == theirs.id2label and back.config.label2id == theirs.label2id
    assert back.config.num_labels == num_labels
    if num_labels != 2:  # transformers leaves its default (2 labels) out of its json
        saved = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "hf")]
        assert saved[0]["id2label"] == saved[1]["id2label"]
        assert saved[0]["label2id"] == saved[1]["label2id"]
    assert cls.from_pretrained(tmp_path / "ours").config.num_labels == num_labels


def test_device_dtype_and_generation_config(tmp_path):
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(eos_token_id=5, bos_token_id=5))
    hf.generation_config.max_length = 11
    hf.save_pretrained(tmp_path)
    ours = fm.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float16
    gc = ours.generation_config
    assert (gc.eos_token_id, gc.bos_token_id, gc.max_length) == (5, 5, 11)
    fresh = fm.GPT2LMHeadModel(fm.GPT2Config(n_layer=1, n_embd=8, n_head=2, eos_token_id=7))
    assert fresh.generation_config.eos_token_id == 7  # from the model config


@pytest.mark.parametrize(
    "cls", [fm.BertModel, fm.BertForSequenceClassification, fm.BertForTokenClassification]
)
def test_all_padding_batch_gives_finite_zeros(cls):
    model = cls(fm.BertConfig.from_hf(tiny_bert_config())).eval()
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    for t in out.hidden_states:
        assert torch.equal(t, torch.zeros_like(t))
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(
    "cls,config", [(fm.BertModel, tiny_bert_config), (fm.GPT2Model, tiny_gpt2_config)]
)
def test_base_models_hidden_states_and_flags(cls, config):
    hf_cfg = config()
    hf = getattr(transformers, cls.__name__)(hf_cfg).eval()
    ours = cls.from_hf(hf)
    ids, mask = padded_batch(hf_cfg.vocab_size, [6, 3], 6, left=cls is fm.GPT2Model)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        plain = ours(ids, attention_mask=mask)
        as_tuple = ours(ids, attention_mask=mask, return_dict=False)
    assert len(got) == len(ref) == hf_cfg.num_hidden_layers + 1
    valid = mask.bool()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g[valid], r[valid], atol=2e-5, rtol=1e-4)
    assert plain.hidden_states is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.last_hidden_state)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(ids, output_attentions=True)
    with pytest.raises(NotImplementedError, match="head_mask"):
        ours(ids, head_mask=torch.ones(2, 2))
