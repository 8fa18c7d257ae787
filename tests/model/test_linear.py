"""The model's Linear computes x Wᵀ + b whichever product it picks, and picks by measurement."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.model import linear
from llmlab.model.linear import FEW_ROWS, WAYS, Linear


@pytest.fixture
def choice():
    """PRODUCT_CHOICE emptied for the test and restored after it (other tests keep their measured choices)."""
    saved = dict(linear.PRODUCT_CHOICE)
    linear.PRODUCT_CHOICE.clear()
    yield linear.PRODUCT_CHOICE
    linear.PRODUCT_CHOICE.clear()
    linear.PRODUCT_CHOICE.update(saved)


def _pin(choice, layer, rows, way, dtype=torch.float64):
    choice[(dtype, layer.out_features, layer.in_features, layer.bias is not None, linear._row_bucket(rows),
            layer.row_major_output)] = way


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (1, 1), (2,), (3, 5), (FEW_ROWS,), (FEW_ROWS + 1,), (0,)])
@pytest.mark.parametrize("dims", [(24, 40), (40, 24)], ids=["wide", "narrow"])
def test_every_product_equals_the_formula_for_any_row_count(choice, rows, dims, bias, way):
    torch.manual_seed(0)
    d_in, d_out = dims
    layer = Linear(d_in, d_out, bias=bias).double()
    n = torch.Size(rows).numel()
    if n:
        _pin(choice, layer, n, way)
    x = torch.randn(*rows, d_in, dtype=torch.float64, requires_grad=True)
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


def test_inference_measures_once_per_shape_and_row_bucket(choice, monkeypatch):
    timed = []
    real = Linear._fastest_way
    monkeypatch.setattr(Linear, "_fastest_way", lambda self, x, rows: timed.append(rows) or real(self, x, rows))
    layer = Linear(32, 48).double()
    with torch.no_grad():
        for rows in (1, 1, 3, 4, 5, 1, 3):
            x = torch.randn(rows, 32, dtype=torch.float64)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer(torch.randn(FEW_ROWS + 1, 32, dtype=torch.float64))  # many rows: F.linear, nothing to measure
    assert timed == [1, 3, 5]  # buckets 1, 4 (3 and 4 rows), 8
    assert set(choice.values()) <= set(WAYS) and len(choice) == 3
    # two columns are for a single row, the transposed product for several
    assert all(v != ("transposed" if k[4] == 1 else "twice") for k, v in choice.items())
    layer(torch.randn(2, 32, dtype=torch.float64))  # autograd on: F.linear, nothing measured or recorded
    assert timed == [1, 3, 5] and len(choice) == 3
    big = Linear(1024, 512, bias=False)  # 2 MiB: timed with the caches flushed before each product
    x = torch.randn(1, 1024)
    with torch.no_grad():
        torch.testing.assert_close(big(x), F.linear(x, big.weight))
    assert timed == [1, 3, 5, 1] and len(choice) == 4


def test_a_pinned_choice_is_used(choice, monkeypatch):
    layer = Linear(16, 24, bias=False).double()
    _pin(choice, layer, 1, "twice")
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[1].shape) or torch.matmul(*a))
    with torch.no_grad():
        x = torch.randn(1, 16, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert calls == [torch.Size([16, 2])]  # the row went in as both columns of one product


def test_linear_keeps_nn_linear_parameters_and_state_dict():
    a, b = torch.nn.Linear(8, 4), Linear(8, 4)
    assert isinstance(b, torch.nn.Linear) and a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 7), (FEW_ROWS + 1,)])
def test_linear_without_row_major_output_gives_the_same_values(choice, rows, way):
    """The few-row result left transposed in memory: same values, and the next Linear takes it as it is."""
    torch.manual_seed(0)
    first, second = Linear(24, 40).double(), Linear(40, 8).double()
    x = torch.randn(*rows, 24, dtype=torch.float64)
    ref = first(x)
    first.row_major_output = False
    _pin(choice, first, torch.Size(rows).numel(), way)
    y = first(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(second(torch.relu(y)), second(torch.relu(ref)))
