"""The chunked linear cross-entropy equals the plain one, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.model import ModelConfig, Transformer
from llmlab.model.losses import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_cross_entropy_with_ignored_labels(chunk, with_bias):
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(33, 16, requires_grad=True)
    b = torch.randn(33, requires_grad=True) if with_bias else None
    y = torch.randint(0, 33, (50,))
    y[::7] = -100
    loss = linear_cross_entropy(h, w, y, b, chunk=chunk)
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    params = [h, w] + ([b] if with_bias else [])
    g = torch.autograd.grad(3.0 * loss, params)  # a non-unit upstream gradient must scale everything
    g_ref = torch.autograd.grad(3.0 * ref, params)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r)


def test_model_loss_without_logits_equals_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 24))
    labels = x.clone()
    labels[0, :5] = -100
    grads = []
    for tie in (False, True):
        model = Transformer(ModelConfig.preset("nano", tie_embeddings=tie))
        for fused in (False, True):
            model.zero_grad()
            out = model(x, labels=labels, return_logits=not fused)
            assert (out.logits is None) == fused
            out.loss.backward()
            grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (l0, g0), (l1, g1) = grads[-2:]
        torch.testing.assert_close(l1, l0)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_grad_skips_the_gradient_work():
    from llmlab.model.losses import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (64,))
    with torch.no_grad():
        evaluated = linear_cross_entropy(h, w, y, chunk=16)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, torch.nn.functional.cross_entropy(h @ w.t(), y).detach())
