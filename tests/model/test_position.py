"""Position encodings: RoPE (and its context-extension scalings), ALiBi slopes, sinusoidal and learned tables.

Closed forms are written out here from the papers, independently of llmlab.model.position; the scalings are
also checked against transformers' own implementation (ROPE_INIT_FUNCTIONS).
"""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.model.position import Rotary, alibi_slopes, apply_rotary, rope_inv_freq, sinusoidal_table

SCALINGS = ("linear", "ntk", "dynamic_ntk", "yarn", "llama3")


def rope_cfg(head_dim: int = 64, **overrides) -> ModelConfig:
    """A nano config with two heads of `head_dim` (the model is never built by most tests)."""
    return ModelConfig.preset("nano", dim=2 * head_dim, n_heads=2, n_kv_heads=2, **overrides)


def plain_inv_freq(d: int, base: float) -> torch.Tensor:
    """Su et al. 2021: θ_i = base^(-2i/d), i in [0, d/2), in float64."""
    return torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_rope_scores_depend_only_on_relative_offset(partial, scaling):
    cfg = rope_cfg(head_dim=32, partial_rotary_factor=partial, rope_scaling=scaling,
                   rope_factor=4.0 if scaling == "yarn" else 1.0)
    assert cfg.rotary_dim == int(32 * partial)
    rotary = Rotary(cfg)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 32, generator=gen)
    k = torch.randn(1, 1, 1, 32, generator=gen)

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rotary(torch.tensor([[m]]), torch.float32)
        cos_n, sin_n = rotary(torch.tensor([[n]]), torch.float32)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    for m, n in [(0, 0), (3, 0), (0, 7), (5, 2), (17, 40)]:
        ref = score(m, n)
        for s in (1, 13, 100):
            torch.testing.assert_close(score(m + s, n + s), ref, rtol=1e-4, atol=1e-4)
    # and the score does depend on the offset (otherwise the check above would be vacuous)
    assert not torch.allclose(score(5, 2), score(5, 3), rtol=1e-3, atol=1e-3)


def test_partial_rotary_leaves_the_pass_through_dims_alone():
    cfg = rope_cfg(head_dim=32, partial_rotary_factor=0.5)
    cos, sin = Rotary(cfg)(torch.arange(6)[None], torch.float32)
    x = torch.randn(1, 2, 6, 32, generator=torch.Generator().manual_seed(1))
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 16:], x[..., 16:])
    assert not torch.allclose(y[..., 1:, :16], x[..., 1:, :16])
    # a rotation: each (i, i + d/2) pair keeps its norm
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:16] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))


def test_plain_inv_freq_closed_form():
    cfg = rope_cfg(head_dim=64, rope_theta=500000.0)
    inv, scale = rope_inv_freq(cfg)
    assert inv.dtype == torch.float32 and inv.shape == (32,)
    torch.testing.assert_close(inv, plain_inv_freq(64, 500000.0).float())
    assert scale == 1.0


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("extra", [{}, {"partial_rotary_factor": 0.5},
                                   {"rope_original_max_seq_len": 4096, "max_seq_len": 8192, "rope_theta": 5e5}])
def test_every_scaling_with_factor_one_is_plain_rope(scaling, extra):
    plain_inv, plain_scale = rope_inv_freq(rope_cfg(**extra))
    inv, scale = rope_inv_freq(rope_cfg(rope_scaling=scaling, rope_factor=1.0, **extra))
    assert torch.equal(inv, plain_inv)
    assert scale == plain_scale == 1.0


def test_dynamic_ntk_is_plain_up_to_the_original_length():
    cfg = rope_cfg(rope_scaling="dynamic_ntk", rope_factor=4.0, rope_original_max_seq_len=128, max_seq_len=512)
    plain, _ = rope_inv_freq(rope_cfg(max_seq_len=512, rope_original_max_seq_len=128))
    for L in (None, 1, 64, 127, 128):
        inv, scale = rope_inv_freq(cfg, L)
        assert torch.equal(inv, plain) and scale == 1.0
    assert not torch.allclose(rope_inv_freq(cfg, 129)[0], plain)


# closed forms ---------------------------------------------------------------------------------------
def test_linear_closed_form():
    cfg = rope_cfg(rope_scaling="linear", rope_factor=4.0)
    torch.testing.assert_close(rope_inv_freq(cfg)[0], (plain_inv_freq(64, 10000.0) / 4.0).float())
    assert rope_inv_freq(cfg)[1] == 1.0


@pytest.mark.parametrize("head_dim,partial", [(64, 1.0), (64, 0.5)])
def test_ntk_closed_form(head_dim, partial):
    s = 8.0
    cfg = rope_cfg(head_dim, rope_scaling="ntk", rope_factor=s, partial_rotary_factor=partial)
    d = int(head_dim * partial)
    base = 10000.0 * s ** (d / (d - 2))
    torch.testing.assert_close(rope_inv_freq(cfg)[0], plain_inv_freq(d, base).float())
    # the highest frequency is untouched, the lowest is divided by exactly s (the point of the d/(d-2) exponent)
    inv = rope_inv_freq(cfg)[0].double()
    ref = plain_inv_freq(d, 10000.0)
    assert inv[0] == 1.0
    torch.testing.assert_close(inv[-1], ref[-1] / s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("L", [129, 200, 1000])
def test_dynamic_ntk_closed_form(L):
    s, L0, d = 4.0, 128, 64
    cfg = rope_cfg(rope_scaling="dynamic_ntk", rope_factor=s, rope_original_max_seq_len=L0, max_seq_len=4096)
    base = 10000.0 * (s * L / L0 - (s - 1)) ** (d / (d - 2))
    inv, scale = rope_inv_freq(cfg, L)
    torch.testing.assert_close(inv, plain_inv_freq(d, base).float())
    assert scale == 1.0


def yarn_reference(d: int, base: float, s: float, L0: int, beta_fast: float, beta_slow: float):
    """YaRN (Peng et al. 2023, reference code jquesnelle/yarn): interpolate (θ/s) the dims whose wavelength
    fits fewer than beta_slow times into L0, keep (θ) those that fit more than beta_fast times, and blend by a
    linear ramp over the dimension index in between. Attention factor 0.1·ln(s) + 1."""

    def correction_dim(n_rot: float) -> float:  # i such that L0 / (2π base^(2i/d)) = n_rot
        return d * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep θ, 1: θ/s
        out.append(theta * (1 - ramp) + theta / s * ramp)
    return torch.tensor(out, dtype=torch.float64), 0.1 * math.log(s) + 1.0, (low, high)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_yarn_closed_form(partial):
    s, L0, base = 4.0, 4096, 10000.0
    cfg = rope_cfg(rope_scaling="yarn", rope_factor=s, rope_original_max_seq_len=L0, max_seq_len=4 * L0,
                   partial_rotary_factor=partial)
    d = cfg.rotary_dim
    ref, attn_factor, (low, high) = yarn_reference(d, base, s, L0, 32.0, 1.0)
    assert 0 < low < high < d // 2  # the three regimes (kept, blended, interpolated) are all present
    inv, scale = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, ref.float())
    assert scale == pytest.approx(attn_factor) and scale == pytest.approx(0.1 * math.log(4.0) + 1)
    plain = plain_inv_freq(d, base)
    assert torch.allclose(inv[:low].double(), plain[:low])
    torch.testing.assert_close(inv[high:].double(), plain[high:] / s, rtol=1e-6, atol=0)


def llama3_reference(d: int, base: float, s: float, L0: int, lo: float, hi: float) -> torch.Tensor:
    """Llama 3.1: wavelength λ = 2π/θ; λ < L0/hi keeps θ, λ > L0/lo uses θ/s, in between blends with
    smooth = (L0/λ - lo)/(hi - lo): (1 - smooth)·θ/s + smooth·θ."""
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        wavelen = 2 * math.pi / theta
        if wavelen < L0 / hi:
            out.append(theta)
        elif wavelen > L0 / lo:
            out.append(theta / s)
        else:
            smooth = (L0 / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * theta / s + smooth * theta)
    return torch.tensor(out, dtype=torch.float64)


def test_llama3_closed_form():
    s, L0, base = 8.0, 8192, 500000.0
    cfg = rope_cfg(rope_scaling="llama3", rope_factor=s, rope_original_max_seq_len=L0, max_seq_len=4 * L0,
                   rope_theta=base)
    d = cfg.rotary_dim
    wavelen = 2 * math.pi / plain_inv_freq(d, base)
    # all three bands are populated at these settings
    assert (wavelen < L0 / 4).any() and (wavelen > L0).any() and ((wavelen >= L0 / 4) & (wavelen <= L0)).any()
    inv, scale = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, llama3_reference(d, base, s, L0, 1.0, 4.0).float())
    assert scale == 1.0


# against transformers ------------------------------------------------------------------------------
def hf_inv_freq(rope_type: str, cfg: ModelConfig, max_position_embeddings: int, seq_len=None, **params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=cfg.dim, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_type=rope_type, rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
                             partial_rotary_factor=cfg.partial_rotary_factor, **params),
    )
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"), seq_len)
    return inv.float(), float(scale)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_linear_matches_transformers(partial):
    pytest.importorskip("transformers")
    cfg = rope_cfg(rope_scaling="linear", rope_factor=4.0, partial_rotary_factor=partial)
    inv, scale = rope_inv_freq(cfg)
    hf_inv, hf_scale = hf_inv_freq("linear", cfg, cfg.max_seq_len)
    torch.testing.assert_close(inv, hf_inv)
    assert scale == pytest.approx(hf_scale)


@pytest.mark.parametrize("L", [128, 300, 2048])
def test_dynamic_ntk_matches_transformers(L):
    pytest.importorskip("transformers")
    cfg = rope_cfg(rope_scaling="dynamic_ntk", rope_factor=4.0, rope_original_max_seq_len=128, max_seq_len=4096)
    inv, scale = rope_inv_freq(cfg, L)
    # transformers' "dynamic" measures the stretch against max_position_embeddings (= our original length)
    hf_inv, hf_scale = hf_inv_freq("dynamic", cfg, 128, seq_len=L)
    torch.testing.assert_close(inv, hf_inv)
    assert scale == pytest.approx(hf_scale)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("s,L0,betas", [(4.0, 4096, (32.0, 1.0)), (8.0, 2048, (16.0, 2.0)), (2.0, 128, (32.0, 1.0))])
def test_yarn_matches_transformers(partial, s, L0, betas):
    pytest.importorskip("transformers")
    cfg = rope_cfg(rope_scaling="yarn", rope_factor=s, rope_original_max_seq_len=L0, max_seq_len=int(s * L0),
                   partial_rotary_factor=partial, yarn_beta_fast=betas[0], yarn_beta_slow=betas[1])
    inv, scale = rope_inv_freq(cfg)
    hf_inv, hf_scale = hf_inv_freq("yarn", cfg, int(s * L0), original_max_position_embeddings=L0,
                                   beta_fast=betas[0], beta_slow=betas[1])
    torch.testing.assert_close(inv, hf_inv)
    assert scale == pytest.approx(hf_scale)


@pytest.mark.parametrize("mscale,all_dim", [(1.0, 1.0), (0.707, 0.707), (1.0, 0.5), (0.5, 0.0)])
def test_yarn_mscale_matches_transformers_and_deepseek(mscale, all_dim):
    """DeepSeek-V2/V3's YaRN weights: cos/sin by mscale(m)/mscale(m_all), mscale(m) = 0.1·m·ln(s) + 1."""
    pytest.importorskip("transformers")
    s = 40.0
    cfg = rope_cfg(rope_scaling="yarn", rope_factor=s, rope_original_max_seq_len=128, max_seq_len=int(s * 128),
                   yarn_mscale=mscale, yarn_mscale_all_dim=all_dim)
    inv, scale = rope_inv_freq(cfg)
    assert scale == pytest.approx((0.1 * mscale * math.log(s) + 1) / (0.1 * all_dim * math.log(s) + 1))
    if all_dim:  # transformers takes mscale only together with mscale_all_dim
        hf_inv, hf_scale = hf_inv_freq("yarn", cfg, int(s * 128), original_max_position_embeddings=128,
                                       mscale=mscale, mscale_all_dim=all_dim)
        torch.testing.assert_close(inv, hf_inv)
        assert scale == pytest.approx(hf_scale)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("s,L0,lo,hi,base", [(8.0, 8192, 1.0, 4.0, 500000.0), (4.0, 512, 1.0, 8.0, 10000.0)])
def test_llama3_matches_transformers(partial, s, L0, lo, hi, base):
    pytest.importorskip("transformers")
    cfg = rope_cfg(rope_scaling="llama3", rope_factor=s, rope_original_max_seq_len=L0, max_seq_len=int(s * L0),
                   rope_theta=base, partial_rotary_factor=partial, llama3_low_freq_factor=lo,
                   llama3_high_freq_factor=hi)
    inv, scale = rope_inv_freq(cfg)
    hf_inv, hf_scale = hf_inv_freq("llama3", cfg, int(s * L0), original_max_position_embeddings=L0,
                                   low_freq_factor=lo, high_freq_factor=hi)
    torch.testing.assert_close(inv, hf_inv)
    assert scale == pytest.approx(hf_scale)


# the Rotary module ---------------------------------------------------------------------------------
def expected_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float):
    angles = positions.double()[..., None] * inv_freq.double()
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_cos_sin_shape_and_values(partial):
    cfg = rope_cfg(head_dim=32, partial_rotary_factor=partial)
    positions = torch.stack((torch.arange(10), torch.arange(5, 15)))
    cos, sin = Rotary(cfg)(positions, torch.float32)
    assert cos.shape == sin.shape == (2, 1, 10, cfg.rotary_dim)
    exp_cos, exp_sin = expected_cos_sin(positions, plain_inv_freq(cfg.rotary_dim, 10000.0), 1.0)
    torch.testing.assert_close(cos, exp_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, exp_sin, rtol=1e-5, atol=1e-5)
    cos16, _ = Rotary(cfg)(positions, torch.float16)
    assert cos16.dtype == torch.float16


def test_rotary_applies_the_yarn_attention_factor():
    s = 4.0
    cfg = rope_cfg(head_dim=32, rope_scaling="yarn", rope_factor=s, rope_original_max_seq_len=64, max_seq_len=256)
    positions = torch.arange(200)[None]
    cos, sin = Rotary(cfg)(positions, torch.float32)
    mscale = 0.1 * math.log(s) + 1
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, mscale**2))
    exp_cos, exp_sin = expected_cos_sin(positions, yarn_reference(32, 10000.0, s, 64, 32.0, 1.0)[0], mscale)
    torch.testing.assert_close(cos, exp_cos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sin, exp_sin, rtol=1e-4, atol=1e-4)


def test_rotary_dynamic_ntk_recomputes_for_long_positions():
    s, L0, d = 2.0, 32, 32
    cfg = rope_cfg(head_dim=d, rope_scaling="dynamic_ntk", rope_factor=s, rope_original_max_seq_len=L0,
                   max_seq_len=256)
    rotary = Rotary(cfg)
    plain = Rotary(rope_cfg(head_dim=d, max_seq_len=256))
    short = torch.arange(L0)[None]  # max position L0 - 1: sequence length L0, no change
    for a, b in zip(rotary(short, torch.float32), plain(short, torch.float32)):
        assert torch.equal(a, b)
    L = 100
    long = torch.arange(L)[None]
    cos, sin = rotary(long, torch.float32)
    base = 10000.0 * (s * L / L0 - (s - 1)) ** (d / (d - 2))
    exp_cos, exp_sin = expected_cos_sin(long, plain_inv_freq(d, base), 1.0)
    torch.testing.assert_close(cos, exp_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, exp_sin, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cos, plain(long, torch.float32)[0], atol=1e-3)
    # the length that counts is the largest position (e.g. a decode step late in a cached sequence)
    step = torch.tensor([[L - 1]])
    torch.testing.assert_close(rotary(step, torch.float32)[0], cos[:, :, -1:], rtol=1e-5, atol=1e-5)
    # the cached frequencies were not overwritten
    torch.testing.assert_close(rotary.inv_freq, plain.inv_freq, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_alibi_slopes_power_of_two(n):
    expected = torch.tensor([2.0 ** (-8 * i / n) for i in range(1, n + 1)])
    torch.testing.assert_close(alibi_slopes(n), expected)


def test_alibi_slopes_non_power_of_two_closed_form():
    # Press et al. 2022: the 4 slopes for 4 heads, then every other slope of 8 heads (2^-1, 2^-3)
    expected6 = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected6))
    # 12 heads: 8 slopes 2^(-i), then 2^(-0.5), 2^(-1.5), 2^(-2.5), 2^(-3.5) from the 16-head sequence
    expected12 = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected12))


@pytest.mark.parametrize("n", [3, 5, 6, 8, 12, 20])
def test_alibi_slopes_match_bloom(n):
    pytest.importorskip("transformers")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's bias for key position 1 is slope·1: [batch·heads, 1, seq]
    bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(n), bloom)


# -------------------------------------------------------------------------------------- absolute tables
@pytest.mark.parametrize("dim", [8, 64, 7])
def test_sinusoidal_table_closed_form(dim):
    n = 50
    table = sinusoidal_table(n, dim)
    assert table.shape == (n, dim) and table.dtype == torch.float32
    expected = torch.zeros(n, dim, dtype=torch.float64)
    for p in range(n):
        for j in range(dim):
            i = j // 2
            angle = p / 10000.0 ** (2 * i / dim)
            expected[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    torch.testing.assert_close(table, expected.float())


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_absolute_positions_reject_inputs_longer_than_max_seq_len(position):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", position=position, max_seq_len=16)
    model = Transformer(cfg).eval()
    ok = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert ok.logits.shape == (2, 16, cfg.vocab_size)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, cfg.vocab_size, (2, 17)))
    with pytest.raises(ValueError, match="max_seq_len"):  # explicit position ids past the table
        model(torch.randint(0, cfg.vocab_size, (1, 4)), position_ids=torch.tensor([[0, 1, 2, 16]]))


def test_sinusoidal_model_adds_the_table():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", position="sinusoidal", n_layers=1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    captured = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    model(ids)
    assert len(captured) == 1
    torch.testing.assert_close(captured[0], model.tok_emb(ids) + sinusoidal_table(10, cfg.dim)[None])
