"""Every BERT and GPT-2 head against transformers on a padded batch: outputs (valid
positions), loss, every parameter's gradient and output_hidden_states, on the torch backend,
and on the triton backend for the heads that drive the backbone differently (tiny random
configs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import fastlm.models as fm
import fastlm.ops.linear as linear_module
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers

BATCH_LENGTHS, SEQ = [7, 4, 2], 7


def _token_labels(num: int):
    def make(ids, mask):
        return {"labels": torch.randint(0, num, ids.shape).masked_fill(mask == 0, -100)}

    return make


def _mlm_labels(ids, mask):
    # Predict a random half of the valid tokens (the rest ignored, as a real MLM batch).
    keep = (torch.rand(ids.shape) < 0.5) & mask.bool()
    return {"labels": ids.masked_fill(~keep, -100)}


@dataclass
class Case:
    hf: str
    ours: type
    config: dict = field(default_factory=dict)
    targets: Callable = lambda ids, mask: {}
    gpt2: bool = False
    left_pad: bool = False
    choices: int = 0  # multiple choice: (B, C, S) inputs
    # The loss reads padded positions in transformers (QA's softmax over every position):
    # its loss and gradients are compared on an unpadded batch.
    loss_reads_padding: bool = False


CASES = {
    "BertForPreTraining": Case(
        "BertForPreTraining",
        fm.BertForPreTraining,
        targets=lambda ids, mask: {
            **_mlm_labels(ids, mask),
            "next_sentence_label": torch.randint(0, 2, ids.shape[:1]),
        },
    ),
    "BertForNextSentencePrediction": Case(
        "BertForNextSentencePrediction",
        fm.BertForNextSentencePrediction,
        targets=lambda ids, mask: {"labels": torch.randint(0, 2, ids.shape[:1])},
    ),
    "BertForMaskedLM": Case("BertForMaskedLM", fm.BertForMaskedLM, targets=_mlm_labels),
    "BertForSequenceClassification-regression": Case(
        "BertForSequenceClassification",
        fm.BertForSequenceClassification,
        {"num_labels": 1},
        lambda ids, mask: {"labels": torch.randn(ids.shape[0])},
    ),
    "BertForSequenceClassification-single_label": Case(
        "BertForSequenceClassification",
        fm.BertForSequenceClassification,
        {"num_labels": 3},
        lambda ids, mask: {"labels": torch.randint(0, 3, ids.shape[:1])},
    ),
    "BertForSequenceClassification-multi_label": Case(
        "BertForSequenceClassification",
        fm.BertForSequenceClassification,
        {"num_labels": 3},
        lambda ids, mask: {"labels": torch.randint(0, 2, (ids.shape[0], 3)).float()},
    ),
    "BertForTokenClassification": Case(
        "BertForTokenClassification",
        fm.BertForTokenClassification,
        {"num_labels": 5},
        _token_labels(5),
    ),
    "BertForQuestionAnswering": Case(
        "BertForQuestionAnswering",
        fm.BertForQuestionAnswering,
        targets=lambda ids, mask: {
            "start_positions": torch.tensor([1, 0, 9])[: ids.shape[0]],  # 9: outside, ignored
            "end_positions": torch.tensor([3, 2, 1])[: ids.shape[0]],
        },
        loss_reads_padding=True,
    ),
    "BertForMultipleChoice": Case(
        "BertForMultipleChoice",
        fm.BertForMultipleChoice,
        targets=lambda ids, mask: {"labels": torch.randint(0, 3, ids.shape[:1])},
        choices=3,
    ),
    "GPT2LMHeadModel": Case(
        "GPT2LMHeadModel",
        fm.GPT2LMHeadModel,
        targets=lambda ids, mask: {"labels": ids.masked_fill(mask == 0, -100)},
        gpt2=True,
        left_pad=True,
    ),
    "GPT2ForSequenceClassification": Case(
        "GPT2ForSequenceClassification",
        fm.GPT2ForSequenceClassification,
        {"num_labels": 3, "pad_token_id": 0},
        lambda ids, mask: {"labels": torch.randint(0, 3, ids.shape[:1])},
        gpt2=True,
    ),
    "GPT2ForTokenClassification": Case(
        "GPT2ForTokenClassification",
        fm.GPT2ForTokenClassification,
        {"num_labels": 4, "classifier_dropout": 0.0},
        _token_labels(4),
        gpt2=True,
    ),
}


def _batch(case: Case, lengths):
    vocab = 97 if case.gpt2 else 61
    rows = lengths * case.choices if case.choices else lengths
    ids, mask = padded_batch(vocab, rows, SEQ, left=case.left_pad)
    ids = ids.masked_fill(mask == 0, 0)  # padding holds the pad token (GPT-2 cls reads it)
    if case.choices:
        ids = ids.view(len(lengths), case.choices, SEQ)
        mask = mask.view(len(lengths), case.choices, SEQ)
    return ids, mask


def _models(case: Case, backend: str, dtype: torch.dtype = torch.float32):
    cfg = (tiny_gpt2_config if case.gpt2 else tiny_bert_config)(**case.config)
    hf = getattr(transformers, case.hf)(cfg).to(dtype)
    hf.train()  # dropout is 0: train() = grads as trained
    return hf, case.ours.from_hf(hf, backend=backend)


def _compare_outputs(got, ref, mask, where: str):
    valid = mask.bool()
    for name, t in got.items():
        if name in ("loss", "hidden_states", "past_key_values"):
            continue
        r = getattr(ref, name)
        if t.shape[: valid.dim()] == valid.shape:  # per-token output: valid positions only
            t, r = t[valid], r[valid]
        torch.testing.assert_close(
            t, r, atol=3e-5, rtol=1e-4, msg=lambda m, n=name: f"{where} {n}: {m}"
        )


def _compare_grads(hf, ours, where: str):
    hp, op = dict(hf.named_parameters()), dict(ours.named_parameters())
    assert set(hp) == set(op), f"{where}: parameter names differ"
    checked = 0
    for name, p in hp.items():
        if p.grad is None:
            assert op[name].grad is None, f"{where} {name}: fastlm has a gradient, HF none"
            continue
        torch.testing.assert_close(
            op[name].grad, p.grad, atol=5e-5, rtol=1e-3, msg=lambda m, n=name: f"{where} {n}: {m}"
        )
        checked += 1
    assert checked > 0


# The heads differ above the backbone only, and the backbone is the same on either backend:
# the triton backend runs on the cases that drive the backbone differently (both BERT
# pre-training heads with the pooler, 3-D multiple-choice input, QA's second unpadded batch,
# GPT-2 left-padded); every case runs on torch. The interpreter takes 3-9 s per case.
TRITON_CASES = ("BertForPreTraining", "BertForMultipleChoice", "BertForQuestionAnswering",
                "GPT2LMHeadModel")  # fmt: skip


@pytest.mark.parametrize(
    "name, backend", [(n, "torch") for n in CASES] + [(n, "triton") for n in TRITON_CASES]
)
def test_head_matches_transformers(name, backend):
    case = CASES[name]
    torch.manual_seed(0)
    hf, ours = _models(case, backend)
    ids, mask = _batch(case, BATCH_LENGTHS)
    targets = case.targets(ids, mask)
    kw = dict(attention_mask=mask, output_hidden_states=True, **targets)
    ref, got = hf(ids, **kw), ours(ids, **kw)
    assert type(got).__name__.endswith("Output")
    _compare_outputs(got, ref, mask, f"{name}[{backend}]")

    # output_hidden_states: L + 1 tensors, equal on valid positions.
    flat_mask = mask.reshape(-1, SEQ).bool()
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for i, (g, r) in enumerate(zip(got.hidden_states, ref.hidden_states)):
        torch.testing.assert_close(
            g[flat_mask], r[flat_mask], atol=3e-5, rtol=1e-4, msg=lambda m, i=i: f"hidden {i}: {m}"
        )

    if case.loss_reads_padding:  # loss and gradients on a batch without padding
        ids, mask = _batch(case, [SEQ] * len(BATCH_LENGTHS))
        targets = case.targets(ids, mask)
        ref = hf(ids, attention_mask=mask, **targets)
        got = ours(ids, attention_mask=mask, **targets)
    assert got.loss is not None and got.loss.dim() == 0
    torch.testing.assert_close(got.loss, ref.loss, atol=3e-5, rtol=1e-4)
    ref.loss.backward()
    got.loss.backward()
    _compare_grads(hf, ours, f"{name}[{backend}]")


def test_heads_run_unpadded_through_varlen(monkeypatch):
    """Token heads read BertModel's packed run: padded positions are never computed, so the
    backbone output there is zero whatever the padding tokens are."""
    import fastlm.nn.attention_layouts as layouts

    calls = []
    real = layouts.attention_varlen
    monkeypatch.setattr(
        layouts, "attention_varlen", lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k)
    )
    case = CASES["BertForTokenClassification"]
    _, ours = _models(case, "torch")
    ids, mask = _batch(case, BATCH_LENGTHS)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert calls and all(t == sum(BATCH_LENGTHS) for t in calls)  # packed tokens only
    assert (out.hidden_states[-1][~mask.bool()] == 0).all()


def test_gpt2_sequence_classification_without_pad_token():
    hf, ours = _models(
        Case("GPT2ForSequenceClassification", fm.GPT2ForSequenceClassification, gpt2=True), "torch"
    )
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match=r"need config\.pad_token_id"):
        ours(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:1]).logits, hf(ids[:1]).logits, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_every_product_runs_through_the_linear_op(name, monkeypatch):
    """Each product of a fastlm.models model (fused q/k/v, attention output, FFN, pooler,
    heads) is computed by fastlm.ops.linear: pinned to its widened form, a bf16 forward on
    CPU hands the BLAS fp32 operands only, and matches transformers in bf16."""
    monkeypatch.setattr(linear_module, "MEASURED_WEIGHT", 1)
    monkeypatch.setattr(linear_module, "HALF_FORM", "widened")
    monkeypatch.setattr(linear_module, "FORM", "linear")  # its fp32 product: F.linear, seen
    case = CASES[name]
    torch.manual_seed(0)
    hf, ours = _models(case, "torch", torch.bfloat16)
    hf.eval()
    ours.eval()
    ids, mask = _batch(case, BATCH_LENGTHS)
    gemm_dtypes = []
    real = F.linear

    def recording(x, *args, **kwargs):
        gemm_dtypes.append(x.dtype)
        return real(x, *args, **kwargs)

    with torch.no_grad():
        want = hf(ids, attention_mask=mask)[0]
        monkeypatch.setattr(F, "linear", recording)
        got = ours(ids, attention_mask=mask)[0]
    assert gemm_dtypes and set(gemm_dtypes) == {torch.float32}
    assert got.dtype == torch.bfloat16
    if got.shape[: mask.dim()] == mask.shape:  # per-token output: valid positions only
        got, want = got[mask.bool()], want[mask.bool()]
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)
