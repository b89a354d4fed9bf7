"""Drop-in BERT and GPT-2 on fastlm ops: Hugging Face class names, state_dict keys, outputs
and losses; from_pretrained/save_pretrained on local directories (no transformers needed),
from_hf, and generate() for GPT-2."""

from fastlm.models.bert import BertModel
from fastlm.models.bert_heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from fastlm.models.config import BertConfig, GPT2Config
from fastlm.models.generation_config import GenerationConfig
from fastlm.models.gpt2 import (
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from fastlm.models.kv_cache import StaticKVCache

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "GPT2Config",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2LMHeadModel",
    "GPT2Model",
    "GenerationConfig",
    "StaticKVCache",
]
