"""from_pretrained on every checkpoint layout the hub ships, built from real transformers
models (tiny random configs): safetensors and .bin, sharded or not, bare or prefixed keys,
tied and untied heads, legacy names, heads missing from the checkpoint, config overrides,
corrupt files."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastlm.models as fm
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers


def _save_bin(state_dict: dict, folder, shards: int = 1) -> None:
    """The .bin layouts: ``pytorch_model.bin``, or N shards + ``pytorch_model.bin.index.json``
    (transformers 5 writes safetensors only, so the .bin layouts are written here)."""
    folder.mkdir(exist_ok=True)
    if shards == 1:
        torch.save(state_dict, folder / "pytorch_model.bin")
        return
    keys = list(state_dict)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state_dict[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _write_config(hf_model, folder) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_model.config.to_dict()))


def _mlm_logits_close(hf, ours, valid_only: bool = True):
    ids, mask = padded_batch(61, [7, 4], 7)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_bert_mlm_every_file_layout(tmp_path, layout):
    hf = transformers.BertForMaskedLM(tiny_bert_config()).eval()
    if layout.startswith("safetensors"):
        hf.save_pretrained(tmp_path, max_shard_size="20KB" if "sharded" in layout else "50GB")
        index = (tmp_path / "model.safetensors.index.json").exists()
        assert index == ("sharded" in layout)
    else:
        _write_config(hf, tmp_path)
        _save_bin(hf.state_dict(), tmp_path, shards=4 if "sharded" in layout else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without a warning
        ours = fm.BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    _mlm_logits_close(hf, ours)


def test_legacy_gamma_beta_names(tmp_path):
    hf = transformers.BertModel(tiny_bert_config()).eval()
    sd = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in hf.state_dict().items()
    }
    assert any(k.endswith("gamma") for k in sd)
    _write_config(hf, tmp_path)
    _save_bin(sd, tmp_path)
    ours = fm.BertModel.from_pretrained(tmp_path)
    ids, mask = padded_batch(61, [6, 3], 6)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(
        got.last_hidden_state[valid], ref.last_hidden_state[valid], atol=2e-5, rtol=1e-4
    )
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=2e-5, rtol=1e-4)


def _gpt2_logits_close(hf, ours):
    ids, mask = padded_batch(97, [8, 5], 8, left=True)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_openai_gpt2_layout_bare_keys_no_lm_head_attn_bias_buffers(tmp_path, fmt):
    """openai-community/gpt2: GPT2Model keys without ``transformer.``, no lm_head (tied),
    and the legacy causal-mask buffers ``attn.bias`` / ``attn.masked_bias``."""
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()
    sd = {k: v for k, v in hf.transformer.state_dict().items()}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _write_config(hf, tmp_path)
    if fmt == "bin":
        _save_bin(sd, tmp_path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = fm.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    _gpt2_logits_close(hf, ours)
    # And the bare backbone from the same directory.
    base = fm.GPT2Model.from_pretrained(tmp_path)
    torch.testing.assert_close(base.wte.weight, hf.transformer.wte.weight)


def test_gpt2_sharded_safetensors_and_untied_head(tmp_path):
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_()  # really different from wte
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = fm.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight)
    _gpt2_logits_close(hf, ours)


def test_task_model_from_bare_base_checkpoint_initialises_head_with_one_warning(tmp_path):
    cfg = tiny_bert_config(initializer_range=0.5)  # a std large enough to measure
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path)  # bare keys: embeddings.*, encoder.*, pooler.*
    with pytest.warns(UserWarning) as record:
        ours = fm.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    msgs = [str(w.message) for w in record if "newly initialised" in str(w.message)]
    assert len(msgs) == 1 and "classifier.weight" in msgs[0] and "classifier.bias" in msgs[0]
    assert "bert.encoder" not in msgs[0]
    w = ours.classifier.weight
    assert w.shape == (3, 32)
    assert 0.3 < w.std().item() < 0.7 and abs(w.mean().item()) < 0.2
    assert torch.equal(ours.classifier.bias, torch.zeros(3))
    ids, mask = padded_batch(61, [6, 2], 6)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).pooler_output
        got = ours.bert(ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_mlm_checkpoint_has_no_pooler_overrides_and_unused_head(tmp_path):
    """Every BertForMaskedLM checkpoint lacks the pooler; a classifier built on one gets a new
    pooler (warned), the MLM head is warned as unused, and add_pooling_layer=False works."""
    hf = transformers.BertForMaskedLM(tiny_bert_config()).eval()
    hf.save_pretrained(tmp_path)
    with pytest.warns(
        UserWarning, match=r"bert\.pooler\.dense\.weight.*not used.*cls\.predictions"
    ):
        fm.BertForSequenceClassification.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="classifier.weight") as record:
        tok = fm.BertForTokenClassification.from_pretrained(tmp_path, num_labels=5)
    assert not any("pooler" in str(w.message) for w in record)  # NER builds no pooler
    assert tok.bert.pooler is None and tok.classifier.out_features == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = fm.BertModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert base.pooler is None
    seq = fm.BertForSequenceClassification.from_pretrained(
        tmp_path, hidden_dropout_prob=0.0, classifier_dropout=0.0
    )
    assert seq.config.hidden_dropout_prob == 0.0
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['num_lables'\]"):
        fm.BertForSequenceClassification.from_pretrained(tmp_path, num_lables=3)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(tiny_bert_config().to_dict()))
    with pytest.raises(ValueError, match="none of the model's weights"):
        fm.BertModel.from_pretrained(tmp_path)
    assert cfg["model_type"] == "gpt2"


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-sharded"])
def test_truncated_weights_name_the_file(tmp_path, fmt):
    hf = transformers.BertModel(tiny_bert_config())
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
        bad = tmp_path / "model.safetensors"
    else:
        _write_config(hf, tmp_path)
        _save_bin(hf.state_dict(), tmp_path, shards=2 if "sharded" in fmt else 1)
        bad = sorted(tmp_path.glob("pytorch_model*.bin"))[-1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{bad.name}: cannot read the checkpoint file"):
        fm.BertModel.from_pretrained(tmp_path)


def test_shard_index_listing_a_missing_shard(tmp_path):
    hf = transformers.BertModel(tiny_bert_config())
    _write_config(hf, tmp_path)
    _save_bin(hf.state_dict(), tmp_path, shards=2)
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ValueError, match=r"lists shard 'pytorch_model-00002-of-00002\.bin'"):
        fm.BertModel.from_pretrained(tmp_path)
