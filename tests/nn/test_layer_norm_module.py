import pytest
import torch

import fastlm.nn as fnn


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_loads_torch_state_dict(backend, device):
    ref = torch.nn.LayerNorm(384, eps=1e-12).to(device)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = fnn.LayerNorm(384, eps=1e-12, backend=backend).to(device)
    mine.load_state_dict(ref.state_dict())
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 7, 384, device=device)
    torch.testing.assert_close(mine(x), ref(x))


def test_from_torch_shares_parameters(device):
    ref = torch.nn.LayerNorm(64).to(device)
    mine = fnn.LayerNorm.from_torch(ref, backend="triton")
    assert mine.weight is ref.weight and mine.bias is ref.bias
    x, r = torch.randn(2, 64, device=device), torch.randn(2, 64, device=device)
    y, z = mine(x, residual=r)
    torch.testing.assert_close(z, x + r)
    torch.testing.assert_close(y, ref(x + r))


def test_multi_dim_normalized_shape_rejected():
    with pytest.raises(NotImplementedError, match="last dimension"):
        fnn.LayerNorm((4, 8))


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
def test_input_width_must_match_normalized_shape(affine):
    # Without affine parameters nothing else ties the width to the module: a width-5 input
    # was normalised by LayerNorm(8) without complaint.
    ln = fnn.LayerNorm(8, elementwise_affine=affine, backend="torch")
    with pytest.raises(ValueError, match=r"normalized_shape is \(8,\).*last dimension is 5"):
        ln(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"normalized_shape is \(8,\).*last dimension is 5"):
        ln(torch.randn(2, 5), residual=torch.randn(2, 5))
