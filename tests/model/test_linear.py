"""The model's Linear computes x Wᵀ + b whichever product it picks for the row count."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.model.linear import FEW_ROWS, Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (3, 5, 24), (FEW_ROWS, 24), (FEW_ROWS + 1, 24), (0, 24)])
def test_linear_equals_the_formula_for_any_row_count(shape, bias):
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    y = layer(x)
    ref = x @ layer.weight.t() + (layer.bias if bias else 0)
    assert y.shape == (*shape[:-1], 40) and y.is_contiguous()
    assert y._base is None  # a tensor of its own, as F.linear returns: LoRA adds into it in place
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight), g)
    want = torch.autograd.grad(F.linear(x, layer.weight, layer.bias), (x, layer.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_linear_keeps_nn_linear_parameters_and_state_dict():
    a, b = torch.nn.Linear(8, 4), Linear(8, 4)
    assert isinstance(b, torch.nn.Linear) and a.state_dict().keys() == b.state_dict().keys()
