"""Training: loss parity with transformers over AdamW steps (dropout off), dropout honoured,
and a 2-rank DistributedDataParallel smoke test on CPU (gloo)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))  # fmt: skip
    try:
        torch.manual_seed(rank)
        model = fm.GPT2LMHeadModel(fm.GPT2Config(**state["config"]))
        model.load_state_dict(state["weights"])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        ids = torch.randint(0, 97, (2, 6))  # different data per rank
        ddp(ids, labels=ids).loss.backward()
        opt.step()
        results[rank] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_one_step_identical_weights():
    cfg = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
    model = fm.GPT2LMHeadModel(fm.GPT2Config(**cfg))
    state = {"config": cfg, "weights": model.state_dict()}
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), state, results), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
        deadline = 120
        import time

        t0 = time.time()
        while not ctx.join(timeout=5):
            if time.time() - t0 > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("DDP workers did not finish in time")
        r0, r1 = results[0], results[1]
    assert any(not torch.equal(r0[k], state["weights"][k]) for k in r0)  # the step changed weights
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
