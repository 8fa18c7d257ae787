"""Behaviour of the whole model: masks mean what they say, padding changes nothing, the KV cache
reproduces the full forward, heads and losses are right, bad input is refused clearly."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.model import KVCache, ModelConfig, Transformer

MLA = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
VARIANTS = {
    "gqa": {},
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1, qk_norm=True),
    "mla": MLA,
    "mla_qlora": dict(MLA, q_lora_rank=24),
    "moe": dict(n_experts=4, moe_top_k=2, n_shared_experts=1),
    "alibi": dict(position="alibi"),
    "window": dict(sliding_window=5),
    "learned": dict(position="learned", norm="layernorm", norm_bias=True, activation="gelu_tanh", qkv_bias=True),
    "sinusoidal": dict(position="sinusoidal", activation="relu"),
    "partial_rope_yarn": dict(partial_rotary_factor=0.5, rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=32),
    "post_norm": dict(norm_placement="post", norm="layernorm"),
    "flash": dict(attn_backend="flash", flash_block_size=8),
    "math": dict(attn_backend="math"),
}


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("nano", **kw)).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_is_causal(variant):
    model = build(**VARIANTS[variant])
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 512, (2, 6))
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=1e-5)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_encoder_sees_both_directions():
    model = build(kind="encoder", head="mlm")
    x = torch.randint(0, 512, (1, 16))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 512
    assert (model(x).logits[:, 0] - model(y).logits[:, 0]).abs().max() > 1e-4


def test_prefix_lm_is_bidirectional_inside_the_prefix_and_causal_after():
    model = build(kind="prefix_lm")
    x = torch.randint(0, 512, (1, 16))
    P = 6

    def changed(pos):
        y = x.clone()
        y[0, pos] = (y[0, pos] + 1) % 512
        return (model(x, prefix_len=P).logits - model(y, prefix_len=P).logits).abs().amax(-1)[0]

    d = changed(4)  # inside the prefix: every position sees it, earlier ones included
    assert (d > 1e-5).all()
    d = changed(10)  # after the prefix: only positions >= 10 see it
    assert d[:10].max() < 1e-5 and (d[10:] > 1e-5).all()
    with pytest.raises(ValueError, match="prefix_len"):
        model(x)


@pytest.mark.parametrize("variant", ["gqa", "mla", "alibi", "window", "learned", "sinusoidal", "flash", "moe"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_logits_of_each_sequence_alone(variant, side):
    model = build(**VARIANTS[variant])
    seqs = [torch.randint(0, 512, (n,)) for n in (12, 7)]
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(12 - len(s), 12) if side == "left" else slice(0, len(s))
        batch[i, sl], mask[i, sl] = s, 1
    out = model(batch, mask).logits
    for i, s in enumerate(seqs):
        alone = model(s[None]).logits[0]
        got = out[i][mask[i].bool()]
        torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-5)


def test_prefix_lm_padding_and_cache():
    model = build(kind="prefix_lm")
    s = torch.randint(0, 512, (9,))
    batch = torch.cat((torch.zeros(3, dtype=torch.long), s))[None]
    mask = torch.tensor([[0, 0, 0] + [1] * 9])
    alone = model(s[None], prefix_len=4).logits
    torch.testing.assert_close(model(batch, mask, prefix_len=4).logits[:, 3:], alone, atol=2e-5, rtol=1e-5)
    cache = KVCache()
    first = model(s[None, :6], prefix_len=4, cache=cache).logits
    rest = [model(s[None, i : i + 1], prefix_len=4, cache=cache).logits for i in range(6, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_equals_the_full_forward(variant):
    model = build(**VARIANTS[variant])
    x = torch.randint(0, 512, (2, 14))
    full = model(x).logits
    cache = KVCache()
    parts = [model(x[:, :6], cache=cache).logits]  # prefill, then chunk of 3, then one at a time
    parts.append(model(x[:, 6:9], cache=cache).logits)
    parts += [model(x[:, i : i + 1], cache=cache).logits for i in range(9, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=3e-5, rtol=1e-5)
    assert cache.length == 14
    assert cache.nbytes() == 14 * 2 * model.cfg.kv_cache_bytes_per_token(4)


def test_kv_cache_with_left_padding():
    model = build()
    seqs = [torch.randint(0, 512, (n,)) for n in (8, 5)]
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, 8 - len(s):], mask[i, 8 - len(s):] = s, 1
    nxt = torch.randint(0, 512, (2, 3))
    cache = KVCache()
    model(batch, mask, cache=cache)
    steps = [model(nxt[:, j : j + 1], cache=cache).logits for j in range(3)]
    for i, s in enumerate(seqs):
        alone = model(torch.cat((s, nxt[i]))[None]).logits[0, -3:]
        torch.testing.assert_close(torch.cat(steps, 1)[i], alone, atol=2e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x = torch.randint(0, 512, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = build(gradient_checkpointing=ckpt, n_experts=4, moe_every=2).train()
        out = model(x, labels=x)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_lm_loss_is_next_token_cross_entropy_and_ties_share_storage():
    model = build(tie_embeddings=True)
    assert model.head.proj.weight is model.tok_emb.weight
    x = torch.randint(0, 512, (2, 10))
    out = model(x, labels=x)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_heads_shapes_and_losses():
    x = torch.randint(0, 512, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 6:] = 0
    enc = dict(kind="encoder", n_token_types=2, embed_norm=True, norm="layernorm", norm_placement="post")
    mlm = build(head="mlm", **enc)
    labels = torch.full_like(x, -100)
    labels[:, 3] = x[:, 3]
    out = mlm(x, mask, token_type_ids=torch.zeros_like(x), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, 3], x[:, 3]))
    for pooling in ("cls", "mean", "last"):
        clf = build(head="classification", n_labels=3, pooling=pooling, classifier_pooler=True, **enc)
        out = clf(x, mask, labels=torch.tensor([0, 1, 2]))
        assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    # last-token pooling on a left-padded decoder batch picks the last real token
    dec = build(head="classification", n_labels=2, pooling="last")
    left = torch.cat((torch.zeros(1, 4, dtype=torch.long), x[:1, :6]), 1)
    torch.testing.assert_close(dec(left, (left != 0) | (torch.arange(10) >= 4)).logits, dec(x[:1, :6]).logits,
                               atol=2e-5, rtol=1e-5)
    tok = build(head="token_classification", n_labels=5, **enc)
    assert tok(x, mask).logits.shape == (3, 10, 5)
    span = build(head="span", **enc)
    out = span(x, mask, labels=torch.tensor([[1, 2], [0, 9], [3, 5]]))
    assert out.logits.shape == (3, 10, 2) and torch.isfinite(out.loss)
    assert out.logits[2, 6:].max() < -1e30  # padding can never be a span boundary
    none = build(head="none")
    assert none(x).logits is None and none(x).hidden_states.shape == (3, 10, 64)


def test_bad_input_is_refused_with_a_clear_message():
    model = build(position="learned")
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\].*input_ids\[None\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(torch.tensor([[1, 600]]))
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]])


def test_rope_model_runs_past_max_seq_len_only_with_relative_positions():
    model = build(max_seq_len=16)
    assert model(torch.zeros(1, 40, dtype=torch.long)).logits.shape == (1, 40, 512)


def test_dropout_only_in_training():
    model = build(dropout=0.5, attn_dropout=0.2)
    x = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    assert (model(x).logits - model(x).logits).abs().max() > 0
