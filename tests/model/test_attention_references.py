"""RoPE, attention backends, masks, MLA, QK-norm and MQA against independent references: transformers' own
modules (GPT-NeoX partial rotary, DeepSeek-V3 MLA, Qwen3 QK-norm, Llama with one KV head), closed forms, and a
brute-force float64 attention that shares no code with llmlab."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from llmlab.model import KVCache, ModelConfig, Transformer
from llmlab.model.attention import attend
from llmlab.model.mask import AttentionMask
from llmlab.model.position import Rotary, apply_rotary

from reference_models import BACKENDS, MLA, TOL, V, build, nano, padded_batch, randomize_


# ================================================================================================ RoPE
@pytest.mark.parametrize("rope", [dict(rope_type="default"), dict(rope_type="linear", factor=4.0),
                                  dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)])
@pytest.mark.parametrize("partial", [1.0, 0.5, 0.25])
def test_partial_rotary_matches_gpt_neox(partial, rope):
    """GPT-NeoX rotates the first rotary_ndims dims of each head (rotate-half) and passes the rest through."""
    pytest.importorskip("transformers")
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    hd, theta = 32, 10000.0
    ours_scaling = {"default": {}, "linear": dict(rope_scaling="linear", rope_factor=4.0),
                    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=32)}[rope["rope_type"]]
    cfg = nano(dim=2 * hd, n_heads=2, n_kv_heads=2, partial_rotary_factor=partial, max_seq_len=128, **ours_scaling)
    hf_cfg = GPTNeoXConfig(hidden_size=2 * hd, num_attention_heads=2, max_position_embeddings=128,
                           rope_parameters=dict(rope_theta=theta, partial_rotary_factor=partial, **rope))
    positions = torch.tensor([[0, 1, 2, 7, 31, 64, 100], [3, 3, 9, 10, 11, 50, 127]])
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 7, hd, generator=gen), torch.randn(2, 2, 7, hd, generator=gen)
    cos, sin = Rotary(cfg)(positions, torch.float32)
    hcos, hsin = GPTNeoXRotaryEmbedding(hf_cfg)(q, positions)
    tol = dict(atol=5e-5, rtol=1e-5)  # float32 angles up to 127 rad: ~1e-5 rounding in cos/sin on either side
    torch.testing.assert_close(cos[:, 0], hcos, **tol)
    torch.testing.assert_close(sin[:, 0], hsin, **tol)
    hq, hk = apply_rotary_pos_emb(q, k, hcos, hsin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hq, **tol)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hk, **tol)
    assert torch.equal(apply_rotary(q, cos, sin)[..., cfg.rotary_dim:], q[..., cfg.rotary_dim:])


def test_dynamic_ntk_at_factor_one_is_plain_only_inside_the_original_context():
    """The issue says every scaling at factor 1 equals plain RoPE. For dynamic NTK that holds up to the original
    length; past it the closed form base·(s·L/L0 - (s-1))^(d/(d-2)) still grows with L at s = 1, in llmlab and in
    transformers alike (documented here so nobody reads the factor-1 test as covering long sequences)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmlab.model.position import rope_inv_freq

    cfg = nano(dim=128, n_heads=2, n_kv_heads=2, rope_scaling="dynamic_ntk", rope_factor=1.0,
               rope_original_max_seq_len=64, max_seq_len=512)
    plain, _ = rope_inv_freq(nano(dim=128, n_heads=2, n_kv_heads=2, max_seq_len=512))
    assert torch.equal(rope_inv_freq(cfg, 64)[0], plain)
    L, d = 200, 64
    long = rope_inv_freq(cfg, L)[0]
    base = 10000.0 * (L / 64) ** (d / (d - 2))
    torch.testing.assert_close(long, (base ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)).float())
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                     rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=1.0))
    torch.testing.assert_close(long, ROPE_INIT_FUNCTIONS["dynamic"](hf, torch.device("cpu"), L)[0].float())


def test_rope_attention_scores_in_a_model_depend_only_on_relative_offset():
    """End to end: a 1-layer RoPE model's attention probabilities for a sequence are unchanged when every position
    is shifted by a constant (position_ids), and change when the relative offsets change."""
    model = randomize_(build(n_layers=1, attn_backend="math"))
    x = torch.randint(0, V, (1, 12))
    base = model(x, need_weights=True).attentions[0]
    shifted = model(x, position_ids=torch.arange(12)[None] + 37, need_weights=True).attentions[0]
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-4)
    spread = model(x, position_ids=torch.arange(12)[None] * 2, need_weights=True).attentions[0]
    assert (spread - base).abs().max() > 1e-3


def test_position_none_makes_an_encoder_permutation_equivariant():
    """Without position information self-attention cannot tell order: permuting an encoder's input permutes its
    output; with any position option it does not."""
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(5))
    for position in ("none", "rope", "learned", "sinusoidal", "alibi"):
        model = randomize_(build(kind="encoder", head="mlm", position=position))
        with torch.no_grad():
            diff = (model(x[:, perm]).logits - model(x).logits[:, perm]).abs().max()
        assert (diff < 1e-4) == (position == "none"), (position, float(diff))

# ================================================================================================ attention
def brute_attention(q, k, v, allowed, bias=None):
    """float64 softmax over the allowed keys, differentiable; rows with no allowed key give 0."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    g = H // k.shape[1]
    ok = torch.tensor([[[bool(allowed(b, i, j)) for j in range(Tk)] for i in range(Tq)] for b in range(B)])
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~ok[:, None], float("-inf"))
    p = torch.where(ok[:, None].any(-1, keepdim=True), s.softmax(-1), torch.zeros_like(s)).nan_to_num(0.0)
    return p @ v


def _mask_cases(T):
    B = 2
    left = torch.ones(B, T, dtype=torch.bool)
    left[1, :4] = False
    right = torch.ones(B, T, dtype=torch.bool)
    right[0, T - 6:] = False
    pos_l = (left.long().cumsum(1) - 1).clamp_min(0)
    prefix = torch.tensor([7, 3])
    arange_pos = torch.arange(T).expand(B, T)
    return {
        "encoder_left_padding": (AttentionMask(False, T, T, key_valid=left), lambda b, i, j: left[b, j], left),
        "encoder_right_padding": (AttentionMask(False, T, T, key_valid=right), lambda b, i, j: right[b, j], right),
        "decoder_right_padding": (AttentionMask(True, T, T, key_valid=right),
                                  lambda b, i, j: j <= i and right[b, j], right),
        "prefix_no_padding": (AttentionMask(True, T, T, key_pos=arange_pos, prefix_len=prefix),
                              lambda b, i, j: j <= i or j < prefix[b], None),
        "prefix_right_padding": (AttentionMask(True, T, T, key_valid=right, key_pos=arange_pos, prefix_len=prefix),
                                 lambda b, i, j: right[b, j] and (j <= i or j < prefix[b]), right),
        "prefix_left_padding": (AttentionMask(True, T, T, key_valid=left, key_pos=pos_l, prefix_len=prefix),
                                lambda b, i, j: left[b, j] and (j <= i or pos_l[b, j] < prefix[b]), left),
        "window_left_padding": (AttentionMask(True, T, T, key_valid=left, window=4),
                                lambda b, i, j: left[b, j] and 0 <= i - j < 4, left),
        "encoder_window_right_padding": (AttentionMask(False, T, T, key_valid=right, window=3),
                                         lambda b, i, j: right[b, j] and abs(i - j) < 3, right),
    }


@pytest.mark.parametrize("case", list(_mask_cases(19)))
def test_backends_match_a_float64_reference_in_forward_and_backward(case):
    """Values AND gradients of q, k, v of every backend against float64 autograd through a brute-force softmax
    (the existing test compares the backends' gradients only with each other)."""
    torch.manual_seed(0)
    T, H, Hkv, D = 19, 4, 2, 8
    mask, allowed, valid = _mask_cases(T)[case]
    q = torch.randn(2, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, T, D + 2, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, H, T, D + 2, dtype=torch.float64)
    if valid is not None:  # padding queries output exactly 0 by contract
        probe = probe * valid[:, None, :, None]
    ref = brute_attention(q, k, v, allowed)
    if valid is not None:
        ref = ref * valid[:, None, :, None]
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for backend in BACKENDS:
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        out, _ = attend(qf, kf, vf, mask, nano(attn_backend=backend, flash_block_size=4), 1 / math.sqrt(D), False)
        torch.testing.assert_close(out.double(), ref, **TOL, msg=lambda m: f"{backend}: {m}")
        grads = torch.autograd.grad((out * probe.float()).sum(), (qf, kf, vf))
        for name, g, rg in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, **TOL, msg=lambda m: f"{backend} d{name}: {m}")


class _ShapeRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("causal", [True, False])
def test_flash_never_materializes_the_t_by_t_matrix(causal):
    T, block = 64, 8
    q, k, v = (torch.randn(1, 2, T, 16, requires_grad=True) for _ in range(3))
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, :5] = False
    mask = AttentionMask(causal, T, T, key_valid=valid)

    def shapes(backend):
        with _ShapeRecorder() as rec:
            out, _ = attend(q, k, v, mask, nano(attn_backend=backend, flash_block_size=block), 0.25, False)
            n_forward = len(rec.shapes)
            torch.autograd.grad(out.sum(), (q, k, v))
        assert len(rec.shapes) > n_forward  # the backward pass was recorded too
        return rec.shapes

    flash = shapes("flash")
    assert all(s[-2:] != (T, T) and math.prod(s) < T * T for s in flash if len(s) >= 2), \
        max(flash, key=math.prod)
    assert any(s[-2:] == (T, T) for s in shapes("math"))  # the recorder does see a T×T matrix where there is one


MODEL_CASES = {
    "decoder_left": (dict(), "left", None),
    "decoder_right": (dict(), "right", None),
    "encoder_left": (dict(kind="encoder", head="mlm"), "left", None),
    "encoder_right": (dict(kind="encoder", head="mlm"), "right", None),
    "prefix_lm_left": (dict(kind="prefix_lm"), "left", [6, 3]),
    "prefix_lm_right": (dict(kind="prefix_lm"), "right", [6, 3]),
    "window_left": (dict(sliding_window=5), "left", None),
    "encoder_window_right": (dict(kind="encoder", head="mlm", sliding_window=4), "right", None),
    "mla_left": (MLA, "left", None),
    "mla_prefix_right": (dict(MLA, kind="prefix_lm"), "right", [5, 2]),
    "alibi_right": (dict(position="alibi"), "right", None),
    "mqa_qknorm_left": (dict(n_kv_heads=1, qk_norm=True), "left", None),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_backends_agree_on_the_whole_model_forward_and_backward(case):
    """sdpa, math and flash give the same logits on the real tokens (fp32, 1e-5) and the same gradient for every
    parameter, for decoder, encoder and prefix-LM models with left or right padding, windows, MLA, ALiBi. The
    loss sums ~10^4 randomly weighted logits, so gradients reach ~10^2-10^3: each parameter's gradient must be
    within 1e-5 of its own largest entry of the float64 gradient (the backends sit at ~3e-6 of it)."""
    kw, side, prefix = MODEL_CASES[case]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (n,), generator=gen) for n in (19, 12)]
    ids, mask = padded_batch(seqs, side)
    probe = torch.randn(2, 19, V, generator=gen, dtype=torch.float64) * mask[..., None]
    extra = dict(prefix_len=torch.tensor(prefix)) if prefix else {}
    results = {}
    for backend in (*BACKENDS, "float64"):
        model = randomize_(build(**kw, attn_backend="math" if backend == "float64" else backend, flash_block_size=4))
        if backend == "float64":
            model = model.double()
        logits = model(ids, mask, **extra).logits
        (logits * probe.to(logits.dtype)).sum().backward()
        results[backend] = (logits[mask.bool()].detach().double(),
                            {n: p.grad.double() for n, p in model.named_parameters()})
    ref_logits, ref_grads = results["float64"]
    assert all(g is not None and g.abs().max() > 0 for g in ref_grads.values())
    for backend in BACKENDS:
        logits, grads = results[backend]
        torch.testing.assert_close(logits, results["sdpa"][0], **TOL, msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(logits, ref_logits, **TOL, msg=lambda m: f"{backend} vs float64: {m}")
        for name, g in grads.items():
            err = (g - ref_grads[name]).abs().max() / ref_grads[name].abs().max()
            assert err < 1e-5, (backend, name, float(err))


# ------------------------------------------------------------------------------------- padding and prefix-LM
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["encoder", "prefix_lm", "decoder_post_norm_geglu"])
def test_padding_gives_each_sequence_its_logits_alone(kind, side, backend):
    kw = {"encoder": dict(kind="encoder", head="mlm", position="learned", n_token_types=2, norm="layernorm",
                          norm_bias=True, norm_placement="post", embed_norm=True),
          "prefix_lm": dict(kind="prefix_lm"),
          "decoder_post_norm_geglu": dict(norm_placement="post", activation="geglu")}[kind]
    model = randomize_(build(**kw, attn_backend=backend, flash_block_size=4))
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, V, (n,), generator=gen) for n in (13, 8, 5)]
    ids, mask = padded_batch(seqs, side)
    prefixes = [6, 8, 2]  # inside, equal to, and shorter than the sequence
    extra = dict(prefix_len=torch.tensor(prefixes)) if kind == "prefix_lm" else {}
    with torch.no_grad():
        out = model(ids, mask, **extra).logits
        for i, s in enumerate(seqs):
            alone_extra = dict(prefix_len=prefixes[i]) if kind == "prefix_lm" else {}
            alone = model(s[None], **alone_extra).logits[0]
            torch.testing.assert_close(out[i][mask[i].bool()], alone, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dynamic_ntk_padding_gives_each_sequence_its_logits_alone(side):
    model = randomize_(build(rope_scaling="dynamic_ntk", rope_factor=2.0, rope_original_max_seq_len=8))
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, V, (14,), generator=gen), torch.randint(0, V, (6,), generator=gen)]
    ids, mask = padded_batch(seqs, side)
    with torch.no_grad():
        out = model(ids, mask).logits
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i][mask[i].bool()], model(s[None]).logits[0], atol=5e-5, rtol=1e-5)


def test_prefix_lm_attention_pattern_equals_the_rule_for_every_row():
    """Which keys each query attends to (math backend's probabilities > 0) is exactly: real key and (j <= i or
    key position < prefix_len of that row), with left padding and a different prefix per row; inside and after
    the prefix."""
    model = build(kind="prefix_lm", attn_backend="math")
    gen = torch.Generator().manual_seed(3)
    ids, mask = padded_batch([torch.randint(0, V, (n,), generator=gen) for n in (12, 9)], "left")
    prefix = torch.tensor([5, 3])
    with torch.no_grad():
        probs = model(ids, mask, prefix_len=prefix, need_weights=True).attentions
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    for b in range(2):
        for i in range(12):
            if not mask[b, i]:
                continue
            expected = torch.tensor([bool(mask[b, j]) and (j <= i or int(pos[b, j]) < int(prefix[b]))
                                     for j in range(12)])
            for layer in probs:
                assert torch.equal(layer[b, :, i] > 0, expected.expand(layer.shape[1], 12)), (b, i)


def test_prefix_lm_reduces_to_decoder_and_encoder_at_the_extremes():
    """prefix_len = 0 is a plain decoder; prefix_len = T is an encoder; a prefix of P gives the prefix tokens the
    encoder's hidden states of the prefix alone (they see each other, nothing after)."""
    torch.manual_seed(0)
    plm = randomize_(Transformer(nano(kind="prefix_lm"))).eval()
    sd = plm.state_dict()
    dec = Transformer(nano()).eval()
    dec.load_state_dict(sd)
    enc = Transformer(nano(kind="encoder", head="none")).eval()
    enc.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})
    x = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(plm(x, prefix_len=0).logits, dec(x).logits, **TOL)
        torch.testing.assert_close(plm(x, prefix_len=14).hidden_states, enc(x).hidden_states, **TOL)
        P = 6
        torch.testing.assert_close(plm(x, prefix_len=P).hidden_states[:, :P], enc(x[:, :P]).hidden_states, **TOL)
        # after the prefix it is not the encoder (it is causal there)
        assert (plm(x, prefix_len=P).hidden_states[:, P:-1] - enc(x).hidden_states[:, P:-1]).abs().max() > 1e-3

# ================================================================================================ MLA
def _shared_weights(sd: dict, n_layers: int) -> dict:
    """The names every HF Llama-family checkpoint maps the same way: embeddings, final norm, head, block norms."""
    m = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
         "head.proj.weight": sd["lm_head.weight"]}
    for i in range(n_layers):
        m[f"blocks.{i}.attn_norm.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        m[f"blocks.{i}.mlp_norm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
    return m


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0)


def _ds_config(q_lora: int | None, moe: bool, yarn: tuple[float, float] | None = None):
    """yarn: (mscale, mscale_all_dim) for a YaRN-scaled rope, as DeepSeek-V2/V3 checkpoints set them."""
    from transformers import DeepseekV3Config

    rope = {} if yarn is None else dict(rope_parameters=dict(
        YARN, rope_theta=10000.0, mscale=yarn[0], mscale_all_dim=yarn[1]))
    return DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        first_k_dense_replace=1 if moe else 2, kv_lora_rank=32, q_lora_rank=q_lora, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, rope_interleave=False,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="eager", **rope)


def _ds_to_llmlab(hf, q_lora: int | None, moe: bool, yarn: tuple[float, float] | None = None) -> Transformer:
    """Map DeepSeek-V3 weights by hand (llmlab.io.hf does not read DeepSeek): every tensor, no shared code."""
    rope = {} if yarn is None else dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16,
                                        yarn_mscale=yarn[0], yarn_mscale_all_dim=yarn[1])
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64, attention="mla",
                      q_lora_rank=q_lora or 0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, norm_eps=1e-6, rope_theta=hf.config.rope_parameters["rope_theta"], **rope,
                      **(dict(n_experts=4, moe_top_k=2, n_shared_experts=1, moe_hidden_dim=32, router="sigmoid",
                              moe_norm_topk=True, moe_every=2) if moe else {}))
    sd = hf.state_dict()
    m = _shared_weights(sd, 2)
    for i in range(2):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        if q_lora:
            m[o + "attn.q_down.weight"] = sd[a + "q_a_proj.weight"]
            m[o + "attn.q_norm.weight"] = sd[a + "q_a_layernorm.weight"]
            m[o + "attn.q_up.weight"] = sd[a + "q_b_proj.weight"]
        else:
            m[o + "attn.q_proj.weight"] = sd[a + "q_proj.weight"]
        m[o + "attn.kv_down.weight"] = sd[a + "kv_a_proj_with_mqa.weight"]
        m[o + "attn.kv_norm.weight"] = sd[a + "kv_a_layernorm.weight"]
        m[o + "attn.kv_up.weight"] = sd[a + "kv_b_proj.weight"]
        m[o + "attn.out.weight"] = sd[a + "o_proj.weight"]
        if moe and i == 1:
            m[o + "mlp.router.weight"] = sd[p + "mlp.gate.weight"]
            for e in range(4):
                m[o + f"mlp.experts.{e}.up.weight"] = sd[p + "mlp.experts.gate_up_proj"][e]
                m[o + f"mlp.experts.{e}.down.weight"] = sd[p + "mlp.experts.down_proj"][e]
            s = p + "mlp.shared_experts."
            m[o + "mlp.shared.up.weight"] = torch.cat((sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]))
            m[o + "mlp.shared.down.weight"] = sd[s + "down_proj.weight"]
        else:
            m[o + "mlp.up.weight"] = torch.cat((sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]))
            m[o + "mlp.down.weight"] = sd[p + "mlp.down_proj.weight"]
    ours = Transformer(cfg).eval()
    ours.load_state_dict(m, strict=True)
    assert cfg.num_parameters() == sum(t.numel() for k, t in sd.items() if "e_score_correction_bias" not in k)
    return ours


@pytest.mark.parametrize("q_lora,moe,yarn", [(None, False, None), (24, False, None), (24, True, None),
                                             (None, False, (0.707, 0.707)), (None, False, (1.0, 0.5))],
                         ids=["mla", "mla_q_lora", "mla_q_lora_sigmoid_moe_shared_every2", "mla_yarn_v2_lite",
                              "mla_yarn_softmax_temperature"])
def test_mla_and_moe_match_deepseek_v3_and_the_cache_holds_the_latent(q_lora, moe, yarn):
    """DeepSeek-V3 (transformers) as the reference for MLA (low-rank joint KV, decoupled RoPE key, optional
    low-rank query) and for the sigmoid router with normalized top-k weights, a shared expert and MoE on every
    2nd layer; and for YaRN as DeepSeek weighs it (mscale on cos/sin, mscale_all_dim² on the softmax scale of
    every dim). The cache: per layer, the normalized latent c_kv and the rotated shared key, exactly what
    DeepSeek caches, and nothing per head."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV3ForCausalLM, DynamicCache

    torch.manual_seed(0)
    hf_cfg = _ds_config(q_lora, moe, yarn)
    hf = randomize_(DeepseekV3ForCausalLM(hf_cfg)).eval()
    ours = _ds_to_llmlab(hf, q_lora, moe, yarn)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_cache = DynamicCache(config=hf_cfg)
        ref = hf(ids, cache=hf_cache, use_cache=True).logits
        cache = KVCache()
        out = ours(ids, cache=cache).logits
    torch.testing.assert_close(out, ref, **TOL)
    for i in range(2):
        latent, k_rot = cache.layers[i]
        assert latent.shape == (2, 1, 12, 32) and k_rot.shape == (2, 1, 12, 8)
        torch.testing.assert_close(latent, hf_cache.layers[i].keys, **TOL)
        torch.testing.assert_close(k_rot, hf_cache.layers[i].values, **TOL)
    # decoding through the latent cache gives the full forward's logits
    with torch.no_grad():
        cache = KVCache()
        steps = [ours(ids[:, :7], cache=cache).logits] + [ours(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=2e-5, rtol=1e-5)


def test_mla_cache_is_the_normalized_down_projection():
    model = randomize_(build(**MLA))
    x = torch.randint(0, V, (2, 9))
    inputs = []
    model.blocks[1].attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    cache = KVCache()
    with torch.no_grad():
        model(x, cache=cache)
        attn = model.blocks[1].attn
        down = inputs[0] @ attn.kv_down.weight.T
        c = down[..., :32]
        expected = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.kv_norm.weight
    torch.testing.assert_close(cache.layers[1][0][:, 0], expected, **TOL)
    assert cache.nbytes() == 2 * 9 * model.cfg.n_layers * (32 + 8) * 4  # latent + rope key, whatever the heads

# ================================================================================================ QK-norm, MQA
def test_qk_norm_matches_qwen3():
    """Qwen3 (transformers): RMSNorm over each head's q and k, before RoPE. Weights mapped by hand."""
    pytest.importorskip("transformers")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hf = randomize_(Qwen3ForCausalLM(Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager"))).eval()
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
                      qk_norm=True, norm_eps=1e-6, rope_theta=hf.config.rope_parameters["rope_theta"])
    sd = hf.state_dict()
    m = _shared_weights(sd, 2)
    for i in range(2):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        m[o + "attn.qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
        m[o + "attn.out.weight"] = sd[a + "o_proj.weight"]
        m[o + "attn.q_norm.weight"] = sd[a + "q_norm.weight"]
        m[o + "attn.k_norm.weight"] = sd[a + "k_norm.weight"]
        m[o + "mlp.up.weight"] = torch.cat((sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]))
        m[o + "mlp.down.weight"] = sd[p + "mlp.down_proj.weight"]
    ours = Transformer(cfg).eval()
    ours.load_state_dict(m, strict=True)
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def test_mqa_matches_llama_with_one_kv_head():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmlab.io import config_from_hf, state_dict_from_hf

    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None,
        eos_token_id=None, pad_token_id=None))).eval()
    raw = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cfg = config_from_hf(raw)
    assert cfg.n_kv_heads == 1
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, raw))
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)
