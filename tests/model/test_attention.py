"""The three attention backends agree (values and gradients) on every kind of mask, and the attention
variants relate as the papers say: GQA with n_kv_heads == n_heads is MHA."""

import math

import pytest
import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.model.attention import attend
from llmlab.model.mask import AttentionMask
from llmlab.model.position import alibi_slopes

B, H, HKV, TQ, D = 2, 4, 2, 37, 16  # 37: not a multiple of the tile size


def brute_force(q, k, v, allowed, bias=None):
    """Softmax over the allowed keys in float64; the mask and bias are tabulated from the per-(b, i, j)
    rules, sharing no code with llmlab's mask."""
    groups = q.shape[1] // k.shape[1]
    Bq, Hq, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    ok = torch.tensor([[[bool(allowed(b, i, j)) for j in range(Tk)] for i in range(Tq)] for b in range(Bq)])
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + torch.tensor([[[bias(h, i, j) for j in range(Tk)] for i in range(Tq)] for h in range(Hq)], dtype=torch.float64)
    p = s.masked_fill(~ok[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)  # empty rows: padding queries
    return p @ v


def masks(tk):
    valid = torch.ones(B, tk, dtype=torch.bool)
    valid[1, :5] = False  # left padding in the second sequence
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    off = tk - TQ
    prefix = torch.tensor([9, 4])
    slopes = alibi_slopes(H)
    return {
        "causal": (AttentionMask(True, TQ, tk, off), lambda b, i, j: j <= i + off, None),
        "bidirectional": (AttentionMask(False, TQ, tk, off), lambda b, i, j: True, None),
        "padding": (AttentionMask(True, TQ, tk, off, key_valid=valid), lambda b, i, j: j <= i + off and valid[b, j], None),
        "prefix": (AttentionMask(True, TQ, tk, off, key_valid=valid, key_pos=pos, prefix_len=prefix),
                   lambda b, i, j: valid[b, j] and (j <= i + off or pos[b, j] < prefix[b]), None),
        "window": (AttentionMask(True, TQ, tk, off, window=7), lambda b, i, j: 0 <= i + off - j < 7, None),
        "bidirectional_window": (AttentionMask(False, TQ, tk, off, window=5), lambda b, i, j: abs(i + off - j) < 5, None),
        "alibi": (AttentionMask(True, TQ, tk, off, alibi=slopes), lambda b, i, j: j <= i + off,
                  lambda h, i, j: -float(slopes[h]) * abs(i + off - j)),
    }


@pytest.mark.parametrize("tk", [TQ, TQ + 11])  # without and with cached keys before the queries
@pytest.mark.parametrize("kind", list(masks(TQ)))
def test_backends_agree_with_brute_force_and_each_other(kind, tk):
    torch.manual_seed(0)
    mask, allowed, bias = masks(tk)[kind]
    q = torch.randn(B, H, TQ, D, requires_grad=True)
    k = torch.randn(B, HKV, tk, D, requires_grad=True)
    v = torch.randn(B, HKV, tk, D + 4, requires_grad=True)  # v may be wider than q/k (MLA)
    ref = brute_force(q.detach(), k.detach(), v.detach(), allowed, bias).float()
    if mask.key_valid is not None:  # padding queries output exactly zero
        ref = ref * mask.key_valid[:, tk - TQ :, None].float()[:, None]
    grad_out = torch.randn(B, H, TQ, D + 4)
    results = {}
    for backend in ("sdpa", "math", "flash"):
        cfg = ModelConfig(attn_backend=backend, flash_block_size=8)
        out, _ = attend(q, k, v, mask, cfg, 1 / math.sqrt(D), training=False)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[backend] = grads
    for backend in ("math", "flash"):
        for g_ref, g in zip(results["sdpa"], results[backend]):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "padding", "window", "alibi"])
def test_a_decode_step_under_gqa_matches_brute_force(kind):
    # one query per row: sdpa folds the query heads that share a K/V head into queries of that head
    torch.manual_seed(0)
    tk = 12
    valid = torch.ones(B, tk, dtype=torch.bool)
    valid[1, :4] = False
    slopes = alibi_slopes(H)
    mask, allowed, bias = {
        "causal": (AttentionMask(True, 1, tk, tk - 1), lambda b, i, j: True, None),
        "padding": (AttentionMask(True, 1, tk, tk - 1, key_valid=valid), lambda b, i, j: valid[b, j], None),
        "window": (AttentionMask(True, 1, tk, tk - 1, window=5), lambda b, i, j: j > tk - 6, None),
        "alibi": (AttentionMask(True, 1, tk, tk - 1, alibi=slopes), lambda b, i, j: True,
                  lambda h, i, j: -float(slopes[h]) * (tk - 1 - j)),
    }[kind]
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, HKV, tk, D), torch.randn(B, HKV, tk, D + 4)
    ref = brute_force(q, k, v, allowed, bias).float()
    for backend in ("sdpa", "math", "flash"):
        out, _ = attend(q, k, v, mask, ModelConfig(attn_backend=backend), 1 / math.sqrt(D), training=False)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flash_skips_tiles_hidden_by_causality_or_the_window():
    mask = AttentionMask(True, 64, 64)
    assert mask.block_is_hidden(0, 8, 8, 16) and not mask.block_is_hidden(8, 16, 0, 8)
    window = AttentionMask(True, 64, 64, window=8)
    assert window.block_is_hidden(32, 40, 0, 8) and not window.block_is_hidden(32, 40, 24, 32)
    assert not AttentionMask(True, 64, 64, prefix_len=torch.tensor([20]), key_pos=torch.arange(64)[None]).block_is_hidden(0, 8, 8, 16)


def test_math_backend_returns_probabilities():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano")
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(x, need_weights=True)
    assert len(out.attentions) == cfg.n_layers
    probs = out.attentions[0]
    assert probs.shape == (2, cfg.n_heads, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, cfg.n_heads, 12))
    assert probs.triu(1).abs().max() < 1e-12  # causal: nothing above the diagonal
    torch.testing.assert_close(out.logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash"])
def test_gqa_with_all_kv_heads_equals_mha_and_repeated_kv_heads_equal_gqa(backend):
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 20))
    gqa_cfg = ModelConfig.preset("nano", n_heads=4, n_kv_heads=2, attn_backend=backend)
    mha_cfg = ModelConfig.preset("nano", n_heads=4, n_kv_heads=4, attn_backend=backend)
    gqa, mha = Transformer(gqa_cfg).eval(), Transformer(mha_cfg).eval()
    # Build the MHA weights from GQA by giving each query head a copy of its group's K/V head.
    state = gqa.state_dict()
    D, hd = gqa_cfg.dim, gqa_cfg.head_dim
    for i in range(gqa_cfg.n_layers):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split((4 * hd, 2 * hd, 2 * hd))
        k = k.view(2, hd, D).repeat_interleave(2, 0).reshape(4 * hd, D)
        v = v.view(2, hd, D).repeat_interleave(2, 0).reshape(4 * hd, D)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, k, v))
    mha.load_state_dict(state)
    torch.testing.assert_close(mha(x).logits, gqa(x).logits, atol=1e-5, rtol=1e-5)
    # and an MHA model with n_kv_heads == n_heads is plain multi-head attention (no grouping anywhere)
    assert mha.blocks[0].attn.n_kv_heads == mha.blocks[0].attn.n_heads


def test_qk_norm_normalizes_each_head():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", qk_norm=True)
    model = Transformer(cfg)
    assert model.blocks[0].attn.q_norm.weight.shape == (cfg.head_dim,)
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    out = model(x, labels=x)
    out.loss.backward()
    assert model.blocks[0].attn.q_norm.weight.grad.abs().sum() > 0
