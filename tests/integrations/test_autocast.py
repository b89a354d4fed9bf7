"""fastlm under torch.autocast: the ops give the dtypes of the PyTorch ops they replace, and
optimize()d / fastlm models train under autocast (plain, transformers' Trainer(bf16=True),
accelerate's Accelerator(mixed_precision="bf16")) within the parity rule of stock autocast:
error against the fp32 run at most twice stock autocast's, plus a few bf16 rounding steps.

CPU autocast runs bf16. The Triton interpreter gets bf16 wrong, so on a CPU the ops are
checked on the torch and reference backends; on a GPU the triton backend joins them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import reference
from tests.parity import ON_GPU, assert_parity

DEVICE = "cuda" if ON_GPU else "cpu"
LOW = torch.bfloat16
BACKENDS = ["torch", "reference", *(["triton"] if ON_GPU else [])]


def autocast():
    return torch.autocast(DEVICE, dtype=LOW)


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, requires_grad=requires_grad)


# ------------------------------------------------------------------------------- ops


def exact_attention(q, k, v, mask):
    return reference.attention.attention(q, k, v, key_padding_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_runs_in_the_autocast_dtype_like_sdpa(backend):
    q, k, v = (randn(2, 17, 2, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 17, dtype=torch.bool, device=DEVICE)
    mask[1, 11:] = False
    with autocast():
        out = fastlm.attention(q, k, v, key_padding_mask=mask, backend=backend)
        stock = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:, None, None, :]
        ).transpose(1, 2)
    assert out.dtype == stock.dtype == LOW
    oracle = exact_attention(q.double(), k.double(), v.double(), mask)
    assert_parity(out, oracle, stock, name="attention")
    (dq,) = torch.autograd.grad(out.float().square().sum(), q)
    (dq_stock,) = torch.autograd.grad(stock.float().square().sum(), q)
    assert dq.dtype == dq_stock.dtype == torch.float32  # the leaf's dtype, as autocast gives
    qd = q.detach().double().requires_grad_()
    exact = exact_attention(qd, k.double(), v.double(), mask)
    (dq_exact,) = torch.autograd.grad(exact.square().sum(), qd)
    assert_parity(dq.to(LOW), dq_exact, dq_stock.to(LOW), name="dq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen_runs_in_the_autocast_dtype(backend):
    q, k, v = (randn(9, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    with autocast():
        out = fastlm.attention_varlen(q, k, v, cu, cu, 5, 5, causal=True, backend=backend)
    assert out.dtype == LOW
    exact = reference.attention.attention_varlen(q.double(), k.double(), v.double(), cu, cu,
                                                 causal=True)  # fmt: skip
    assert_parity(out, exact, None, name="attention_varlen", atol=4 * torch.finfo(LOW).eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_runs_in_the_autocast_dtype_like_linear(backend, approximate):
    x, w, b = randn(5, 32, requires_grad=True), randn(48, 32), randn(48)
    with autocast():
        out = fastlm.linear_gelu(x, w, b, approximate=approximate, backend=backend)
        stock = F.gelu(F.linear(x, w, b), approximate=approximate)
    assert out.dtype == stock.dtype == LOW
    oracle = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate=approximate)
    assert_parity(out, oracle, stock, name="linear_gelu")
    (dx,) = torch.autograd.grad(out.float().sum(), x)
    assert dx.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_dtype", [torch.float32, LOW])
def test_gelu_ffn_residual_promotes_like_a_plus(backend, residual_dtype):
    x, w1, b1, w2, b2 = randn(5, 32), randn(48, 32), randn(48), randn(32, 48), randn(32)
    r = randn(5, 32).to(residual_dtype)
    with autocast():
        out = fastlm.gelu_ffn(x, w1, b1, w2, b2, residual=r, backend=backend)
        stock = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + r
    assert out.dtype == stock.dtype == torch.promote_types(LOW, residual_dtype)
    oracle = F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(),
                      b2.double()) + r.double()  # fmt: skip
    assert_parity(out.to(LOW), oracle, stock.to(LOW), name="gelu_ffn")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_of_mixed_residual_stream_is_layer_norm_of_the_sum(backend):
    """transformers' BERT under autocast: LayerNorm(dense(h) [bf16] + input [fp32])."""
    x, r, w, b = randn(6, 32).to(LOW), randn(6, 32), randn(32), randn(32)
    with autocast():
        y, z = fastlm.layer_norm(x, w, b, 1e-12, residual=r, backend=backend)
        z_stock = x + r
        y_stock = F.layer_norm(z_stock, (32,), w, b, 1e-12)
    assert (y.dtype, z.dtype) == (y_stock.dtype, z_stock.dtype)
    torch.testing.assert_close(z, z_stock)
    torch.testing.assert_close(y, y_stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_keeps_the_dtype_pytorch_gives(backend):
    x, w, b = randn(6, 32).to(LOW), randn(32), randn(32)
    with autocast():
        y = fastlm.layer_norm(x, w, b, backend=backend)
        stock = F.layer_norm(x, (32,), w, b)
    assert y.dtype == stock.dtype
    oracle = F.layer_norm(x.double(), (32,), w.double(), b.double())
    assert_parity(y.to(LOW), oracle, stock.to(LOW), name="layer_norm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_decode_reads_an_fp32_cache_from_autocast_queries(backend):
    k_cache, v_cache = randn(2, 8, 2, 16), randn(2, 8, 2, 16)
    q, k, v = randn(2, 1, 2, 16).to(LOW), randn(2, 1, 2, 16).to(LOW), randn(2, 1, 2, 16).to(LOW)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    with autocast():
        out = fastlm.attention_with_kvcache(q, k_cache, v_cache, lens, k=k, v=v, backend=backend)
    assert out.dtype == LOW
    torch.testing.assert_close(k_cache[0, 3], k[0, 0].float())  # appended in the cache's dtype
    scale = 16**-0.5
    exact = reference.attention_kvcache.kvcache_attention(
        q.double(), k_cache.double(), v_cache.double(), lens + 1, True, scale
    )
    assert_parity(out, exact, None, name="kvcache", atol=4 * torch.finfo(LOW).eps)


def test_outside_autocast_mixed_dtypes_are_still_refused():
    x, r, w = randn(4, 32).to(LOW), randn(4, 32), randn(32)
    with pytest.raises(TypeError, match="residual has dtype"):
        fastlm.layer_norm(x, w, w, residual=r)
    with pytest.raises(TypeError):
        fastlm.linear_gelu(randn(4, 32), randn(8, 32).to(LOW), None)


# ---------------------------------------------------------------------------- models

transformers = pytest.importorskip("transformers")
from tests.models.util import tiny_bert_config, tiny_gpt2_config  # noqa: E402


def _bert_classifier():
    torch.manual_seed(0)
    cfg = tiny_bert_config(num_labels=3, initializer_range=0.2)
    return transformers.BertForSequenceClassification(cfg).to(DEVICE)


def _gpt2_lm():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(tiny_gpt2_config(initializer_range=0.2)).to(DEVICE)


def _batch(vocab, padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    if padded:
        mask[1, 9:] = 0
        mask[2, 5:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _step(model, ids, mask, labels, amp: bool):
    """loss, logits and parameter gradients of one training step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=LOW, enabled=amp):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _assert_within_autocast_rule(name, got, stock, exact, steps=8.0):
    err = (got.double() - exact.double()).abs().max().item()
    base = (stock.double() - exact.double()).abs().max().item()
    floor = steps * torch.finfo(LOW).eps * max(exact.double().abs().max().item(), 1e-3)
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x {base:.3e} + {floor:.3e}"


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize(
    "family", ["bert-optimize", "gpt2-optimize", "bert-fastlm-model", "gpt2-fastlm-model"]
)
def test_training_step_under_autocast_matches_stock_autocast(family, padded):
    arch, how = family.split("-", 1)
    make = _bert_classifier if arch == "bert" else _gpt2_lm
    stock = make()
    if how == "optimize":
        ours = fastlm.optimize(copy.deepcopy(stock))
    else:
        cls = {"bert": fastlm.models.BertForSequenceClassification,
               "gpt2": fastlm.models.GPT2LMHeadModel}[arch]  # fmt: skip
        ours = cls.from_hf(copy.deepcopy(stock)).to(DEVICE)
    stock.train(), ours.train()
    ids, mask = _batch(stock.config.vocab_size, padded)
    if arch == "bert":
        labels = torch.tensor([0, 2, 1], device=DEVICE)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    exact_loss, exact_logits, exact_grads = _step(stock, ids, mask, labels, amp=False)
    stock_loss, stock_logits, stock_grads = _step(stock, ids, mask, labels, amp=True)
    loss, logits, grads = _step(ours, ids, mask, labels, amp=True)
    assert logits.dtype == stock_logits.dtype
    valid = (mask == 1) if arch == "gpt2" else slice(None)
    _assert_within_autocast_rule("loss", loss, stock_loss, exact_loss)
    _assert_within_autocast_rule("logits", logits[valid], stock_logits[valid], exact_logits[valid])
    assert grads.keys() == exact_grads.keys()
    for name in exact_grads:
        assert grads[name].dtype == exact_grads[name].dtype, name
        _assert_within_autocast_rule(name, grads[name], stock_grads[name], exact_grads[name])


# ------------------------------------------------------------ Trainer and Accelerator


def _examples(vocab: int, n: int = 12):
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        length = 4 + (5 * i) % 9
        ids = torch.randint(1, vocab, (13,), generator=g)
        mask = (torch.arange(13) < length).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor(i % 3)})
    return out


def _assert_losses_within_rule(losses, stock, exact):
    assert len(losses) == len(stock) == len(exact) > 0
    for step, (a, s, e) in enumerate(zip(losses, stock, exact)):
        _assert_within_autocast_rule(f"loss at step {step}", torch.tensor(a), torch.tensor(s),
                                     torch.tensor(e), steps=16.0)  # fmt: skip


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (precision included); each run sets its own."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


def _trainer_losses(model, bf16: bool, tmp_path) -> list[float]:
    pytest.importorskip("accelerate.state").AcceleratorState._reset_state(reset_partial_state=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        bf16=bf16, use_cpu=not ON_GPU, report_to=[], logging_steps=1, save_strategy="no",
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    examples = _examples(model.config.vocab_size)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_bf16_trains_an_optimized_bert_like_stock(tmp_path, fresh_accelerate_state):
    exact = _trainer_losses(_bert_classifier(), False, tmp_path / "fp32")
    stock = _trainer_losses(_bert_classifier(), True, tmp_path / "stock")
    ours = _trainer_losses(fastlm.optimize(_bert_classifier()), True, tmp_path / "fastlm")
    _assert_losses_within_rule(ours, stock, exact)


def _accelerator_losses(model, mixed_precision: str) -> list[float]:
    accelerate = pytest.importorskip("accelerate")
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(mixed_precision=mixed_precision, cpu=not ON_GPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_examples(model.config.vocab_size), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_accelerator_bf16_trains_an_optimized_bert_like_stock(fresh_accelerate_state):
    exact = _accelerator_losses(_bert_classifier(), "no")
    stock = _accelerator_losses(_bert_classifier(), "bf16")
    ours = _accelerator_losses(fastlm.optimize(_bert_classifier()), "bf16")
    _assert_losses_within_rule(ours, stock, exact)
