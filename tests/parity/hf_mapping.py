"""Hugging Face -> llmlab: translate a HF config into a ModelConfig and a HF state dict into ours.

Plain functions, no registry:

    llama_like_to_llmlab(hf_model)  LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM
    gpt2_to_llmlab(hf_model)        GPT2LMHeadModel
    bert_to_llmlab(hf_model)        BertModel, BertForMaskedLM, BertForSequenceClassification

Each returns (ModelConfig, state_dict) such that `Transformer(cfg).load_state_dict(sd, strict=True)` works.
The `*_state_dict(sd, ...)` halves take any mapping of HF names to tensors (weights, or their gradients).

Layout differences handled here:
  * our attention has one fused `qkv` Linear: rows are the q heads, then the k heads, then the v heads;
  * our gated MLP has one fused `up` Linear whose output is [gate ; up];
  * GPT-2's Conv1D stores weights as [in, out], nn.Linear as [out, in];
  * HF Llama-family checkpoints already use the rotate-half RoPE layout, as do we: no permutation.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from llmlab.model import ModelConfig

StateDict = dict[str, torch.Tensor]

# HF hidden_act / activation_function -> llmlab activation (plain MLPs)
_PLAIN_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
              "silu": "silu", "swish": "silu"}
# HF hidden_act of a gated (gate_proj/up_proj) MLP -> llmlab gated activation
_GATED_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


# ------------------------------------------------------------------------------------------------ RoPE
def rope_options(hf_cfg: Any) -> dict[str, Any]:
    """transformers 5 keeps every RoPE setting in `config.rope_parameters` (a flat dict for these models):
    {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
    "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "partial_rotary_factor", ...}.
    Older configs used `rope_scaling` (with "type" or "rope_type") and a top-level `rope_theta`; both are
    accepted."""
    params = dict(_get(hf_cfg, "rope_parameters", None) or _get(hf_cfg, "rope_scaling", None) or {})
    if params and any(isinstance(v, dict) for v in params.values()):
        raise NotImplementedError(f"per-layer-type rope_parameters are not supported: {params}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", _get(hf_cfg, "rope_theta", 10000.0))
    out: dict[str, Any] = dict(rope_theta=float(theta))
    prf = params.get("partial_rotary_factor", _get(hf_cfg, "partial_rotary_factor", None))
    if prf is not None:
        out["partial_rotary_factor"] = float(prf)
    max_pos = hf_cfg.max_position_embeddings
    if kind == "default":
        return out
    factor = params.get("factor")
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(factor)}
    if kind == "dynamic":
        # HF's dynamic NTK rescales once the sequence exceeds config.max_position_embeddings
        return {**out, "rope_scaling": "dynamic_ntk", "rope_factor": float(factor),
                "rope_original_max_seq_len": max_pos}
    original = params.get("original_max_position_embeddings", max_pos)
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(factor), "rope_original_max_seq_len": original,
                "llama3_low_freq_factor": float(params["low_freq_factor"]),
                "llama3_high_freq_factor": float(params["high_freq_factor"])}
    if kind == "yarn":
        unsupported = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k)}
        if unsupported or params.get("truncate", True) is False:
            raise NotImplementedError(f"YaRN options without a ModelConfig field: {unsupported or 'truncate=False'}")
        if factor is None:  # DeepSeek-V3 style: the factor is the ratio of the two context lengths
            factor = max_pos / original
        return {**out, "rope_scaling": "yarn", "rope_factor": float(factor), "rope_original_max_seq_len": original,
                "yarn_beta_fast": float(params.get("beta_fast") or 32), "yarn_beta_slow": float(params.get("beta_slow") or 1)}
    raise NotImplementedError(f"rope_type={kind!r} has no llmlab equivalent")


# ------------------------------------------------------------------------------------------------ Llama family
def llama_like_config(hf_cfg: Any, sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    layer_types = _get(hf_cfg, "layer_types", None)
    window = _get(hf_cfg, "sliding_window", None)
    if layer_types is not None:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            window = None
        elif kinds != {"sliding_attention"}:
            raise NotImplementedError(f"a mix of sliding and full attention layers is not supported: {layer_types}")
    act = hf_cfg.hidden_act
    if act not in _GATED_ACT:
        raise NotImplementedError(f"hidden_act={act!r} has no gated llmlab activation")
    p = "model.layers.0."
    return ModelConfig(
        kind="decoder",
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=_get(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads,
        head_dim=_get(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads,
        hidden_dim=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        sliding_window=window,
        position="rope",
        **rope_options(hf_cfg),
        norm="rmsnorm",
        norm_placement="pre",
        norm_eps=hf_cfg.rms_norm_eps,
        activation=_GATED_ACT[act],
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        qkv_bias=p + "self_attn.q_proj.bias" in sd,
        attn_out_bias=p + "self_attn.o_proj.bias" in sd,
        mlp_bias=p + "mlp.gate_proj.bias" in sd,
        head="lm",
        attn_dropout=0.0,
        dropout=0.0,
    )


def llama_like_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    out: StateDict = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    # A tied HF model may list lm_head.weight (state_dict) or not (named_parameters, gradients).
    out["head.proj.weight"] = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        a, m = h + "self_attn.", h + "mlp."
        out[o + "attn_norm.weight"] = sd[h + "input_layernorm.weight"]
        out[o + "mlp_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[o + "attn.qkv.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"], dim=0)
        if cfg.qkv_bias:
            out[o + "attn.qkv.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"], dim=0)
        out[o + "attn.out.weight"] = sd[a + "o_proj.weight"]
        if cfg.attn_out_bias:
            out[o + "attn.out.bias"] = sd[a + "o_proj.bias"]
        out[o + "mlp.up.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]], dim=0)
        out[o + "mlp.down.weight"] = sd[m + "down_proj.weight"]
        if cfg.mlp_bias:
            out[o + "mlp.up.bias"] = torch.cat([sd[m + "gate_proj.bias"], sd[m + "up_proj.bias"]], dim=0)
            out[o + "mlp.down.bias"] = sd[m + "down_proj.bias"]
    return out


def llama_like_to_llmlab(hf_model: torch.nn.Module) -> tuple[ModelConfig, StateDict]:
    """LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM -> (ModelConfig, state_dict)."""
    sd = hf_model.state_dict()
    cfg = llama_like_config(hf_model.config, sd)
    return cfg, llama_like_state_dict(sd, cfg)


# ------------------------------------------------------------------------------------------------ GPT-2
def gpt2_config(hf_cfg: Any) -> ModelConfig:
    if _get(hf_cfg, "scale_attn_by_inverse_layer_idx", False) or not _get(hf_cfg, "scale_attn_weights", True):
        raise NotImplementedError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if _get(hf_cfg, "add_cross_attention", False):
        raise NotImplementedError("GPT-2 cross-attention is not supported")
    return ModelConfig(
        kind="decoder",
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.n_embd,
        n_layers=hf_cfg.n_layer,
        n_heads=hf_cfg.n_head,
        hidden_dim=_get(hf_cfg, "n_inner", None) or 4 * hf_cfg.n_embd,
        max_seq_len=hf_cfg.n_positions,
        position="learned",
        norm="layernorm",
        norm_bias=True,
        norm_placement="pre",
        norm_eps=hf_cfg.layer_norm_epsilon,
        activation=_PLAIN_ACT[hf_cfg.activation_function],
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", True)),
        head="lm",
        dropout=0.0,
        attn_dropout=0.0,
    )


def gpt2_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    t = "transformer."
    out: StateDict = {
        "tok_emb.weight": sd[t + "wte.weight"],
        "pos_emb.weight": sd[t + "wpe.weight"],
        "norm.weight": sd[t + "ln_f.weight"],
        "norm.bias": sd[t + "ln_f.bias"],
        "head.proj.weight": sd["lm_head.weight"] if "lm_head.weight" in sd else sd[t + "wte.weight"],
    }
    for i in range(cfg.n_layers):
        h, o = f"{t}h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[o + ours + ".weight"] = sd[h + theirs + ".weight"]
            out[o + ours + ".bias"] = sd[h + theirs + ".bias"]
        # Conv1D: weight [in, out], y = x W + b. Its c_attn output is [q ; k ; v], heads contiguous in each.
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[o + ours + ".weight"] = sd[h + theirs + ".weight"].t()
            out[o + ours + ".bias"] = sd[h + theirs + ".bias"]
    return out


def gpt2_to_llmlab(hf_model: torch.nn.Module) -> tuple[ModelConfig, StateDict]:
    """GPT2LMHeadModel -> (ModelConfig, state_dict)."""
    sd = hf_model.state_dict()
    cfg = gpt2_config(hf_model.config)
    return cfg, gpt2_state_dict(sd, cfg)


# ------------------------------------------------------------------------------------------------ BERT
def _bert_head(hf_model: torch.nn.Module) -> str:
    name = type(hf_model).__name__
    heads = {"BertModel": "none", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "classification"}
    if name not in heads:
        raise NotImplementedError(f"{name} is not supported; use one of {', '.join(heads)}")
    return heads[name]


def bert_config(hf_cfg: Any, head: str) -> ModelConfig:
    if _get(hf_cfg, "position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError(f"position_embedding_type={hf_cfg.position_embedding_type!r} is not supported")
    if _get(hf_cfg, "is_decoder", False):
        raise NotImplementedError("BERT as a decoder is not supported")
    extra: dict[str, Any] = {}
    if head == "classification":
        extra = dict(n_labels=hf_cfg.num_labels, classifier_pooler=True, pooling="cls", classifier_dropout=0.0)
    return ModelConfig(
        kind="encoder",
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        hidden_dim=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        n_token_types=hf_cfg.type_vocab_size,
        position="learned",
        norm="layernorm",
        norm_bias=True,
        norm_placement="post",
        norm_eps=hf_cfg.layer_norm_eps,
        embed_norm=True,
        activation=_PLAIN_ACT[hf_cfg.hidden_act],
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=head == "mlm" and bool(_get(hf_cfg, "tie_word_embeddings", True)),
        head=head,
        dropout=0.0,
        attn_dropout=0.0,
        **extra,
    )


def bert_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, prefix: str = "bert.") -> StateDict:
    e = prefix + "embeddings."
    out: StateDict = {
        "tok_emb.weight": sd[e + "word_embeddings.weight"],
        "type_emb.weight": sd[e + "token_type_embeddings.weight"],
        "pos_emb.weight": sd[e + "position_embeddings.weight"],
        "emb_norm.weight": sd[e + "LayerNorm.weight"],
        "emb_norm.bias": sd[e + "LayerNorm.bias"],
    }
    for i in range(cfg.n_layers):
        h, o = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        s = h + "attention.self."
        for b in ("weight", "bias"):
            out[o + f"attn.qkv.{b}"] = torch.cat([sd[s + f"{x}.{b}"] for x in ("query", "key", "value")], dim=0)
            out[o + f"attn.out.{b}"] = sd[h + f"attention.output.dense.{b}"]
            # post-norm: attn_norm follows the attention residual, mlp_norm the MLP residual
            out[o + f"attn_norm.{b}"] = sd[h + f"attention.output.LayerNorm.{b}"]
            out[o + f"mlp.up.{b}"] = sd[h + f"intermediate.dense.{b}"]
            out[o + f"mlp.down.{b}"] = sd[h + f"output.dense.{b}"]
            out[o + f"mlp_norm.{b}"] = sd[h + f"output.LayerNorm.{b}"]
    if cfg.head == "mlm":
        c = "cls.predictions."
        out["head.dense.weight"] = sd[c + "transform.dense.weight"]
        out["head.dense.bias"] = sd[c + "transform.dense.bias"]
        out["head.norm.weight"] = sd[c + "transform.LayerNorm.weight"]
        out["head.norm.bias"] = sd[c + "transform.LayerNorm.bias"]
        out["head.proj.weight"] = sd[c + "decoder.weight"] if c + "decoder.weight" in sd else sd[e + "word_embeddings.weight"]
        out["head.proj.bias"] = sd[c + "decoder.bias"] if c + "decoder.bias" in sd else sd[c + "bias"]
    elif cfg.head == "classification":
        out["head.pooler.weight"] = sd[prefix + "pooler.dense.weight"]
        out["head.pooler.bias"] = sd[prefix + "pooler.dense.bias"]
        out["head.proj.weight"] = sd["classifier.weight"]
        out["head.proj.bias"] = sd["classifier.bias"]
    return out


def bert_to_llmlab(hf_model: torch.nn.Module) -> tuple[ModelConfig, StateDict]:
    """BertModel (head='none'; its pooler is dropped) / BertForMaskedLM (head='mlm') /
    BertForSequenceClassification (head='classification' with the BERT pooler) -> (ModelConfig, state_dict)."""
    head = _bert_head(hf_model)
    sd = hf_model.state_dict()
    cfg = bert_config(hf_model.config, head)
    return cfg, bert_state_dict(sd, cfg, prefix="" if head == "none" else "bert.")
