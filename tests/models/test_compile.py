"""torch.compile(fullgraph=True, dynamic=True) of the fastlm models: no graph break (fullgraph
raises on one), the eager numbers, and one compilation across batch sizes and lengths.

The backend is ``aot_eager`` (traces through AOTAutograd, as inductor would, without its
codegen: fast on CPU) wrapped in a counter: each call of the backend is one compiled graph.
"""

from __future__ import annotations

import pytest
import torch

import fastlm.models as fm
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config

# (batch, seq) pairs: two batch sizes x two lengths, each run after the first compilation.
SHAPES = [(2, 7), (3, 7), (2, 11), (3, 11)]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed, then runs aot_eager."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_compiler

        self.graphs += 1
        boxed = make_boxed_compiler(lambda g, _: g.forward)
        return aot_autograd(fw_compiler=boxed)(gm, example_inputs)


def _compiled(model):
    torch._dynamo.reset()
    backend = CountingBackend()
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=True), backend


def _inputs(vocab: int, bsz: int, seq: int, left: bool = False):
    torch.manual_seed(bsz * 100 + seq)
    lengths = [seq - (i % 3) for i in range(bsz)]  # some rows padded, some full
    return padded_batch(vocab, lengths, seq, left=left)


def _check_shapes(model, compiled, backend, vocab: int, outputs, left: bool = False):
    """Every shape gives the eager outputs (everywhere for right padding, BERT: padding holds
    zeros both ways; at valid positions for GPT-2's left padding); only the first compiles.

    (The first call may hand the backend more than one graph: dynamo restarts its analysis
    once to specialise the modules' float attributes. A recompilation for a new shape
    would be one more call after it.)"""
    with torch.no_grad():
        for i, (bsz, seq) in enumerate(SHAPES):
            ids, mask = _inputs(vocab, bsz, seq, left)
            valid = mask.bool()
            for got, want in zip(outputs(compiled, ids, mask), outputs(model, ids, mask)):
                if left and got.dim() == 3:
                    got, want = got[valid], want[valid]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if i == 0:
                first = backend.graphs
                assert first >= 1, "torch.compile never called the backend"
    assert backend.graphs == first, f"recompiled for shapes {SHAPES[1:]}"


def test_bert_compiles_whole_and_once_and_checks_token_ids_on_device():
    """BertModel under a sequence-classification head (the pooler and the head on top): its
    last hidden state and the logits. Then, with the same compiled graph, the id range check:
    under torch.compile it is a device-side assert (no host read), so a bad id still fails,
    as a RuntimeError from the assert instead of a ValueError. (One model for the three
    checks: each torch.compile of a model costs 10 s on a CI core.)"""
    torch.manual_seed(0)
    config = fm.BertConfig.from_hf(tiny_bert_config(num_labels=3))
    model = fm.BertForSequenceClassification(config).eval()
    compiled, backend = _compiled(model)

    def outputs(m, ids, mask):
        out = m(ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1], out.logits

    _check_shapes(model, compiled, backend, config.vocab_size, outputs)
    ids, mask = _inputs(config.vocab_size, 2, 7)
    ids[0, 0] = config.vocab_size
    with torch.no_grad(), pytest.raises(RuntimeError, match="token ids must lie in"):
        compiled(ids, attention_mask=mask, output_hidden_states=True)


def test_gpt2_lm_compiles_whole_and_once():
    torch.manual_seed(0)
    model = fm.GPT2LMHeadModel(fm.GPT2Config.from_hf(tiny_gpt2_config())).eval()
    compiled, backend = _compiled(model)
    _check_shapes(
        model,
        compiled,
        backend,
        model.config.vocab_size,
        lambda m, ids, mask: (m(ids, attention_mask=mask).logits,),
        left=True,
    )
