import json

import pytest

from llmlab.model import PRESETS, ModelConfig


def test_presets_build_and_round_trip_through_json(tmp_path):
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        path = tmp_path / f"{name}.json"
        cfg.to_json(path)
        assert ModelConfig.from_json(path) == cfg
        assert ModelConfig.from_json(cfg.to_json()) == cfg
        assert json.loads(path.read_text())["dim"] == cfg.dim


def test_preset_overrides_and_derived_defaults():
    cfg = ModelConfig.preset("nano", n_kv_heads=None, hidden_dim=None, dim=96, n_heads=3)
    assert cfg.n_kv_heads == 3 and cfg.head_dim == 32
    assert cfg.hidden_dim == 256  # 8/3 · 96 = 256 (gated), a multiple of 64
    assert ModelConfig(dim=96, n_heads=3, activation="gelu").hidden_dim == 384  # 4 · dim
    assert ModelConfig(rope_original_max_seq_len=None, max_seq_len=77).rope_original_max_seq_len == 77


def test_depth_dial_derives_width_heads_and_hidden():
    for depth in (2, 4, 6, 12):
        cfg = ModelConfig.from_depth(depth)
        assert cfg.n_layers == depth and cfg.dim == 64 * depth and cfg.head_dim == 64
        assert cfg.n_heads % cfg.n_kv_heads == 0
        assert cfg.hidden_dim % 64 == 0 and cfg.hidden_dim >= 8 / 3 * cfg.dim
    assert ModelConfig.from_depth(4).num_parameters() < ModelConfig.from_depth(8).num_parameters()
    with pytest.raises(ValueError, match="depth"):
        ModelConfig.from_depth(0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=100, n_heads=3), ["dim=100", "n_heads=3"]),
        (dict(n_heads=6, n_kv_heads=4), ["n_kv_heads=4", "valid n_kv_heads", "[1, 2, 3, 6]"]),
        (dict(activation="swish"), ["activation", "swish", "swiglu"]),
        (dict(attn_backend="xformers"), ["attn_backend", "sdpa", "math", "flash"]),
        (dict(position="rotary"), ["position", "rope", "alibi"]),
        (dict(rope_scaling="ntk", position="learned"), ["rope_scaling", "position='rope'"]),
        (dict(kind="encoder", head="lm"), ["encoder", "mlm"]),
        (dict(n_experts=4, moe_top_k=5), ["moe_top_k=5"]),
        (dict(attention="mla"), ["mla", "kv_lora_rank"]),
        (dict(attn_backend="flash", attn_dropout=0.1), ["attn_dropout", "flash"]),
        (dict(partial_rotary_factor=0.01), ["rotary_dim"]),
        (dict(rope_scaling="yarn", rope_factor=4.0, yarn_mscale_all_dim=-1.0), ["yarn_mscale_all_dim", ">= 0"]),
    ],
)
def test_invalid_configs_name_the_field_and_the_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_keys_name_the_closest_field():
    with pytest.raises(ValueError, match="did you mean 'n_kv_heads'"):
        ModelConfig.from_dict({"n_kv_head": 2})
    with pytest.raises(ValueError, match="unknown preset 'tiny'.*nano"):
        ModelConfig.preset("tiny")


def test_mla_dimensions():
    cfg = ModelConfig(attention="mla", kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24)
    assert cfg.qk_head_dim == 48 and cfg.value_head_dim == 24 and cfg.rotary_dim == 16
