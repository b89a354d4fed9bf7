"""fastlm.unpad_input / fastlm.pad_input: values, metadata, gradients, compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

import fastlm

# (batch, seq) masks as lists of token flags: right padding, left padding, holes, full,
# an all-padding row, batch 1.
MASKS = {
    "right": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
    "left": [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
    "holes": [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [1, 1, 0, 1, 1]],
    "full": [[1] * 17, [1] * 17],
    "empty-row": [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
    "batch1": [[1] * 7 + [0] * 2],
}
FEATURES = {"hidden": (6,), "heads": (3, 4)}
# Plain torch memory moves: bf16 is exact on CPU too (no Triton interpreter involved).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _expected(hidden, mask_list):
    """Loop oracle: tokens in row-major order, their flat indices, per-row counts."""
    rows, idx, lens = [], [], []
    seq = len(mask_list[0])
    for b, row in enumerate(mask_list):
        lens.append(sum(1 for t in row if t))
        for s, t in enumerate(row):
            if t:
                rows.append(hidden[b, s])
                idx.append(b * seq + s)
    packed = torch.stack(rows) if rows else hidden.new_zeros((0, *hidden.shape[2:]))
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return packed, idx, cu, max(lens)


@pytest.mark.parametrize("feat", list(FEATURES), ids=list(FEATURES))
@pytest.mark.parametrize("mask_kind", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_unpad_pad_round_trip(mask_kind, mask_dtype, feat, dtype, device):
    mask_list = MASKS[mask_kind]
    bsz, seq = len(mask_list), len(mask_list[0])
    hidden = torch.randn(bsz, seq, *FEATURES[feat], device=device).to(dtype)
    mask = torch.tensor(mask_list, device=device).to(mask_dtype)

    packed, indices, cu, max_len = fastlm.unpad_input(hidden, mask)
    want_packed, want_idx, want_cu, want_max = _expected(hidden, mask_list)
    assert packed.dtype == dtype and indices.dtype == torch.int64 and cu.dtype == torch.int32
    torch.testing.assert_close(packed, want_packed, rtol=0, atol=0)
    assert indices.tolist() == want_idx
    assert cu.tolist() == want_cu
    assert isinstance(max_len, int) and max_len == want_max

    padded = fastlm.pad_input(packed, indices, bsz, seq)
    keep = mask.bool().view(bsz, seq, *([1] * len(FEATURES[feat])))
    torch.testing.assert_close(
        padded, torch.where(keep, hidden, torch.zeros_like(hidden)), rtol=0, atol=0
    )


def test_gradients(device):
    mask = torch.tensor(MASKS["holes"], device=device).bool()
    hidden = torch.randn(3, 5, 6, device=device, requires_grad=True)
    packed, indices, _, _ = fastlm.unpad_input(hidden, mask)
    g_packed = torch.randn_like(packed)
    (g_hidden,) = torch.autograd.grad(packed, hidden, g_packed)
    # unpad's gradient scatters back to the token positions, zeros at padding.
    want = torch.zeros(15, 6, device=device)
    want[indices] = g_packed
    torch.testing.assert_close(g_hidden, want.view(3, 5, 6), rtol=0, atol=0)

    src = packed.detach().clone().requires_grad_()
    padded = fastlm.pad_input(src, indices, 3, 5)
    g_padded = torch.randn_like(padded)
    (g_src,) = torch.autograd.grad(padded, src, g_padded)
    # pad's gradient gathers the token positions.
    torch.testing.assert_close(g_src, g_padded.flatten(0, 1)[indices], rtol=0, atol=0)


def test_non_contiguous_hidden(device):
    base = torch.randn(5, 3, 8, device=device)
    hidden = base.transpose(0, 1)[:, :, ::2]  # (3, 5, 4), strided everywhere
    mask = torch.tensor(MASKS["left"], device=device)
    packed, indices, _, _ = fastlm.unpad_input(hidden, mask)
    torch.testing.assert_close(packed, _expected(hidden, MASKS["left"])[0], rtol=0, atol=0)
    torch.testing.assert_close(fastlm.pad_input(packed, indices, 3, 5)[mask.bool()], packed)


def test_torch_compile_fullgraph(device):
    mask = torch.tensor(MASKS["right"], device=device).bool()
    hidden = torch.randn(3, 5, 6, device=device)

    def round_trip(hidden, mask):
        packed, indices, cu, max_len = fastlm.unpad_input(hidden, mask)
        return fastlm.pad_input(packed * 2, indices, hidden.shape[0], hidden.shape[1]), cu, max_len

    # unpad has a data-dependent size and a python-int max_seqlen: these flags capture both.
    with torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True
    ):
        out, cu, max_len = torch.compile(round_trip, fullgraph=True, backend="aot_eager")(
            hidden, mask
        )
    torch.testing.assert_close(out, round_trip(hidden, mask)[0])
    assert cu.tolist() == [0, 3, 8, 9] and int(max_len) == 5

    packed, indices, _, _ = fastlm.unpad_input(hidden, mask)
    pad = torch.compile(fastlm.pad_input, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(pad(packed, indices, 3, 5), fastlm.pad_input(packed, indices, 3, 5))


BAD_UNPAD = [
    ("float-mask", lambda h, m: (h, m.float()), TypeError, "bool or an integer dtype"),
    ("mask-shape", lambda h, m: (h, m[:, :3]), ValueError, "attention_mask must have shape"),
    ("hidden-1d", lambda h, m: (h[0, 0], m), ValueError, r"hidden must be \(batch, seq"),
    (
        "not-tensor",
        lambda h, m: (h, m.tolist()),
        TypeError,
        "attention_mask must be a torch.Tensor",
    ),
]


@pytest.mark.parametrize(
    "change,exc,match", [b[1:] for b in BAD_UNPAD], ids=[b[0] for b in BAD_UNPAD]
)
def test_unpad_bad_inputs(change, exc, match, device):
    hidden = torch.randn(3, 5, 6, device=device)
    mask = torch.tensor(MASKS["right"], device=device)
    with pytest.raises(exc, match=match):
        fastlm.unpad_input(*change(hidden, mask))


BAD_PAD = [
    ("float-indices", lambda p, i: (p, i.float(), 3, 5), TypeError, "indices must be int64"),
    ("indices-length", lambda p, i: (p, i[:-1], 3, 5), ValueError, "indices must have shape"),
    ("negative-batch", lambda p, i: (p, i, -1, 5), ValueError, "batch must be a non-negative int"),
    ("float-seqlen", lambda p, i: (p, i, 3, 5.0), ValueError, "seqlen must be a non-negative int"),
    ("scalar-packed", lambda p, i: (p[0, 0], i, 3, 5), ValueError, "packed must be"),
]


@pytest.mark.parametrize("change,exc,match", [b[1:] for b in BAD_PAD], ids=[b[0] for b in BAD_PAD])
def test_pad_bad_inputs(change, exc, match, device):
    packed, indices, _, _ = fastlm.unpad_input(
        torch.randn(3, 5, 6, device=device), torch.tensor(MASKS["right"], device=device)
    )
    with pytest.raises(exc, match=match):
        fastlm.pad_input(*change(packed, indices))


@pytest.mark.parametrize("bad", [15, -1, -15], ids=["past-end", "negative", "negative-wraps-to-0"])
def test_pad_index_outside_the_slots_raises(bad):
    # -1 and -15 were taken from the end by torch indexing: a silent write to a wrong slot.
    # A value check, so on CPU tensors (on a GPU it is a device-side assert, not catchable).
    packed = torch.randn(2, 4)
    with pytest.raises(
        ValueError, match=rf"indices must lie in \[0, batch \* seqlen = 15\), got {bad}"
    ):
        fastlm.pad_input(packed, torch.tensor([0, bad]), 3, 5)


def test_compiled_pad_index_check_is_a_device_assert():
    # Traced, the check is torch._assert_async (no graph break, no host sync); on CPU it
    # raises at once.
    pad = torch.compile(fastlm.pad_input, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="indices outside"):
        pad(torch.randn(2, 4), torch.tensor([0, -1]), 3, 5)
