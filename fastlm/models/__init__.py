"""Drop-in BERT and GPT-2 on fastlm ops: Hugging Face state_dict keys, from_pretrained from a
local directory (no transformers needed), from_hf, and generate() for GPT-2."""

from fastlm.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel
from fastlm.models.config import BertConfig, GPT2Config
from fastlm.models.gpt2 import GPT2LMHeadModel, GPT2Model
from fastlm.models.kv_cache import StaticKVCache

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "StaticKVCache",
]
