"""Training: loss parity with transformers over AdamW steps (dropout off), dropout honoured.
Distributed training (DDP, FSDP2): tests/integrations/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

import fastlm.models as fm
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers


def _train(model, batches, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for i in range(steps):
        ids, mask, labels = batches[i % len(batches)]
        loss = model(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_three_adamw_steps_match_transformers(arch):
    if arch == "bert":
        hf = transformers.BertForMaskedLM(tiny_bert_config()).train()
        ours = fm.BertForMaskedLM.from_hf(hf)
        ids, mask = padded_batch(61, [8, 5], 8)
    else:
        hf = transformers.GPT2LMHeadModel(tiny_gpt2_config()).train()
        ours = fm.GPT2LMHeadModel.from_hf(hf)
        ids, mask = padded_batch(97, [8, 5], 8)
    labels = ids.masked_fill(mask == 0, -100)
    batches = [(ids, mask, labels)]
    ref, got = _train(hf, batches), _train(ours, batches)
    assert ref[0] > ref[-1]  # it trains
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-4)


def test_dropout_active_in_train_off_in_eval():
    ours = fm.GPT2LMHeadModel(
        fm.GPT2Config.from_hf(tiny_gpt2_config(attn_pdrop=0.3, resid_pdrop=0.3, embd_pdrop=0.3))
    )
    ids = torch.randint(0, 97, (2, 6))
    ours.train()
    a, b = ours(ids).logits, ours(ids).logits
    assert not torch.allclose(a, b)
    a.sum().backward()
    assert ours.transformer.h[0].attn.c_attn.weight.grad is not None
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ours(ids).logits)
