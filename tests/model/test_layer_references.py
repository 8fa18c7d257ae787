"""Config validation, MoE, MLPs and norms, embeddings, init, gradient checkpointing, heads, bad input and the cost
formulas against independent references: transformers' modules (Qwen3-MoE and DeepSeek-V3 MoE blocks, Mixtral's
and Switch's losses, ACT2FN, LlamaRMSNorm), formulas written out here, and sums over the built modules."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.model import PRESETS, KVCache, ModelConfig, Transformer
from llmlab.model.mask import AttentionMask
from llmlab.model.mlp import MLP
from llmlab.model.moe import MoE
from llmlab.model.norm import RMSNorm, make_norm

from reference_models import MLA, TOL, V, build, nano, padded_batch, randomize_


# ================================================================================================ config
# The valid values are written out here (not read from llmlab's CHOICES table), so a value dropped from or
# added to the config shows up.
VALID = {
    "kind": ["decoder", "encoder", "prefix_lm"],
    "attention": ["standard", "mla"],
    "attn_backend": ["sdpa", "math", "flash"],
    "position": ["none", "sinusoidal", "learned", "rope", "alibi"],
    "rope_scaling": ["none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"],
    "norm": ["rmsnorm", "layernorm"],
    "norm_placement": ["pre", "post"],
    "activation": ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"],
    "router": ["softmax", "sigmoid"],
    "head": ["lm", "mlm", "classification", "token_classification", "span", "none"],
    "pooling": ["cls", "mean", "last"],
}
NEEDS = {("kind", "encoder"): dict(head="mlm"), ("attention", "mla"): MLA}


@pytest.mark.parametrize("field", list(VALID))
def test_unknown_option_names_the_field_the_value_and_every_valid_value(field):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{field: "bogus_value"})
    msg = str(err.value)
    assert field in msg and "bogus_value" in msg
    for value in VALID[field]:
        assert re.search(rf"(?<![\w]){re.escape(value)}(?![\w])", msg), (value, msg)
    # and every listed value is accepted (and builds a model)
    for value in VALID[field]:
        cfg = nano(**{field: value, **NEEDS.get((field, value), {})})
        assert getattr(cfg, field) == value
        Transformer(cfg)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_heads=0), "n_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dim=-64), "dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(flash_block_size=0), "flash_block_size"),
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(n_heads=4, n_kv_heads=8), "n_kv_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(dropout=1.0), "dropout"),
    (dict(attn_dropout=-0.1), "attn_dropout"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(n_experts=4, moe_top_k=0), "moe_top_k"),
    (dict(n_experts=4, moe_every=0), "moe_every"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(n_token_types=-1), "n_token_types"),
    (dict(head="classification", n_labels=0), "n_labels"),
    (dict(MLA, qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(MLA, position="alibi"), "position"),
    (dict(MLA, qk_norm=True), "qk_norm"),
    (dict(MLA, v_head_dim=0), "v_head_dim"),
])
def test_invalid_numbers_raise_valueerror_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        nano(**kwargs)


def test_n_kv_heads_error_lists_exactly_the_divisors():
    with pytest.raises(ValueError) as err:
        nano(n_heads=12, n_kv_heads=5, dim=96)
    assert "[1, 2, 3, 4, 6, 12]" in str(err.value) and "n_kv_heads=5" in str(err.value)


def test_dim_not_divisible_by_heads_lists_the_valid_head_counts():
    with pytest.raises(ValueError) as err:
        ModelConfig(dim=100, n_heads=3)
    msg = str(err.value)
    assert "dim=100" in msg and "n_heads=3" in msg
    numbers = {int(n) for n in re.findall(r"\d+", msg)}
    assert {1, 2, 4, 5, 10, 20, 25, 50} <= numbers, msg  # the n_heads that divide dim=100


def test_moe_hidden_dim_zero_is_refused():
    with pytest.raises(ValueError, match="moe_hidden_dim"):
        nano(n_experts=2, moe_top_k=1, moe_hidden_dim=0)


def test_unknown_field_is_refused_by_preset_and_json(tmp_path):
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.preset("nano", n_kv_head=2)
    path = tmp_path / "c.json"
    path.write_text('{"dim": 64, "n_heads": 4, "rope_scalling": "yarn"}')
    with pytest.raises(ValueError, match="'rope_scalling'.*did you mean 'rope_scaling'"):
        ModelConfig.from_json(path)


def test_every_field_round_trips_through_json():
    cfg = nano(**MLA, q_lora_rank=24, n_experts=4, moe_top_k=2, n_shared_experts=1, router="sigmoid", moe_every=2,
               rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=32, kind="prefix_lm", norm="layernorm",
               norm_bias=True, norm_placement="post", activation="geglu", tie_embeddings=True, n_token_types=2,
               embed_scale=8.0, dropout=0.1, qkv_bias=True, sliding_window=7, gradient_checkpointing=True)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_dict() == cfg.to_dict()

# ================================================================================================ MoE
def _copy_experts(ours: MoE, gate_up: torch.Tensor, down: torch.Tensor, router: torch.Tensor) -> None:
    with torch.no_grad():
        ours.router.weight.copy_(router)
        for e, expert in enumerate(ours.experts):
            expert.up.weight.copy_(gate_up[e])
            expert.down.weight.copy_(down[e])


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_softmax_router_moe_matches_qwen3_moe_block(norm_topk, top_k):
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    hf = randomize_(Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=6,
                                                          num_experts_per_tok=top_k, norm_topk_prob=norm_topk)), 0, 0.2)
    ours = MoE(nano(n_experts=6, moe_top_k=top_k, moe_hidden_dim=32, router="softmax", moe_norm_topk=norm_topk))
    _copy_experts(ours, hf.experts.gate_up_proj, hf.experts.down_proj, hf.gate.weight)
    x = torch.randn(3, 7, 64, requires_grad=True)
    out, _ = ours(x)
    ref = hf(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref, **TOL)
    g, = torch.autograd.grad(out.square().sum(), x)
    rg, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, rg, **TOL)


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("n_shared", [1, 2])
def test_sigmoid_router_moe_with_shared_experts_matches_deepseek_v3_block(norm_topk, n_shared):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    hf = randomize_(DeepseekV3MoE(DeepseekV3Config(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=n_shared,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=norm_topk)), 0, 0.2)
    ours = MoE(nano(n_experts=6, moe_top_k=2, moe_hidden_dim=32, n_shared_experts=n_shared, router="sigmoid",
                    moe_norm_topk=norm_topk))
    _copy_experts(ours, hf.experts.gate_up_proj, hf.experts.down_proj, hf.gate.weight)
    with torch.no_grad():
        s = hf.shared_experts
        ours.shared.up.weight.copy_(torch.cat((s.gate_proj.weight, s.up_proj.weight)))
        ours.shared.down.weight.copy_(s.down_proj.weight)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(ours(x)[0], hf(x), **TOL)


def routed_moe(router_std: float, **kw) -> MoE:
    """A nano MoE layer (seed 0) whose router weights are N(0, router_std²): peaked enough that routing is uneven."""
    torch.manual_seed(0)
    moe = MoE(nano(**kw))
    with torch.no_grad():
        moe.router.weight.normal_(std=router_std)
    return moe


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_aux_loss_equals_mixtral_load_balancing_loss(top_k):
    """transformers' Mixtral loss is E·Σ_i (count_i / N)·P_i, the Switch formula with f_i counted per token (its f
    sums to k); llmlab normalizes f by all N·k assignments so uniform routing gives 1. Hence llmlab·k = Mixtral."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    moe = routed_moe(0.5, n_experts=5, moe_top_k=top_k, moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)
    x = torch.randn(2, 11, 64)
    _, aux = moe(x)
    logits = x.reshape(-1, 64) @ moe.router.weight.T
    ref = load_balancing_loss_func((logits,), num_experts=5, top_k=top_k)
    torch.testing.assert_close(aux * top_k, ref.float(), **TOL)


def test_aux_loss_leaves_padding_out_as_mixtral_does_with_its_attention_mask():
    """Padding tokens are routed but do not count: the auxiliary loss of a padded batch equals transformers'
    Mixtral loss given the attention mask (× top_k, as above), and a padded row inside a model equals that row
    alone."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    moe = routed_moe(0.5, n_experts=5, moe_top_k=2, moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)
    x = torch.randn(2, 11, 64)
    real = torch.ones(2, 11, dtype=torch.bool)
    real[1, :4] = False
    _, aux = moe(x, real)
    logits = x.reshape(-1, 64) @ moe.router.weight.T
    ref = load_balancing_loss_func((logits,), num_experts=5, top_k=2, attention_mask=real.long())
    torch.testing.assert_close(aux * 2, ref.float(), **TOL)
    assert not torch.allclose(moe(x)[1] * 2, ref.float(), **TOL)  # counting the padding gives another value

    model = build(n_experts=4, moe_top_k=2, moe_aux_loss_coef=1.0, moe_z_loss_coef=0.1)
    seq = torch.randint(0, V, (7,))
    ids, mask = padded_batch([seq], "left", T=12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).aux_loss, model(seq[None]).aux_loss, **TOL)


def test_sigmoid_aux_loss_equals_the_deepseek_v3_balance_loss():
    """DeepSeek-V3 (arXiv:2412.19437, eqs. 17-19): s' = s / Σ_j s_j per token, P_i = mean_t s'_i,t,
    f_i = E/(K·T) Σ_t 1[i in top-K of token t], loss = Σ_i f_i P_i; top-2 of 6 experts, computed in float64."""
    E, K = 6, 2
    moe = routed_moe(0.5, n_experts=E, moe_top_k=K, router="sigmoid", moe_aux_loss_coef=1.0)
    x = torch.randn(1, 13, 64)
    _, aux = moe(x)
    s = (x.reshape(-1, 64).double() @ moe.router.weight.T.double()).sigmoid()
    T = s.shape[0]
    chosen = s.topk(K, dim=-1).indices
    f = torch.tensor([E / (K * T) * sum(int(i in chosen[t]) for t in range(T)) for i in range(E)], dtype=torch.float64)
    P = (s / s.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(aux.double(), (f * P).sum(), atol=1e-6, rtol=1e-6)


def test_z_loss_equals_switch_transformers_router_z_loss():
    pytest.importorskip("transformers")
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    moe = routed_moe(1.0, n_experts=4, moe_top_k=2, moe_aux_loss_coef=0.0, moe_z_loss_coef=1.0)
    x = torch.randn(3, 5, 64)
    _, z = moe(x)
    torch.testing.assert_close(z, router_z_loss_func(x @ moe.router.weight.T), **TOL)

# ================================================================================================ MLP, norms
def _gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


CLOSED = {"relu": lambda x: x.clamp_min(0), "gelu": _gelu_exact, "gelu_tanh": _gelu_tanh,
          "silu": lambda x: x / (1 + torch.exp(-x)), "swiglu": lambda x: x / (1 + torch.exp(-x)), "geglu": _gelu_exact}
HF_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


@pytest.mark.parametrize("act", list(CLOSED))
def test_mlp_equals_its_closed_form(act):
    """plain: down(act(up x)); gated (Shazeer 2020): down(act(x W_gate) ⊙ x W_up), with the closed forms of
    GELU (erf), its tanh approximation and SiLU written out in float64."""
    torch.manual_seed(0)
    mlp = randomize_(MLP(nano(activation=act, hidden_dim=32, mlp_bias=True)), 0, 0.3)
    x = torch.randn(3, 5, 64)
    h = x.double() @ mlp.up.weight.double().T + mlp.up.bias.double()
    if act in ("swiglu", "geglu"):
        assert mlp.up.out_features == 64
        gate, up = h[..., :32], h[..., 32:]
        y = CLOSED[act](gate) * up
    else:
        y = CLOSED[act](h)
    ref = y @ mlp.down.weight.double().T + mlp.down.bias.double()
    torch.testing.assert_close(mlp(x).double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("act", list(HF_ACT))
def test_activations_match_transformers_act2fn_and_gelu_variants_differ(act):
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    from llmlab.model.mlp import ACTIVATIONS

    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(ACTIVATIONS[act](x), ACT2FN[HF_ACT[act]](x), atol=1e-6, rtol=1e-6)
    assert (ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_tanh"](x)).abs().max() > 1e-4


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rmsnorm_equals_its_formula_and_llama_rmsnorm_in_every_path(eps):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, eps)
    hf = LlamaRMSNorm(64, eps)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        hf.weight.copy_(norm.weight)
    x = torch.randn(3, 5, 64) * 0.5
    ref = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()).float()
    torch.testing.assert_close(norm(x), ref, **TOL)  # training path (fused)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref, **TOL)  # inference path
        torch.testing.assert_close(norm(x), hf(x), **TOL)
        torch.testing.assert_close(norm(x.bfloat16()).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_option_uses_eps_and_bias(bias):
    cfg = nano(norm="layernorm", norm_bias=bias, norm_eps=0.3)
    norm = make_norm(cfg)
    assert isinstance(norm, nn.LayerNorm) and norm.eps == 0.3 and (norm.bias is not None) == bias
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        if bias:
            norm.bias.normal_()
    x = torch.randn(4, 64).double()
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 0.3)
    ref = ref * norm.weight.double() + (norm.bias.double() if bias else 0)
    torch.testing.assert_close(norm(x.float()).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_block_norm_placement_composes_as_written(placement):
    """pre: h = x + attn(n1(x)); out = h + mlp(n2(h)) and a final norm. post (original Transformer, BERT):
    h = n1(x + attn(x)); out = n2(h + mlp(h)) and no final norm."""
    model = randomize_(build(n_layers=1, norm="layernorm", norm_bias=True, norm_placement=placement))
    block = model.blocks[0]
    assert (model.norm is None) == (placement == "post")
    x = torch.randn(2, 7, 64)
    T = 7
    rope = model.rotary(torch.arange(T).expand(2, T), x.dtype)
    mask = AttentionMask(True, T, T)
    with torch.no_grad():
        out, _, _ = block(x, rope, mask)
        attn = lambda t: block.attn(t, rope, mask)[0]  # noqa: E731
        if placement == "pre":
            h = x + attn(block.attn_norm(x))
            ref = h + block.mlp(block.mlp_norm(h))
        else:
            h = block.attn_norm(x + attn(x))
            ref = block.mlp_norm(h + block.mlp(h))
    torch.testing.assert_close(out, ref, **TOL)

# ================================================================================================ embeddings
def test_embedding_stack_is_scale_plus_types_plus_positions_then_norm():
    model = randomize_(build(position="learned", n_token_types=3, embed_scale=8.0, embed_norm=True, norm="layernorm",
                             norm_bias=True, kind="encoder", head="mlm"))
    ids, mask = padded_batch([torch.randint(0, V, (9,)), torch.randint(0, V, (6,))], "left")
    types = torch.randint(0, 3, ids.shape)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids, mask, token_type_ids=types)
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # real tokens count 0, 1, ... (left padding shifts nothing)
        e = model.tok_emb.weight[ids] * 8.0 + model.type_emb.weight[types] + model.pos_emb.weight[pos]
        ref = F.layer_norm(e, (64,), model.emb_norm.weight, model.emb_norm.bias, 1e-5)
    torch.testing.assert_close(seen[0], ref, **TOL)


def test_token_types_default_to_zero_and_change_the_output():
    model = randomize_(build(kind="encoder", head="mlm", n_token_types=2))
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x, token_type_ids=torch.zeros_like(x)).logits)
        assert (model(x).logits - model(x, token_type_ids=torch.ones_like(x)).logits).abs().max() > 1e-3


@pytest.mark.parametrize("switch, expected", [
    ({}, set()),
    (dict(qkv_bias=True), {"attn.qkv.bias"}),
    (dict(attn_out_bias=True), {"attn.out.bias"}),
    (dict(mlp_bias=True), {"mlp.up.bias", "mlp.down.bias"}),
    (dict(lm_head_bias=True), {"head.proj.bias"}),
    (dict(norm="layernorm", norm_bias=True), {"attn_norm.bias", "mlp_norm.bias", "norm.bias"}),
    (dict(norm="rmsnorm", norm_bias=True), set()),
    (dict(MLA, qkv_bias=True), {"attn.q_proj.bias", "attn.kv_down.bias"}),
])
def test_each_bias_switch_adds_exactly_its_family(switch, expected):
    model = Transformer(nano(**switch))
    names = {re.sub(r"^blocks\.\d+\.", "", n) for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert names == expected


def test_untied_head_is_a_separate_tensor_and_tied_gradients_accumulate():
    untied = build()
    assert untied.head.proj.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    torch.manual_seed(0)
    tied = randomize_(Transformer(nano(tie_embeddings=True)))
    x = torch.randint(0, V, (2, 8))
    tied(x, labels=x).loss.backward()
    # the tied weight's gradient is the embedding's plus the head's: compare with an untied copy
    untied = Transformer(nano())
    untied.load_state_dict({**tied.state_dict(), "head.proj.weight": tied.tok_emb.weight.detach().clone()})
    untied(x, labels=x).loss.backward()
    torch.testing.assert_close(tied.tok_emb.weight.grad, untied.tok_emb.weight.grad + untied.head.proj.weight.grad,
                               **TOL)

# ================================================================================================ init
def test_init_scales_residual_projections_by_one_over_sqrt_2l():
    L, std = 8, 0.02
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, dim=256, n_layers=L, n_heads=4, hidden_dim=512, init_std=std, qkv_bias=True,
                      attn_out_bias=True, mlp_bias=True, n_experts=2, moe_top_k=1, moe_every=2, moe_hidden_dim=256)
    model = Transformer(cfg)
    res = std / math.sqrt(2 * L)

    def check(tensors, target):
        w = torch.cat([t.detach().flatten() for t in tensors])
        assert abs(w.std().item() / target - 1) < 0.03 and abs(w.mean().item()) < 0.05 * target, (w.std(), target)

    blocks = list(model.blocks)
    experts = [e for b in blocks if isinstance(b.mlp, MoE) for e in b.mlp.experts]
    dense = [b.mlp for b in blocks if not isinstance(b.mlp, MoE)]
    check([b.attn.out.weight for b in blocks], res)
    check([m.down.weight for m in dense + experts], res)
    check([b.attn.qkv.weight for b in blocks], std)
    check([m.up.weight for m in dense + experts], std)
    check([b.mlp.router.weight for b in blocks if isinstance(b.mlp, MoE)], std)
    check([model.tok_emb.weight], std)
    check([model.head.proj.weight], std)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    mla = Transformer(ModelConfig(vocab_size=1024, dim=256, n_layers=L, n_heads=4, attention="mla", kv_lora_rank=64,
                                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=64, init_std=std))
    check([b.attn.out.weight for b in mla.blocks], res)
    check([b.attn.kv_up.weight for b in mla.blocks], std)

# ================================================================================================ checkpointing
@pytest.mark.parametrize("variant", [
    dict(dropout=0.1, attn_dropout=0.1),
    dict(kind="encoder", head="mlm", dropout=0.1, position="learned"),
    dict(MLA, dropout=0.1, n_experts=4, moe_every=2, router="sigmoid", moe_z_loss_coef=0.01),
])
def test_gradient_checkpointing_gives_identical_gradients_with_dropout_and_padding(variant):
    """Non-reentrant checkpointing replays the dropout masks: with dropout on and a padded batch the loss and every
    gradient are the same, and the blocks really do run twice (the check is not vacuous)."""
    ids, mask = padded_batch([torch.randint(0, V, (14,)), torch.randint(0, V, (9,))], "right")
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(nano(gradient_checkpointing=ckpt, **variant)).train()
        calls = [0]
        for b in model.blocks:
            b.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
        torch.manual_seed(1)
        out = model(ids, mask, labels=labels)
        out.loss.backward()
        assert calls[0] == model.cfg.n_layers * (2 if ckpt else 1)
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, msg=lambda m: f"{name}: {m}")

# ================================================================================================ heads
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_pooling_by_hand_and_equal_to_each_sequence_alone(pooling, side):
    model = randomize_(build(kind="encoder", head="classification", n_labels=3, pooling=pooling,
                             classifier_pooler=True))
    seqs = [torch.randint(0, V, (n,)) for n in (10, 6, 3)]
    ids, mask = padded_batch(seqs, side)
    with torch.no_grad():
        out = model(ids, mask)
        h = out.hidden_states
        pooled = []
        for b in range(3):
            real = h[b][mask[b].bool()]
            pooled.append({"cls": real[0], "mean": real.mean(0), "last": real[-1]}[pooling])
        head = model.head
        ref = head.proj(torch.tanh(head.pooler(torch.stack(pooled))))
        torch.testing.assert_close(out.logits, ref, **TOL)
        for b, s in enumerate(seqs):
            torch.testing.assert_close(out.logits[b], model(s[None]).logits[0], atol=2e-5, rtol=1e-5)
    labels = torch.tensor([0, 2, 1])
    torch.testing.assert_close(model(ids, mask, labels=labels).loss, F.cross_entropy(ref, labels), **TOL)


def test_last_token_pooling_on_a_decoder_sees_the_whole_sequence():
    model = randomize_(build(head="classification", n_labels=2, pooling="last"))
    x = torch.randint(0, V, (1, 9))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % V  # the first token changes the last token's state in a decoder
    with torch.no_grad():
        assert (model(x).logits - model(y).logits).abs().max() > 1e-4


def test_token_classification_logits_and_loss_by_hand():
    model = randomize_(build(kind="encoder", head="token_classification", n_labels=5))
    ids, mask = padded_batch([torch.randint(0, V, (10,)), torch.randint(0, V, (7,))], "right")
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    out = model(ids, mask, labels=labels)
    ref = out.hidden_states @ model.head.proj.weight.T + model.head.proj.bias
    torch.testing.assert_close(out.logits, ref, **TOL)
    keep = mask.bool()
    logp = ref[keep].log_softmax(-1)
    nll = -logp.gather(1, labels[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, nll, **TOL)
    for b, n in enumerate((10, 7)):  # each sequence alone
        with torch.no_grad():
            torch.testing.assert_close(out.logits[b, :n], model(ids[b:b + 1, :n]).logits[0], atol=2e-5, rtol=1e-5)


def test_span_head_logits_and_loss_by_hand():
    model = randomize_(build(kind="encoder", head="span"))
    ids, mask = padded_batch([torch.randint(0, V, (10,)), torch.randint(0, V, (6,))], "right")
    spans = torch.tensor([[2, 5], [0, 4]])
    out = model(ids, mask, labels=spans)
    raw = out.hidden_states @ model.head.proj.weight.T + model.head.proj.bias
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], raw[keep], **TOL)
    assert out.logits.shape == (2, 10, 2) and (out.logits[~keep] < -1e30).all()
    total = 0.0
    for b in range(2):  # softmax over the real tokens only, start and end averaged
        for j in range(2):
            z = raw[b][keep[b], j]
            total = total + (torch.logsumexp(z, 0) - z[spans[b, j]])
    torch.testing.assert_close(out.loss, total / 4, **TOL)

# ================================================================================================ bad input
def test_bad_input_ids_dtype_and_shape_are_refused_clearly():
    model = build()
    for bad in (torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.float64),
                torch.zeros(1, 4, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="integer token ids"):
            model(bad)
    for bad in (torch.zeros(1, 2, 3, dtype=torch.long), torch.tensor(3)):
        with pytest.raises(ValueError, match=r"\[batch, seq\]"):
            model(bad)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(torch.tensor([[3, -1]]))


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_absolute_positions_refuse_to_decode_past_max_seq_len(position):
    model = build(position=position, max_seq_len=16)
    cache = KVCache()
    with torch.no_grad():
        model(torch.randint(0, V, (1, 14)), cache=cache)
        model(torch.randint(0, V, (1, 2)), cache=cache)  # positions 14, 15: fine
        with pytest.raises(ValueError, match="max_seq_len=16"):
            model(torch.randint(0, V, (1, 1)), cache=cache)  # position 16

# ================================================================================================ cost
def _numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


OPTION_AXES = {
    "attention": [{}, dict(n_kv_heads=4), dict(n_kv_heads=1), dict(head_dim=24), dict(qk_norm=True), MLA,
                  dict(MLA, q_lora_rank=24)],
    "bias": [{}, dict(qkv_bias=True), dict(attn_out_bias=True, mlp_bias=True, lm_head_bias=True)],
    "norm": [{}, dict(norm="layernorm", norm_bias=True), dict(norm="layernorm"), dict(norm_placement="post")],
    "mlp": [{}, dict(activation="gelu", hidden_dim=None), dict(activation="geglu"),
            dict(n_experts=4, moe_top_k=2, n_shared_experts=1, n_layers=3, moe_every=2),
            dict(n_experts=3, moe_top_k=1, moe_hidden_dim=40, activation="relu", mlp_bias=True)],
    "position": [{}, dict(position="learned"), dict(position="sinusoidal"), dict(position="alibi")],
    "embed": [{}, dict(tie_embeddings=True), dict(n_token_types=2), dict(embed_norm=True, tie_embeddings=True)],
    "head": [{}, dict(head="mlm", kind="encoder"), dict(head="classification", classifier_pooler=True, n_labels=4),
             dict(head="token_classification", n_labels=7), dict(head="span"), dict(head="none")],
}


def test_parameter_formula_equals_numel_across_combined_variants():
    """Random combinations across every option axis (the existing test varies one option at a time)."""
    rng = random.Random(0)
    combos = [dict(zip(OPTION_AXES, choice)) for choice in itertools.product(*OPTION_AXES.values())]
    for combo in rng.sample(combos, 100):
        kw = {}
        for part in combo.values():
            kw.update(part)
        if kw.get("attention") == "mla" and kw.get("position", "rope") != "rope":
            continue  # MLA's decoupled key is a RoPE key (the config refuses other positions)
        cfg = nano(**kw)
        assert cfg.num_parameters() == _numel(cfg), kw


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_formula_for_every_cli_attention_variant_of_every_preset(name):
    from llmlab.cli.model import attention_variants

    for variant, cfg in attention_variants(ModelConfig.preset(name)).items():
        assert cfg.num_parameters() == _numel(cfg), (name, variant)
    for depth in (1, 3, 5):
        cfg = ModelConfig.from_depth(depth)
        assert cfg.num_parameters() == _numel(cfg)


def _mean_keys(cfg: ModelConfig, T: int) -> float:
    """Average number of keys a query may see, counted from the mask rule itself."""
    W = cfg.sliding_window or T
    seen = 0
    for i in range(T):
        for j in range(T):
            if cfg.kind == "encoder":
                seen += abs(i - j) < W
            else:
                seen += 0 <= i - j < W
    return seen / T


@pytest.mark.parametrize("extra", [dict(), dict(kind="encoder", head="mlm"), dict(sliding_window=9),
                                   dict(kind="encoder", head="none", sliding_window=5), dict(head_dim=24),
                                   dict(activation="relu", tie_embeddings=True)])
def test_training_flops_equal_six_times_matmul_weights_plus_attention(extra):
    cfg = nano(**extra)
    T = 40
    weights = sum(m.weight.numel() for m in Transformer(cfg).modules() if isinstance(m, nn.Linear))
    attn = cfg.n_layers * 2 * cfg.n_heads * _mean_keys(cfg, T) * (cfg.qk_head_dim + cfg.value_head_dim)
    assert cfg.flops_per_token(T) == pytest.approx(6 * weights + 3 * attn, rel=1e-12)


@pytest.mark.parametrize("extra", [MLA, dict(MLA, q_lora_rank=24), dict(qk_norm=True)])
def test_training_flops_do_not_count_norm_gains_as_matmul_weights(extra):
    cfg = nano(**extra)
    T = 40
    weights = sum(m.weight.numel() for m in Transformer(cfg).modules() if isinstance(m, nn.Linear))
    attn = cfg.n_layers * 2 * cfg.n_heads * _mean_keys(cfg, T) * (cfg.qk_head_dim + cfg.value_head_dim)
    assert cfg.flops_per_token(T) == pytest.approx(6 * weights + 3 * attn, rel=1e-12)
