"""Hugging Face directories in and out: Llama, Qwen2, Mistral, GPT-2 and BERT.

Configs are plain dicts (the contents of config.json); tensors are mapped by one table per family
(`_rules`), read in one direction by `state_dict_from_hf` and in the other by `state_dict_to_hf`, so import
and export cannot drift apart. Layout differences the table encodes:

  * our attention has one fused `qkv` Linear: rows are the q heads, then the k heads, then the v heads;
  * our gated MLP has one fused `up` Linear whose output is [gate ; up];
  * GPT-2's Conv1D stores weights as [in, out], nn.Linear as [out, in];
  * HF Llama-family checkpoints use the rotate-half RoPE layout, as we do: no permutation.

transformers itself is never imported here: it is only the test oracle.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.model import ModelConfig, Transformer

from .checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointError,
    TensorFiles,
    _few,
    atomic_directory,
    build_model,
    read_json,
    resolve,
    write_safetensors,
)

StateDict = dict[str, torch.Tensor]

# architecture -> family; the first architecture of each family is the default when config.json names none
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "GPT2LMHeadModel": "gpt2",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForSequenceClassification": "bert",
}
_BERT_HEADS = {"BertModel": "none", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "classification"}
_LLAMA_LIKE = ("llama", "qwen2", "mistral")

# HF activation names -> llmlab (plain MLPs; gated MLPs below). Export uses the first name of each.
_PLAIN_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
              "silu": "silu", "swish": "silu"}
_GATED_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}

# Tensors HF checkpoints carry that are not weights: old rotary caches, GPT-2 causal-mask buffers, BERT id buffers.
_NOT_WEIGHTS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.(masked_)?bias|embeddings\.(position_ids|token_type_ids))$")


def supported() -> str:
    return ", ".join(f"{a} ({f})" for a, f in ARCHITECTURES.items())


# ============================================================================================ configs in
def _architecture(c: Mapping[str, Any]) -> tuple[str, str]:
    """(architecture, family) of a config.json dict, or an error naming what is unsupported."""
    model_type = c.get("model_type")
    families = dict.fromkeys(ARCHITECTURES.values())
    if model_type not in families:
        raise CheckpointError(f"model_type={model_type!r} is not supported; llmlab.io.hf reads {', '.join(families)} "
                              f"({supported()})")
    archs = c.get("architectures") or [next(a for a, f in ARCHITECTURES.items() if f == model_type)]
    arch = archs[0]
    if ARCHITECTURES.get(arch) != model_type:
        raise CheckpointError(f"architecture {arch!r} (model_type={model_type!r}) is not supported; "
                              f"supported: {supported()}")
    return arch, model_type


def _need(c: Mapping[str, Any], key: str, family: str) -> Any:
    if c.get(key) is None:
        raise CheckpointError(f"config.json of a {family} model needs {key!r}")
    return c[key]


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (as a dict)."""
    arch, family = _architecture(hf_config)
    if family in _LLAMA_LIKE:
        return _llama_like_config(hf_config, family)
    if family == "gpt2":
        return _gpt2_config(hf_config)
    return _bert_config(hf_config, _BERT_HEADS[arch])


def _rope_options(c: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters` (rope_theta inside); older configs use a
    top-level `rope_theta` and `rope_scaling` (with "type" or "rope_type"). Both are read."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"per-layer-type rope_parameters are not supported: {params}")
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = dict(rope_theta=float(params.get("rope_theta", c.get("rope_theta", 10000.0))))
    prf = params.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):  # transformers' Llama/Qwen2/Mistral rotate the whole head
        raise CheckpointError(f"partial_rotary_factor={prf} is not supported for these architectures")
    max_pos = c["max_position_embeddings"]
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings", c.get("original_max_position_embeddings", max_pos))
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(factor)}
    if kind == "dynamic":  # transformers rescales once the sequence exceeds max_position_embeddings
        return {**out, "rope_scaling": "dynamic_ntk", "rope_factor": float(factor),
                "rope_original_max_seq_len": max_pos}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(factor), "rope_original_max_seq_len": original,
                "llama3_low_freq_factor": float(params["low_freq_factor"]),
                "llama3_high_freq_factor": float(params["high_freq_factor"])}
    if kind == "yarn":
        if params.get("attention_factor"):
            raise CheckpointError("YaRN option attention_factor has no ModelConfig field; llmlab cannot load it")
        if params.get("truncate", True) is False:
            raise CheckpointError("YaRN option truncate=False has no ModelConfig field; llmlab cannot load it")
        factor = factor if factor is not None else max_pos / original  # DeepSeek-V3 style: the context ratio
        # transformers weighs by mscale only together with mscale_all_dim (else the plain 0.1·ln(s) + 1)
        mscale, all_dim = float(params.get("mscale") or 0), float(params.get("mscale_all_dim") or 0)
        return {**out, "rope_scaling": "yarn", "rope_factor": float(factor), "rope_original_max_seq_len": original,
                "yarn_beta_fast": float(params.get("beta_fast") or 32),
                "yarn_beta_slow": float(params.get("beta_slow") or 1),
                "yarn_mscale": mscale if mscale and all_dim else 1.0, "yarn_mscale_all_dim": all_dim}
    raise CheckpointError(f"rope_type={kind!r} is not supported; supported: default, linear, dynamic, yarn, llama3")


def _llama_like_config(c: Mapping[str, Any], family: str) -> ModelConfig:
    n_layers = _need(c, "num_hidden_layers", family)
    window = None
    if family == "mistral":
        window = c.get("sliding_window", 4096)  # transformers' MistralConfig default when the key is absent
    elif family == "qwen2" and c.get("use_sliding_window"):
        window = c.get("sliding_window", 4096)
    layer_types = c.get("layer_types")
    if family == "qwen2" and layer_types is None:  # what Qwen2Config derives: sliding from max_window_layers on
        first = c.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(n_layers)]
    if layer_types is not None and family != "mistral":  # Mistral applies its window to every layer
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            window = None
        elif kinds != {"sliding_attention"}:
            raise CheckpointError(f"a mix of sliding and full attention layers is not supported: {layer_types}")
    act = c.get("hidden_act", "silu")
    if act not in _GATED_ACT:
        raise CheckpointError(f"hidden_act={act!r} has no gated llmlab activation; supported: {', '.join(_GATED_ACT)}")
    if family == "llama":
        qkv_bias = out_bias = bool(c.get("attention_bias", False))
        mlp_bias = bool(c.get("mlp_bias", False))
    else:  # Qwen2 biases q/k/v only; Mistral has no biases
        qkv_bias, out_bias, mlp_bias = family == "qwen2", False, False
    dim, n_heads = _need(c, "hidden_size", family), _need(c, "num_attention_heads", family)
    _need(c, "max_position_embeddings", family)
    return ModelConfig(
        kind="decoder", vocab_size=_need(c, "vocab_size", family), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=c.get("head_dim") or dim // n_heads,
        hidden_dim=_need(c, "intermediate_size", family), max_seq_len=c["max_position_embeddings"],
        sliding_window=window, position="rope", **_rope_options(c), norm="rmsnorm", norm_placement="pre",
        norm_eps=c.get("rms_norm_eps", 1e-6), activation=_GATED_ACT[act],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, attn_out_bias=out_bias,
        mlp_bias=mlp_bias, head="lm", attn_dropout=float(c.get("attention_dropout", 0.0)), dropout=0.0,
        pad_token_id=c.get("pad_token_id"),
    )


def _gpt2_config(c: Mapping[str, Any]) -> ModelConfig:
    if c.get("scale_attn_by_inverse_layer_idx", False) or not c.get("scale_attn_weights", True):
        raise CheckpointError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if c.get("add_cross_attention", False):
        raise CheckpointError("GPT-2 cross-attention is not supported")
    act = c.get("activation_function", "gelu_new")
    if act not in _PLAIN_ACT:
        raise CheckpointError(f"activation_function={act!r} is not supported; supported: {', '.join(_PLAIN_ACT)}")
    dim = _need(c, "n_embd", "gpt2")
    return ModelConfig(
        kind="decoder", vocab_size=_need(c, "vocab_size", "gpt2"), dim=dim, n_layers=_need(c, "n_layer", "gpt2"),
        n_heads=_need(c, "n_head", "gpt2"), hidden_dim=c.get("n_inner") or 4 * dim,
        max_seq_len=_need(c, "n_positions", "gpt2"), position="learned", norm="layernorm", norm_bias=True,
        norm_placement="pre", norm_eps=c.get("layer_norm_epsilon", 1e-5), activation=_PLAIN_ACT[act],
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        head="lm", dropout=float(c.get("resid_pdrop", 0.1)), attn_dropout=float(c.get("attn_pdrop", 0.1)),
        pad_token_id=c.get("pad_token_id"),
    )


def _bert_config(c: Mapping[str, Any], head: str) -> ModelConfig:
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"BERT position_embedding_type={c['position_embedding_type']!r} is not supported; "
                              "only 'absolute'")
    if c.get("is_decoder", False) or c.get("add_cross_attention", False):
        raise CheckpointError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
    act = c.get("hidden_act", "gelu")
    if act not in _PLAIN_ACT:
        raise CheckpointError(f"hidden_act={act!r} is not supported; supported: {', '.join(_PLAIN_ACT)}")
    hidden_dropout = float(c.get("hidden_dropout_prob", 0.1))
    extra: dict[str, Any] = {}
    if head == "classification":
        n_labels = len(c["id2label"]) if c.get("id2label") else c.get("num_labels", 2)
        cls_dropout = c.get("classifier_dropout")
        extra = dict(n_labels=n_labels, classifier_pooler=True, pooling="cls",
                     classifier_dropout=float(hidden_dropout if cls_dropout is None else cls_dropout))
    return ModelConfig(
        kind="encoder", vocab_size=_need(c, "vocab_size", "bert"), dim=_need(c, "hidden_size", "bert"),
        n_layers=_need(c, "num_hidden_layers", "bert"), n_heads=_need(c, "num_attention_heads", "bert"),
        hidden_dim=_need(c, "intermediate_size", "bert"), max_seq_len=_need(c, "max_position_embeddings", "bert"),
        n_token_types=c.get("type_vocab_size", 2), position="learned", norm="layernorm", norm_bias=True,
        norm_placement="post", norm_eps=c.get("layer_norm_eps", 1e-12), embed_norm=True, activation=_PLAIN_ACT[act],
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=head == "mlm" and bool(c.get("tie_word_embeddings", True)), head=head,
        dropout=hidden_dropout, attn_dropout=float(c.get("attention_probs_dropout_prob", 0.1)),
        pad_token_id=c.get("pad_token_id", 0), **extra,
    )


# ============================================================================================ configs out
def _family_of(cfg: ModelConfig) -> str:
    """The Hugging Face family a ModelConfig exports to (checked in full by config_to_hf)."""
    if cfg.kind == "encoder":
        return "bert"
    if cfg.position == "learned":
        return "gpt2"
    if cfg.position == "rope":
        if cfg.qkv_bias and not cfg.attn_out_bias and not cfg.mlp_bias:
            return "qwen2"
        return "mistral" if cfg.sliding_window is not None else "llama"
    raise CheckpointError(f"no supported Hugging Face architecture has kind={cfg.kind!r} with position="
                          f"{cfg.position!r}; exportable: {supported()}")


def _require(cfg: ModelConfig, target: str, **expected: Any) -> None:
    """Every field listed must have the given value (or one of a tuple of values)."""
    bad = [f"{k}={getattr(cfg, k)!r} (needs {' or '.join(map(repr, v)) if isinstance(v, tuple) else repr(v)})"
           for k, v in expected.items() if getattr(cfg, k) not in (v if isinstance(v, tuple) else (v,))]
    if bad:
        raise CheckpointError(f"this ModelConfig cannot be exported as {target}: {'; '.join(bad)}")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers reads as the same architecture (see `supported()`)."""
    family = _family_of(cfg)
    common = dict(attention="standard", n_experts=0, qk_norm=False, embed_scale=1.0, lm_head_bias=False)
    if family == "bert":
        return _bert_to_hf(cfg, common)
    if family == "gpt2":
        _require(cfg, "GPT2LMHeadModel", **common, kind="decoder", norm="layernorm", norm_bias=True,
                 norm_placement="pre", embed_norm=False, n_token_types=0, head="lm", qkv_bias=True,
                 attn_out_bias=True, mlp_bias=True, n_kv_heads=cfg.n_heads, head_dim=cfg.dim // cfg.n_heads,
                 sliding_window=None, activation=("gelu", "gelu_tanh", "relu", "silu"))
        act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.dim,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.hidden_dim, n_positions=cfg.max_seq_len,
                    activation_function=act, layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout,
                    embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout, tie_word_embeddings=cfg.tie_embeddings,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, pad_token_id=cfg.pad_token_id,
                    bos_token_id=None, eos_token_id=None)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    biases = {"llama": dict(attn_out_bias=cfg.qkv_bias), "mistral": dict(qkv_bias=False, attn_out_bias=False,
                                                                           mlp_bias=False)}.get(family, {})
    _require(cfg, arch, **common, **biases, kind="decoder", norm="rmsnorm", norm_placement="pre", embed_norm=False,
             n_token_types=0, head="lm", partial_rotary_factor=1.0, activation=("swiglu", "geglu"))
    out: dict[str, Any] = dict(
        architectures=[arch], model_type=family, vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu" if cfg.activation == "swiglu"
        else "gelu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.attn_dropout, pad_token_id=cfg.pad_token_id,
        bos_token_id=None, eos_token_id=None,
    )
    out.update(_rope_to_hf(cfg))  # may lower max_position_embeddings (dynamic NTK)
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif family == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:  # Qwen2: a window on every layer is max_window_layers=0
        window = cfg.sliding_window
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=0 if window is not None else cfg.n_layers,
                   layer_types=["sliding_attention" if window is not None else "full_attention"] * cfg.n_layers)
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """rope_parameters (transformers 5) plus the legacy rope_theta / rope_scaling keys (transformers 4)."""
    s, params = cfg.rope_scaling, {"rope_theta": cfg.rope_theta}
    extra: dict[str, Any] = {}
    if s == "none":
        params["rope_type"] = "default"
    elif s == "linear":
        params.update(rope_type="linear", factor=cfg.rope_factor)
    elif s == "dynamic_ntk":  # transformers' dynamic NTK starts at max_position_embeddings
        params.update(rope_type="dynamic", factor=cfg.rope_factor)
        extra["max_position_embeddings"] = cfg.rope_original_max_seq_len
    elif s == "yarn":
        params.update(rope_type="yarn", factor=cfg.rope_factor, beta_fast=cfg.yarn_beta_fast,
                      beta_slow=cfg.yarn_beta_slow, original_max_position_embeddings=cfg.rope_original_max_seq_len)
        if cfg.yarn_mscale_all_dim:
            params.update(mscale=cfg.yarn_mscale, mscale_all_dim=cfg.yarn_mscale_all_dim)
        elif cfg.yarn_mscale != 1.0:
            raise CheckpointError(f"yarn_mscale={cfg.yarn_mscale} without yarn_mscale_all_dim has no transformers "
                                  "equivalent (it applies mscale only together with mscale_all_dim)")
    elif s == "llama3":
        params.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.llama3_low_freq_factor,
                      high_freq_factor=cfg.llama3_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_seq_len)
    else:
        raise CheckpointError(f"rope_scaling={s!r} has no Hugging Face rope_type; use linear, dynamic_ntk, yarn "
                              "or llama3")
    legacy = {"rope_scaling": dict(params)} if s != "none" else {}
    return {"rope_theta": cfg.rope_theta, "rope_parameters": params, **legacy, **extra}


def _bert_to_hf(cfg: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    arch = {v: k for k, v in _BERT_HEADS.items()}.get(cfg.head)
    if arch is None:
        raise CheckpointError(f"head={cfg.head!r} has no BERT architecture here; exportable heads: "
                              f"{', '.join(_BERT_HEADS.values())}")
    head_opts = dict(classifier_pooler=True, pooling="cls") if cfg.head == "classification" else {}
    _require(cfg, arch, **common, **head_opts, position="learned", norm="layernorm", norm_bias=True,
             norm_placement="post", embed_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
             n_kv_heads=cfg.n_heads, head_dim=cfg.dim // cfg.n_heads, sliding_window=None,
             activation=("gelu", "gelu_tanh", "relu", "silu"))
    if cfg.n_token_types < 1:
        raise CheckpointError("this ModelConfig cannot be exported as BERT: n_token_types=0 (needs >= 1)")
    out = dict(architectures=[arch], model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.hidden_dim,
               hidden_act={"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
               max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.n_token_types,
               layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
               attention_probs_dropout_prob=cfg.attn_dropout, tie_word_embeddings=cfg.tie_embeddings,
               pad_token_id=cfg.pad_token_id, position_embedding_type="absolute", is_decoder=False)
    if cfg.head == "classification":
        out.update(classifier_dropout=cfg.classifier_dropout, id2label={str(i): f"LABEL_{i}" for i in
                   range(cfg.n_labels)}, label2id={f"LABEL_{i}": i for i in range(cfg.n_labels)})
    return out


# ============================================================================================ tensors
@dataclass(frozen=True)
class _Rule:
    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"  # copy | cat: ours = cat(theirs) along rows, split back by `sizes` | t: ours = theirsᵀ
    sizes: tuple[int, ...] = ()


def _rules(cfg: ModelConfig, family: str, prefix: str) -> list[_Rule]:
    """The tensor table of one family. `prefix` is the base-model prefix the checkpoint uses ("model.",
    "transformer." or "", "bert." or "")."""
    R = _Rule
    tied = cfg.tie_embeddings and cfg.head in ("lm", "mlm")
    rules: list[_Rule] = []
    if family in _LLAMA_LIKE:
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        rules += [R("tok_emb.weight", ("model.embed_tokens.weight",)), R("norm.weight", ("model.norm.weight",))]
        rules += [] if tied else [R("head.proj.weight", ("lm_head.weight",))]
        for i in range(cfg.n_layers):
            h, o = f"model.layers.{i}.", f"blocks.{i}."
            a, m = h + "self_attn.", h + "mlp."
            rules += [R(o + "attn_norm.weight", (h + "input_layernorm.weight",)),
                      R(o + "mlp_norm.weight", (h + "post_attention_layernorm.weight",))]
            for b in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                rules.append(R(o + f"attn.qkv.{b}", tuple(a + f"{x}_proj.{b}" for x in "qkv"), "cat", (q, kv, kv)))
            for b in ("weight", "bias") if cfg.attn_out_bias else ("weight",):
                rules.append(R(o + f"attn.out.{b}", (a + f"o_proj.{b}",)))
            for b in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                rules += [R(o + f"mlp.up.{b}", (m + f"gate_proj.{b}", m + f"up_proj.{b}"), "cat",
                            (cfg.hidden_dim, cfg.hidden_dim)),
                          R(o + f"mlp.down.{b}", (m + f"down_proj.{b}",))]
    elif family == "gpt2":
        t = prefix
        rules += [R("tok_emb.weight", (t + "wte.weight",)), R("pos_emb.weight", (t + "wpe.weight",)),
                  R("norm.weight", (t + "ln_f.weight",)), R("norm.bias", (t + "ln_f.bias",))]
        rules += [] if tied else [R("head.proj.weight", ("lm_head.weight",))]
        for i in range(cfg.n_layers):
            h, o = f"{t}h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                rules += [R(o + f"{ours}.{b}", (h + f"{theirs}.{b}",)) for b in ("weight", "bias")]
            # Conv1D: y = x W + b with W [in, out]; c_attn's output is [q ; k ; v], heads contiguous in each
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                rules += [R(o + ours + ".weight", (h + theirs + ".weight",), "t"),
                          R(o + ours + ".bias", (h + theirs + ".bias",))]
    else:  # bert
        e = prefix + "embeddings."
        rules += [R("tok_emb.weight", (e + "word_embeddings.weight",)),
                  R("type_emb.weight", (e + "token_type_embeddings.weight",)),
                  R("pos_emb.weight", (e + "position_embeddings.weight",)),
                  R("emb_norm.weight", (e + "LayerNorm.weight",)), R("emb_norm.bias", (e + "LayerNorm.bias",))]
        for i in range(cfg.n_layers):
            h, o = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
            s = h + "attention.self."
            for b in ("weight", "bias"):
                # post-norm: attn_norm follows the attention residual, mlp_norm the MLP residual
                rules += [R(o + f"attn.qkv.{b}", tuple(s + f"{x}.{b}" for x in ("query", "key", "value")), "cat",
                            (cfg.dim,) * 3),
                          R(o + f"attn.out.{b}", (h + f"attention.output.dense.{b}",)),
                          R(o + f"attn_norm.{b}", (h + f"attention.output.LayerNorm.{b}",)),
                          R(o + f"mlp.up.{b}", (h + f"intermediate.dense.{b}",)),
                          R(o + f"mlp.down.{b}", (h + f"output.dense.{b}",)),
                          R(o + f"mlp_norm.{b}", (h + f"output.LayerNorm.{b}",))]
        if cfg.head == "mlm":
            c = "cls.predictions."
            rules += [R("head.dense.weight", (c + "transform.dense.weight",)),
                      R("head.dense.bias", (c + "transform.dense.bias",)),
                      R("head.norm.weight", (c + "transform.LayerNorm.weight",)),
                      R("head.norm.bias", (c + "transform.LayerNorm.bias",)),
                      R("head.proj.bias", (c + "bias",))]
            rules += [] if tied else [R("head.proj.weight", (c + "decoder.weight",))]
        elif cfg.head == "classification":
            rules += [R("head.pooler.weight", (prefix + "pooler.dense.weight",)),
                      R("head.pooler.bias", (prefix + "pooler.dense.bias",)),
                      R("head.proj.weight", ("classifier.weight",)), R("head.proj.bias", ("classifier.bias",))]
    return rules


def _prefix(hf_keys: Any, family: str) -> str:
    """GPT-2 and BERT checkpoints come with and without their base-model prefix."""
    if family == "gpt2":
        return "transformer." if "transformer.wte.weight" in hf_keys else ""
    if family == "bert":
        return "bert." if "bert.embeddings.word_embeddings.weight" in hf_keys else ""
    return "model."


def _ignorable(key: str, cfg: ModelConfig, family: str) -> bool:
    if _NOT_WEIGHTS.search(key):
        return True
    tied = cfg.tie_embeddings and cfg.head in ("lm", "mlm")
    if tied and key in ("lm_head.weight", "cls.predictions.decoder.weight"):
        return True  # transformers uses the embedding whenever the config says tied
    if family == "bert" and key == "cls.predictions.decoder.bias":
        return True  # an alias of cls.predictions.bias
    # BertModel's pooler: llmlab's head='none' returns the hidden states and has no pooler
    return family == "bert" and cfg.head == "none" and re.match(r"(bert\.)?pooler\.", key) is not None


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig,
                       hf_config: Mapping[str, Any]) -> StateDict:
    """Hugging Face tensors -> llmlab names (fused qkv and gate/up, transposed Conv1D). `hf_sd` may be lazy
    (TensorFiles): each tensor is read once and dropped after conversion. Missing, unexpected and
    wrongly-shaped tensors raise CheckpointError naming the tensor, its file and the expected shape."""
    _, family = _architecture(hf_config)
    where = getattr(hf_sd, "source", "the state dict")
    keys = set(hf_sd.keys())
    if family == "bert" and "cls.predictions.bias" not in keys and "cls.predictions.decoder.bias" in keys:
        alias = {"cls.predictions.bias": "cls.predictions.decoder.bias"}  # older BertForMaskedLM checkpoints
    else:
        alias = {}
    rules = _rules(cfg, family, _prefix(keys, family))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    used = {alias.get(n, n) for r in rules for n in r.theirs}
    missing = [n for n in used if n not in keys]
    if missing:
        raise CheckpointError(f"{where}: missing tensors {_few(sorted(missing))} that a {family} model with this "
                              "config.json needs (wrong config, a different architecture, or an incomplete download)")
    unexpected = sorted(k for k in keys - used if not _ignorable(k, cfg, family))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {_few(unexpected)} for a {family} model with this "
                              f"config.json (head={cfg.head!r}, n_layers={cfg.n_layers})")
    out: StateDict = {}
    for r in rules:
        want = expected[r.ours]
        parts = []
        for i, name in enumerate(r.theirs):
            name = alias.get(name, name)
            t = hf_sd[name]
            shape = (r.sizes[i], *want[1:]) if r.op == "cat" else want[::-1] if r.op == "t" else want
            if tuple(t.shape) != shape:
                file = hf_sd.file_of(name) if hasattr(hf_sd, "file_of") else where
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, but config.json implies "
                                      f"{shape}; the weights and the config do not describe the same model")
            parts.append(t)
        out[r.ours] = torch.cat(parts) if r.op == "cat" else parts[0].t().contiguous() if r.op == "t" else parts[0]
    if cfg.tie_embeddings and cfg.head in ("lm", "mlm"):
        out["head.proj.weight"] = out["tok_emb.weight"]  # one tensor; loading keeps the tie
    return out


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """llmlab names -> Hugging Face names, as save_pretrained writes them (a tied head is left out). Split
    tensors are views of ours; GPT-2's transposes are views too (the writer makes them contiguous per shard)."""
    family = _family_of(cfg)
    prefix = {"gpt2": "transformer.", "bert": "" if cfg.head == "none" else "bert."}.get(family, "model.")
    out: StateDict = {}
    for r in _rules(cfg, family, prefix):
        t = sd[r.ours]
        if r.op == "cat":
            out.update(zip(r.theirs, t.split(list(r.sizes))))
        else:
            out[r.theirs[0]] = t.t() if r.op == "t" else t
    return out


# ============================================================================================ directories
def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: Any = "cpu") -> Transformer:
    """A Hugging Face model directory (config.json + model.safetensors, sharded safetensors with their index,
    or pytorch_model.bin read with weights_only=True) as a Transformer in eval mode. The model is built on the
    meta device and the converted tensors assigned, so the load never holds two copies of the weights."""
    path = resolve(path)
    hf_config = read_json(path / CONFIG_NAME)
    if "model_type" not in hf_config and "dim" in hf_config:
        raise CheckpointError(f"{path / CONFIG_NAME} is an llmlab config; load this directory with "
                              "llmlab.io.load_checkpoint")
    try:
        cfg = config_from_hf(hf_config)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:  # ModelConfig validation or a malformed field
        raise CheckpointError(f"{path / CONFIG_NAME}: cannot be mapped to a ModelConfig: {e}") from e
    with TensorFiles(path, dtype=dtype, device=device) as files:
        sd = state_dict_from_hf(files, cfg, hf_config)
        return build_model(cfg, sd, source=files.source, device=device)


def save_hf(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            tokenizer: Any = None) -> Path:
    """Write a directory transformers' AutoModel*.from_pretrained loads with the same outputs: config.json and
    model.safetensors (sharded with an index above max_shard_bytes), plus tokenizer.json when a tokenizer is
    given. Replaces an existing model directory at `path` atomically."""
    cfg = model.cfg
    hf_config = config_to_hf(cfg)  # raises before anything is written if the model has no HF equivalent
    dtype = next(model.parameters()).dtype
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    tensors = state_dict_to_hf(model.state_dict(), cfg)
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)
