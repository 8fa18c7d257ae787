"""What a config costs (cost.py), checked against the modules actually built and the memory actually used:
parameters against Transformer.parameters(), KV-cache bytes against a filled KVCache, FLOPs against the
matmul weights counted by hand, and the activation estimate against the tensors autograd saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmlab.model import PRESETS, KVCache, ModelConfig, Transformer

MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def built_parameters(cfg: ModelConfig, meta: bool = False) -> int:
    if meta:
        with torch.device("meta"):
            model = Transformer(cfg)
    else:
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", list(PRESETS))
def test_num_parameters_presets(name):
    cfg = ModelConfig.preset(name)
    n = built_parameters(cfg, meta=name in ("small", "base"))
    assert cfg.num_parameters() == n
    if name == "micro":
        assert round(n / 1e6, 1) == 15.7  # the size the preset advertises


NANO_VARIANTS = {
    "gqa": {},
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "explicit_head_dim": dict(head_dim=24),
    "qk_norm": dict(qk_norm=True),
    "mla": MLA,
    "mla_q_lora": {**MLA, "q_lora_rank": 24},
    "mla_bias": {**MLA, "q_lora_rank": 0, "qkv_bias": True, "attn_out_bias": True},
    "moe_shared_every2": dict(n_layers=4, n_experts=4, moe_top_k=2, n_shared_experts=2, moe_every=2),
    "moe_hidden": dict(n_experts=3, moe_top_k=1, moe_hidden_dim=48, n_shared_experts=1),
    "head_lm_tied": dict(tie_embeddings=True),
    "head_lm_bias": dict(lm_head_bias=True),
    "head_lm_bias_tied": dict(lm_head_bias=True, tie_embeddings=True),
    "head_mlm": dict(kind="encoder", head="mlm"),
    "head_mlm_tied": dict(kind="encoder", head="mlm", tie_embeddings=True),
    "head_cls": dict(kind="encoder", head="classification", n_labels=3),
    "head_cls_pooler": dict(kind="encoder", head="classification", n_labels=3, classifier_pooler=True),
    "head_cls_tied_ignored": dict(head="classification", tie_embeddings=True),
    "head_token_cls": dict(kind="encoder", head="token_classification", n_labels=5),
    "head_span": dict(kind="encoder", head="span"),
    "head_none": dict(head="none"),
    "head_none_tied": dict(head="none", tie_embeddings=True),
    "biases": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True),
    "layernorm_bias": dict(norm="layernorm", norm_bias=True),
    "layernorm_nobias": dict(norm="layernorm", norm_bias=False),
    "gelu": dict(activation="gelu"),
    "geglu": dict(activation="geglu", hidden_dim=None),
    "learned_pos": dict(position="learned"),
    "sinusoidal_pos": dict(position="sinusoidal"),
    "alibi": dict(position="alibi"),
    "token_types": dict(kind="encoder", head="mlm", n_token_types=2),
    "embed_norm": dict(embed_norm=True, norm="layernorm", norm_bias=True),
    "bert_like": dict(kind="encoder", head="mlm", norm_placement="post", norm="layernorm", norm_bias=True,
                      position="learned", n_token_types=2, embed_norm=True, activation="gelu",
                      qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
    "post_norm_encoder_cls": dict(kind="encoder", head="classification", norm_placement="post",
                                  classifier_pooler=True),
    "kitchen_sink": dict(n_layers=3, **MLA, q_lora_rank=24, n_experts=4, moe_top_k=2, n_shared_experts=1,
                         moe_every=3, norm="layernorm", norm_bias=True, embed_norm=True, mlp_bias=True,
                         attn_out_bias=True, tie_embeddings=True),
}


@pytest.mark.parametrize("variant", list(NANO_VARIANTS))
def test_num_parameters_nano_variants(variant):
    cfg = ModelConfig.preset("nano", **NANO_VARIANTS[variant])
    assert cfg.num_parameters() == built_parameters(cfg)


def test_num_parameters_tied_differs_by_the_embedding():
    untied = ModelConfig.preset("nano")
    tied = ModelConfig.preset("nano", tie_embeddings=True)
    assert untied.num_parameters() - tied.num_parameters() == 512 * 64


# ---------------------------------------------------------------------------------------------- KV cache
KV_VARIANTS = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "mla": MLA,
    "mla_q_lora": {**MLA, "q_lora_rank": 24},
}


@pytest.mark.parametrize("variant", list(KV_VARIANTS))
def test_kv_cache_bytes_per_token_matches_a_filled_cache(variant):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", **KV_VARIANTS[variant])
    model = Transformer(cfg).eval()
    B, T = 3, 10
    cache = KVCache()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (B, T)), cache=cache)
        assert cache.length == T and len(cache.layers) == cfg.n_layers
        assert all(t.dtype == torch.float32 for ts in cache.layers.values() for t in ts)
        assert cache.nbytes() == cfg.kv_cache_bytes_per_token(bytes_per_element=4) * B * T
        model(torch.randint(0, cfg.vocab_size, (B, 1)), cache=cache)  # one decode step adds one token's worth
    assert cache.nbytes() == cfg.kv_cache_bytes_per_token(4) * B * (T + 1)


def test_kv_cache_bytes_by_hand_and_ordering():
    micro = dict(mha=dict(n_kv_heads=6), gqa=dict(n_kv_heads=2), mqa=dict(n_kv_heads=1),
                 mla=dict(attention="mla", kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32,
                          v_head_dim=64))
    b = {k: ModelConfig.preset("micro", **v).kv_cache_bytes_per_token() for k, v in micro.items()}
    # micro: 6 layers, head_dim 64, bf16 by default: 2·L·H_kv·d·2 bytes; MLA: L·(rank + rope)·2
    assert b == {"mha": 2 * 6 * 6 * 64 * 2, "gqa": 2 * 6 * 2 * 64 * 2, "mqa": 2 * 6 * 1 * 64 * 2,
                 "mla": 6 * (64 + 32) * 2}
    assert b["mla"] < b["mqa"] < b["gqa"] < b["mha"]
    assert ModelConfig.preset("micro").kv_cache_bytes_per_token(4) == 2 * b["gqa"]


# ---------------------------------------------------------------------------------------------- FLOPs
def linear_weights(model: nn.Module) -> int:
    """Every weight a token multiplies with in a dense model: all nn.Linear weights (embedding lookups are
    not matmuls; a tied LM head is a Linear whose weight is the embedding)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("extra", [{}, dict(n_kv_heads=4, activation="gelu"), dict(tie_embeddings=True)])
def test_training_flops_dense_by_hand(extra):
    cfg = ModelConfig.preset("nano", **extra)
    T = 128
    D, H, Hkv, hd, L, V = 64, 4, cfg.n_kv_heads, 16, 2, 512
    hidden = cfg.hidden_dim
    per_layer = D * (H + 2 * Hkv) * hd + H * hd * D + (3 if cfg.gated else 2) * D * hidden
    weights = L * per_layer + D * V
    assert weights == linear_weights(Transformer(cfg))
    # per layer 2·H·ctx·(d_qk + d_v) with ctx = (T + 1)/2 keys on average for a causal model
    attn = L * 2 * H * (T + 1) / 2 * (hd + hd)
    expected = 6 * weights + 3 * attn
    assert cfg.flops_per_token(T) == pytest.approx(expected, rel=1e-12)
    if not extra:  # the numbers, once: 6·106496 + 3·33024
        assert weights == 106496 and attn == 33024 and expected == 738048
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_seq_len)


def test_training_flops_with_frozen_layers_by_hand():
    cfg = ModelConfig.preset("nano")  # 2 layers, the numbers of test_training_flops_dense_by_hand
    T = 128
    per_layer, head, attn_layer = 36864, 64 * 512, 33024 / 2
    forward = 2 * (2 * per_layer + head) + 2 * attn_layer
    assert cfg.flops_per_token(T, first_trained_layer=0, trained_weights=None) == pytest.approx(3 * forward)
    # LoRA-like: every layer on the path, 1,000 trained weights: inputs' gradients everywhere, few weight gradients
    assert cfg.flops_per_token(T, trained_weights=1000) == pytest.approx(
        forward + (2 * (2 * per_layer + head) + 2 * attn_layer) + (2 * 1000 + 2 * attn_layer))
    # only the last layer trains: backward stops there
    assert cfg.flops_per_token(T, first_trained_layer=1, trained_weights=per_layer) == pytest.approx(
        forward + (2 * (per_layer + head) + attn_layer) + (2 * per_layer + attn_layer))
    # only the head: its weights' gradients and nothing else
    assert cfg.flops_per_token(T, first_trained_layer=2, trained_weights=head) == pytest.approx(forward + 2 * head)


def test_training_flops_attention_context():
    T = 64
    dec = ModelConfig.preset("nano")
    enc = ModelConfig.preset("nano", kind="encoder", head="none")
    win = ModelConfig.preset("nano", sliding_window=8)
    none = ModelConfig.preset("nano", head="none")
    per_key = 3 * 2 * 2 * 4 * (16 + 16)  # 3 × 2 layers × 2·H·(d_qk + d_v)
    # encoder: every query sees all T keys; decoder: (T + 1)/2 on average
    assert enc.flops_per_token(T) - none.flops_per_token(T) == pytest.approx(per_key * (T - (T + 1) / 2))
    # window of 8: query i sees min(i + 1, 8) keys
    mean_ctx = sum(min(i + 1, 8) for i in range(T)) / T
    assert dec.flops_per_token(T) - win.flops_per_token(T) == pytest.approx(per_key * ((T + 1) / 2 - mean_ctx))


def test_training_flops_moe_counts_active_experts_only():
    D, hidden, L = 64, 128, 2
    mlp = 3 * D * hidden  # gated: up (gate and up) + down

    def flops(**kw) -> float:
        return ModelConfig.preset("nano", n_layers=L, **kw).flops_per_token(128)

    dense = flops()
    k1e4 = flops(n_experts=4, moe_top_k=1)
    k1e8 = flops(n_experts=8, moe_top_k=1)
    k2e8 = flops(n_experts=8, moe_top_k=2)
    k2e64 = flops(n_experts=64, moe_top_k=2)
    # top-1 MoE: one expert the size of the dense MLP, plus the router (D·E per layer)
    assert k1e4 - dense == pytest.approx(6 * L * D * 4)
    # more experts only add router weights; the expert compute is unchanged
    assert k1e8 - k1e4 == pytest.approx(6 * L * D * 4)
    assert k2e64 - k2e8 == pytest.approx(6 * L * D * 56)
    # one more active expert: one more expert MLP per MoE layer
    assert k2e8 - k1e8 == pytest.approx(6 * L * mlp)
    # shared experts always run; moe_every halves the MoE layers
    assert flops(n_experts=8, moe_top_k=2, n_shared_experts=1) - k2e8 == pytest.approx(6 * L * mlp)
    assert flops(n_experts=8, moe_top_k=2, moe_every=2) - dense == pytest.approx(6 * (D * 8 + mlp))
    # the total parameter count does grow with the experts
    assert ModelConfig.preset("nano", n_experts=64).num_parameters() > ModelConfig.preset("nano", n_experts=8).num_parameters()


# ---------------------------------------------------------------------------------------------- activations
B, T = 2, 64


def saved_activation_bytes(cfg: ModelConfig, per_block: bool = False):
    """Bytes of the tensors autograd saves for backward during one training forward with labels: every
    distinct storage once, skipping parameters and buffers. With per_block, also the bytes saved while each
    block's forward runs."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, torch.Tensor] = {}  # holding the tensors keeps their storages from being reused
    block_bytes = [0] * cfg.n_layers
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in seen:
            seen[ptr] = t
            if current:
                block_bytes[current[-1]] += t.untyped_storage().nbytes()
        return t

    def enter(i: int):
        def hook(module, args) -> None:
            current.append(i)
        return hook

    def leave(module, args, output) -> None:
        current.pop()

    if per_block:
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(enter(i))
            block.register_forward_hook(leave)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.loss.backward()  # the graph really is usable
    total = sum(t.untyped_storage().nbytes() for t in seen.values())
    return (total, block_bytes) if per_block else total


ACT_VARIANTS = {
    "swiglu": dict(n_kv_heads=4),
    "gelu": dict(n_kv_heads=4, activation="gelu"),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
}


@pytest.mark.parametrize("variant", list(ACT_VARIANTS))
def test_activation_bytes_estimate_within_25_percent(variant):
    cfg = ModelConfig.preset("nano", dim=64, vocab_size=512, **ACT_VARIANTS[variant])
    measured = saved_activation_bytes(cfg)
    estimate = cfg.activation_bytes(B, T, bytes_per_element=4)
    assert 0.75 * measured <= estimate <= 1.25 * measured, (estimate, measured, estimate / measured)


def test_activation_bytes_with_gradient_checkpointing():
    cfg = ModelConfig.preset("nano")
    ckpt_cfg = ModelConfig.preset("nano", gradient_checkpointing=True)
    full, block_bytes = saved_activation_bytes(cfg, per_block=True)
    kept = saved_activation_bytes(ckpt_cfg)
    assert kept < 0.35 * full  # only the block inputs (and the head) stay saved
    estimate = ckpt_cfg.activation_bytes(B, T, 4)
    assert estimate < 0.7 * cfg.activation_bytes(B, T, 4)
    # The estimate is the peak: what stays saved plus one block rematerialized during backward. A
    # saved-tensors hook cannot see the recomputation, so that block's share is measured on the
    # un-checkpointed model (bytes saved while the block's forward runs).
    peak = kept + max(block_bytes)
    assert 0.5 * peak <= estimate <= 2 * peak, (estimate, kept, max(block_bytes), estimate / peak)
