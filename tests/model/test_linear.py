"""The model's Linear computes x Wᵀ + b whichever product it picks for the row count."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.model.linear import FEW_ROWS, Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (1, 1), (2,), (3, 5), (FEW_ROWS,), (FEW_ROWS + 1,), (0,)])
@pytest.mark.parametrize("dims", [(24, 40), (40, 24)], ids=["wide", "narrow"])
def test_linear_equals_the_formula_for_any_row_count(rows, dims, bias):
    torch.manual_seed(0)
    d_in, d_out = dims
    layer = Linear(d_in, d_out, bias=bias)
    x = torch.randn(*rows, d_in, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    y = layer(x)
    ref = x @ layer.weight.t() + (layer.bias if bias else 0)
    assert y.shape == (*rows, d_out) and y.is_contiguous()
    # a tensor of its own wherever F.linear returns one (LoRA adds into the result in place)
    assert y._base is None or F.linear(x, layer.weight, layer.bias)._base is not None
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight), g)
    want = torch.autograd.grad(F.linear(x, layer.weight, layer.bias), (x, layer.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_linear_keeps_nn_linear_parameters_and_state_dict():
    a, b = torch.nn.Linear(8, 4), Linear(8, 4)
    assert isinstance(b, torch.nn.Linear) and a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("rows", [(1,), (3,), (2, 7), (FEW_ROWS + 1,)])
def test_linear_without_row_major_output_gives_the_same_values(rows):
    """The few-row result left transposed in memory: same values, and the next Linear takes it as it is."""
    torch.manual_seed(0)
    first, second = Linear(24, 40).double(), Linear(40, 8).double()
    x = torch.randn(*rows, 24, dtype=torch.float64)
    ref = first(x)
    first.row_major_output = False
    y = first(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(second(torch.relu(y)), second(torch.relu(ref)))
