"""torch.compile(fullgraph=True, dynamic=True) of transformers models running
attn_implementation="fastlm": no graph break, the eager numbers, no recompilation across
batch sizes and lengths (the harness of tests/models/test_compile.py)."""

from __future__ import annotations

import pytest

import fastlm  # noqa: F401  (registers attn_implementation="fastlm")
from tests.models.test_compile import _check_shapes, _compiled
from tests.models.util import tiny_bert_config, tiny_gpt2_config, transformers


@pytest.mark.parametrize(
    ("make", "vocab", "left"),
    [
        (lambda: transformers.BertModel(tiny_bert_config()), 61, False),
        (lambda: transformers.GPT2LMHeadModel(tiny_gpt2_config()), 97, True),
    ],
    ids=["bert", "gpt2"],
)
def test_attn_implementation_fastlm_compiles_whole_and_once(tmp_path, make, vocab, left):
    make().save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="fastlm").eval()
    compiled, backend = _compiled(model)
    _check_shapes(
        model,
        compiled,
        backend,
        vocab,
        lambda m, ids, mask: (m(ids, attention_mask=mask).last_hidden_state,),
        left=left,
    )
