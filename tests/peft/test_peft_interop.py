"""Interop with the real `peft` library (the oracle): adapters we save load into PeftModel with the same logits,
and adapters PEFT saves load into ours with the same logits. Tiny random HF models (GQA), no downloads."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmlab.io import config_from_hf, state_dict_from_hf  # noqa: E402
from llmlab.model import Transformer  # noqa: E402
from llmlab.peft import LoraConfig, add_lora, load_adapter, lora_state_dict, save_adapter, set_adapter  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB, B, T = 96, 2, 12
TOL = dict(atol=1e-4, rtol=1e-4)
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
ALL = ("q", "k", "v", "o", "gate", "up", "down")
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.copy_(0.15 * noise if p.dim() >= 2 else (1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise))
    return model.eval()


def hf_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**SHAPE, rms_norm_eps=1e-6))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**SHAPE, rms_norm_eps=1e-6, tie_word_embeddings=False))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    return randomize_(m, seed)


def ours_from(hf) -> Transformer:
    config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    cfg = config_from_hf(config)
    model = Transformer(cfg)
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, config), strict=True)
    return model.eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapter_(model, name="default", seed=3):
    """Non-zero B (and a perturbed DoRA magnitude), so that every tensor's mapping shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for k, t in sorted(lora_state_dict(model, name).items()):
        if k.endswith("lora_B") or k.endswith("lora_A"):
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
        elif k.endswith("lora_magnitude"):
            t.mul_(1 + 0.1 * torch.randn(t.shape, generator=g))


@torch.no_grad()
def randomize_peft_(pm, seed=4):
    g = torch.Generator().manual_seed(seed)
    for n, p in sorted(pm.named_parameters()):
        if "lora_A" in n or "lora_B" in n:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif "lora_magnitude_vector" in n:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits


# ------------------------------------------------------------------------------------------ ours -> PEFT
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_our_adapter_loads_into_peft(tmp_path, kind, dora):
    hf = hf_model(kind)
    ours = ours_from(hf)
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(hf, x), **TOL)
    add_lora(ours, LoraConfig(r=4, alpha=8, target_modules=ALL, use_dora=dora, use_rslora=dora))
    randomize_adapter_(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-random")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(HF_ALL)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"] is dora
    assert not set(config) - set(peft.LoraConfig().to_dict()), "a field PEFT does not know"
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight" in keys
    assert ("base_model.model.model.layers.0.mlp.gate_proj.lora_magnitude_vector" in keys) is dora

    expected = logits(ours, x)
    assert not torch.allclose(expected, logits(hf, x), atol=1e-3)  # the adapter does something
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)


# ------------------------------------------------------------------------------------------ PEFT -> ours
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_into_ours(tmp_path, kind, dora):
    hf = hf_model(kind, seed=1)
    ours = ours_from(hf)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=HF_ALL, use_dora=dora,
                                                 task_type="CAUSAL_LM"))
    randomize_peft_(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    x = ids(2)
    expected = logits(pm, x)

    with pm.disable_adapter():
        assert not torch.allclose(expected, logits(pm, x), atol=1e-3)  # the adapter does something
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, x), expected, **TOL)
    set_adapter(ours, None)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(ours, x), logits(pm, x), **TOL)


def test_peft_adapter_on_some_modules_and_rslora_roundtrip(tmp_path):
    """A subset of modules (attention q and v only; PEFT's classic default) with rsLoRA, PEFT -> ours -> saved
    again -> PEFT: the same logits all the way."""
    hf = hf_model("llama", seed=2)
    ours = ours_from(hf)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                                 use_rslora=True))
    randomize_peft_(pm, seed=5)
    pm.eval().save_pretrained(str(tmp_path / "a"))
    x = ids(3)
    expected = logits(pm, x)
    load_adapter(ours, tmp_path / "a", name="mine")
    torch.testing.assert_close(logits(ours, x), expected, **TOL)
    save_adapter(ours, tmp_path / "b", name="mine")
    assert sorted(json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"]) == \
        ["q_proj", "v_proj"]
    pm2 = peft.PeftModel.from_pretrained(hf_model("llama", seed=2), str(tmp_path / "b")).eval()
    torch.testing.assert_close(logits(pm2, x), expected, **TOL)


def test_our_adapter_on_some_layers_writes_an_exact_regex(tmp_path):
    """Targets chosen by our regex (only block 1's attention output): PEFT must adapt exactly that module."""
    hf = hf_model("llama", seed=3)
    ours = ours_from(hf)
    add_lora(ours, LoraConfig(r=2, target_modules=(r"blocks\.1\.attn\.out",)))
    randomize_adapter_(ours)
    save_adapter(ours, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert [n for n, _ in pm.named_modules() if n.endswith("lora_A")] == \
        ["base_model.model.model.layers.1.self_attn.o_proj.lora_A"]
    x = ids(4)
    torch.testing.assert_close(logits(pm, x), logits(ours, x), **TOL)


# ------------------------------------------------------------------------------------------ GPT-2 (Conv1D)
def test_gpt2_fused_c_attn_both_directions(tmp_path):
    """GPT-2 keeps c_attn fused (Conv1D, fan_in_fan_out): our whole-qkv LoRA is PEFT's c_attn LoRA."""
    hf = hf_model("gpt2", seed=4)
    ours = ours_from(hf)
    x = ids(5)
    torch.testing.assert_close(logits(ours, x), logits(hf, x), **TOL)
    add_lora(ours, LoraConfig(r=4, target_modules=("attn.qkv", "attn.out", "up", "down")))
    randomize_adapter_(ours)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(pm, x), logits(ours, x), **TOL)

    hf2 = hf_model("gpt2", seed=5)
    ours2 = ours_from(hf2)
    pm2 = peft.get_peft_model(hf2, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                   fan_in_fan_out=True))
    randomize_peft_(pm2)
    pm2.eval().save_pretrained(str(tmp_path / "peft"))
    load_adapter(ours2, tmp_path / "peft")
    torch.testing.assert_close(logits(ours2, x), logits(pm2, x), **TOL)


# ------------------------------------------------------------------------------------------ errors
def test_load_errors_name_the_module(tmp_path):
    hf = hf_model("llama", seed=6)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["k_proj"]))
    pm.save_pretrained(str(tmp_path))
    # a base model with a different shape: k_proj has other dimensions
    other = hf_model("llama", seed=6)
    other_cfg = {**other.config.to_dict(), "architectures": ["LlamaForCausalLM"], "num_key_value_heads": 4}
    ours = Transformer(config_from_hf(other_cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.lora_B.*needs"):
        load_adapter(ours, tmp_path)
    # a tensor for a module the model does not have
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    sd = {k.replace("layers.1.", "layers.7."): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.7\.self_attn\.k_proj.*does not exist"):
        load_adapter(ours_from(hf_model("llama", seed=6)), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(ours, tmp_path / "missing")


def test_save_rejects_a_fused_whole_layer_without_peft_equivalent(tmp_path):
    ours = ours_from(hf_model("llama"))
    add_lora(ours, LoraConfig(r=2, target_modules=("attn.qkv",)))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv part 'all'.*no PEFT equivalent"):
        save_adapter(ours, tmp_path)
