"""Distributed training: an optimize()d transformers model and fastlm's own models under
DistributedDataParallel and FSDP2 (``fully_shard``), 2 ranks over gloo on CPU, against one
process training the same model on the concatenated batch.

Each rank trains on its half of a global batch of 4; DDP and FSDP2 average the gradients
over the ranks, which is the gradient of the global mean loss because every rank's loss
averages the same number of terms (2 sequences; 10 next-token targets). Per step the test
compares the mean of the ranks' losses, every parameter's gradient (the first step; FSDP2's
sharded ones gathered), an eval-mode forward taken before each step (inference between
updates, where a weight read from anything but the live parameter would show), and every
parameter after 3 SGD-with-momentum steps. fp32, dropout 0. FSDP2's version-preserving write
into gathered parameters, which only sometimes lands at the same address here, is
reproduced deterministically by test_fused_qkv_weight_is_rederived_under_a_process_group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

if not torch.distributed.is_available():
    pytest.skip("this torch is built without torch.distributed", allow_module_level=True)

from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import fastlm
import fastlm.models as fm
from tests.integrations.ranks import run_ranks
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers

WORLD = 2
STEPS = 3


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]  # the un-wrapped model, same weights on every call
    layers: Callable[[nn.Module], nn.ModuleList]  # what FSDP2 shards one by one
    batch: Callable[[], dict]  # the global batch: the ranks take equal row slices


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make()

    return build


def _classification_batch():
    torch.manual_seed(1)
    ids, mask = padded_batch(61, [8, 3, 5, 8], 8)  # padding on both ranks
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1, 2]))


def _lm_batch():
    torch.manual_seed(1)
    # 10 next-token targets per rank (7 + 3, 5 + 5): the ranks' mean losses average equally.
    ids, mask = padded_batch(97, [8, 4, 6, 6], 8)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


CASES = {
    "hf-bert-optimized": Case(
        _seeded(lambda: fastlm.optimize(
            transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3))
        )),
        lambda m: m.bert.encoder.layer, _classification_batch,
    ),
    "hf-gpt2-optimized": Case(
        _seeded(lambda: fastlm.optimize(transformers.GPT2LMHeadModel(tiny_gpt2_config()))),
        lambda m: m.transformer.h, _lm_batch,
    ),
    "fastlm-bert": Case(
        _seeded(lambda: fm.BertForSequenceClassification(
            fm.BertConfig.from_hf(tiny_bert_config(num_labels=3))
        )),
        lambda m: m.bert.encoder.layer, _classification_batch,
    ),
    "fastlm-gpt2": Case(
        _seeded(lambda: fm.GPT2LMHeadModel(fm.GPT2Config.from_hf(tiny_gpt2_config()))),
        lambda m: m.transformer.h, _lm_batch,
    ),
}  # fmt: skip


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2's sharded parameters and gradients are gathered (a collective)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train(model: nn.Module, params: nn.Module, batch: dict) -> dict:
    """STEPS steps of SGD with momentum on ``batch``. ``model`` is what runs (maybe wrapped),
    ``params`` the module whose named parameters are reported (DDP's inner module)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    record = {"loss": [], "eval": []}
    for step in range(STEPS):
        model.eval()
        with torch.no_grad():
            record["eval"].append(model(**batch).logits.detach().clone())
        model.train()
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:  # None: no gradient reached that parameter
            record["grad"] = {
                n: None if p.grad is None else _full(p.grad) for n, p in params.named_parameters()
            }
        opt.step()
        record["loss"].append(loss.detach().clone())
    record["param"] = {n: _full(p) for n, p in params.named_parameters()}
    return record


def _rank_train(case: Case, wrapper: str, rank: int, world: int) -> dict:
    model = case.build()
    rows = slice(rank * 2, rank * 2 + 2)
    batch = {k: v[rows] for k, v in case.batch().items()}
    if wrapper == "ddp":
        return _train(DistributedDataParallel(model), model, batch)
    for layer in case.layers(model):
        fully_shard(layer)
    fully_shard(model)
    return _train(model, model, batch)


@pytest.fixture
def backend(request):
    """fastlm's backend for the single process and the ranks (forked: they inherit it)."""
    fastlm.set_backend(request.param)
    yield request.param
    fastlm.set_backend(None)


# auto: PyTorch's composite ops (the CPU default); reference: fastlm's torch.library custom
# ops with their registered autograd, under DDP's hooks and FSDP2's gathered parameters.
@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"], indirect=True)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_as_one_process(tmp_path, name, wrapper, backend):
    case = CASES[name]
    single = case.build()
    want = _train(single, single, case.batch())
    ranks = run_ranks(lambda rank, world: _rank_train(case, wrapper, rank, world), tmp_path, WORLD)

    tight = dict(atol=1e-6, rtol=1e-5)  # fp32; only the order of the sums differs
    got_loss = torch.stack([torch.stack(r["loss"]) for r in ranks]).mean(0)
    torch.testing.assert_close(got_loss, torch.stack(want["loss"]), **tight)
    assert want["loss"][-1] < want["loss"][0]  # it trains
    for rank, got in enumerate(ranks):
        for step in range(STEPS):
            torch.testing.assert_close(
                got["eval"][step], want["eval"][step][rank * 2 : rank * 2 + 2], **tight,
                msg=lambda m, r=rank, s=step: f"rank {r} eval before step {s}: {m}",
            )  # fmt: skip
        for kind in ("grad", "param"):
            assert got[kind].keys() == want[kind].keys()
            for n, t in got[kind].items():
                assert t is not None, f"rank {rank}: no gradient reached {n}"
                torch.testing.assert_close(
                    t, want[kind][n], **tight, msg=lambda m, r=rank, k=kind, n=n: f"rank {r} {k} {n}: {m}"
                )  # fmt: skip


def _logits_after_hidden_write(rank: int, world: int) -> torch.Tensor:
    """fastlm BERT's fused-QKV cache against the write FSDP2 makes before every forward: new
    values in the same parameter, same storage, version counter preserved."""
    case = CASES["fastlm-bert"]
    model, batch = case.build().eval(), case.batch()
    with torch.no_grad():
        model(**batch)  # an inference forward derives (and may cache) the fused QKV weight
        w = model.bert.encoder.layer[0].attention.self.value.weight
        with torch.autograd._unsafe_preserve_version_counter(w):
            w.mul_(-2.0)
        return model(**batch).logits


def test_fused_qkv_weight_is_rederived_under_a_process_group(tmp_path):
    case = CASES["fastlm-bert"]
    want = case.build().eval()
    with torch.no_grad():
        want.bert.encoder.layer[0].attention.self.value.weight.mul_(-2.0)
        want = want(**case.batch()).logits
    (got,) = run_ranks(_logits_after_hidden_write, tmp_path, world_size=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _rank_1_hangs(rank: int, world: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_a_hung_rank_fails_the_test_and_is_killed(tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not finish in 3 s"):
        run_ranks(_rank_1_hangs, tmp_path, WORLD, timeout=3)
    assert time.monotonic() - start < 30


def _revert_after_fully_shard(rank: int, world: int) -> str:
    model = CASES["hf-bert-optimized"].build()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    with pytest.raises(NotImplementedError, match="FSDPFastLMBertLayer"):
        fastlm.revert(model)
    return type(model.bert.encoder.layer[0]).__name__


def test_revert_refuses_layers_fully_shard_wrapped(tmp_path):
    # Setting the class back would drop FSDP2's FSDP<class> (its unshard/reshard methods).
    (kept,) = run_ranks(_revert_after_fully_shard, tmp_path, world_size=1)
    assert kept == "FSDPFastLMBertLayer"
