"""GGUF import (llama architecture) into the Hugging Face Llama representation, in memory.

    from llmlab.io.gguf import read_gguf
    m = read_gguf(asset_path("smollm2-135m-instruct"))
    m.hf_config        # a LlamaConfig-style config.json dict
    m.state_dict       # Hugging Face names: model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, ...
    m.tokenizer_json   # a complete tokenizer.json object (load with tokenizers.Tokenizer.from_str(json.dumps(...)))

A GGUF file has no config.json and no tokenizer.json: the metadata is both, under llama.cpp's key names, and
the weights are stored the way llama.cpp computes with them. Three things are undone here:
  - quantization: blocks of Q4_0/Q4_1/Q8_0 (and F16/BF16) are expanded to floats by gguf's numpy code,
  - llama.cpp's converter interleaves the rows of each Q and K head (its RoPE rotates adjacent pairs,
    transformers rotates the two halves of a head), so those rows are put back in rotate-half order,
  - names: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, and so on.
Tensors are converted one at a time from the memory-mapped file, so the peak is the output plus a tensor or two.
The tokenizer is rebuilt the way transformers' own GGUF loader rebuilds it (checked token for token in
tests/io/test_gguf.py). Where transformers departs from llama.cpp we follow llama.cpp and the model's original
tokenizer.json: SmolLM2's "smollm" pre-tokenizer cuts numerals one by one, and Llama 3's ignores merges.
Not read yet: sentencepiece vocabularies (tokenizer.ggml.model "llama": Llama 2, TinyLlama, Mistral 7B),
K-quants, Llama 3.1 rope frequency factors, mixture-of-experts llama files; each gets an error saying so.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from gguf.quants import dequantize

from ..tokenizer.bytelevel import BYTE_TO_UNICODE
from ..tokenizer.pretokenize import GPT4_PATTERN
from .gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0)
SUPPORTED_TOKENIZERS = ("gpt2",)  # tokenizer.ggml.model: byte-level BPE


class GGUFError(ValueError):
    """The GGUF file cannot be imported; the message names the file, what is wrong and what to do."""


@dataclass
class GGUFModel:
    hf_config: dict  # transformers LlamaConfig-style config.json
    state_dict: dict[str, torch.Tensor]  # Hugging Face Llama names; lm_head.weight only when untied
    tokenizer_json: dict  # a complete Hugging Face tokenizer.json object
    chat_template: str | None
    generation_config: dict  # bos/eos/pad ids
    metadata: dict  # general.* facts, file type, tensor types seen
    tokenizer_config: dict = field(default_factory=dict)  # tokenizer_config.json: special token strings, BOS/EOS flags


# GGUF tensor name (per-layer part after `blk.N.`) -> Hugging Face Llama name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = ("rope_freqs.weight",)  # handled (refused) in _rope_scaling; attn_rot_embd: old files' cached tables


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Read a llama-architecture GGUF file: config, dequantized weights, tokenizer, chat template."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if not dtype.is_floating_point:
        raise GGUFError(f"dtype must be a floating-point torch dtype (float32, bfloat16, float16), got {dtype}")
    try:  # the reader parses the whole header and tensor table up front, so damage shows here
        reader = GGUFFile(path)
    except Exception as e:  # numpy/struct errors of every kind mean the same thing to the caller
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is probably truncated or "
            f"corrupt: copy or download it again (its size is {path.stat().st_size} bytes)"
        ) from e
    meta = reader.fields
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported; read_gguf reads {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"(LLaMA, SmolLM, Mistral-7B, TinyLlama...). For other families import the Hugging Face checkpoint."
        )
    config = _hf_config(path, meta, {t.name for t in reader.tensors}, dtype)
    tokenizer_json, tokenizer_config = _tokenizer(path, meta)  # before the weights: it fails faster
    state_dict = _state_dict(path, reader, config, dtype)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    # llama.cpp also stops on end-of-turn/end-of-message tokens (Llama 3's <|eot_id|>), as HF generation configs do.
    stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    if stops and "eos_token_id" in generation:
        generation["eos_token_id"] = list(dict.fromkeys([generation["eos_token_id"], *stops]))
    try:
        file_type = LlamaFileType(meta["general.file_type"]).name  # MOSTLY_Q4_1 and the like
    except (KeyError, ValueError):
        file_type = meta.get("general.file_type")
    metadata = {k: v for k, v in meta.items() if k.startswith("general.")} | {
        "path": str(path),
        "gguf_version": reader.version,
        "file_type": file_type,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
    }
    return GGUFModel(
        hf_config=config,
        state_dict=state_dict,
        tokenizer_json=tokenizer_json,
        chat_template=meta.get("tokenizer.chat_template"),
        generation_config=generation,
        metadata=metadata,
        tokenizer_config=tokenizer_config,
    )


# ----------------------------------------------------------------------------------------------- config


def _f32(x: float) -> float:
    """GGUF stores floats as float32; print them back the way they were written (1e-05, not 9.9999997e-06).
    The value is the same float32 either way, so logits do not change."""
    return float(str(np.float32(x)))


def _hf_config(path: Path, meta: dict, tensor_names: set[str], dtype: torch.dtype) -> dict:
    def key(name: str, default: Any = ...) -> Any:
        full = f"llama.{name}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise GGUFError(f"{path}: metadata key {full!r} is missing; the file is incomplete or not a llama model")
        return default

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:  # transformers' Llama rotates whole heads; a partial rotary would load silently wrong
        raise GGUFError(f"{path}: partial rotary embeddings ({rotary} of {head_dim} dims) are not supported for llama")
    tokens = meta.get("tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "vocab_size": int(key("vocab_size", len(tokens) if tokens else 0)),
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if not config["vocab_size"]:
        raise GGUFError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens says how large the vocabulary is")
    rope_scaling = _rope_scaling(path, meta, tensor_names)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    for name in ("bos", "eos", "pad"):
        gguf_key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
        if gguf_key in meta:
            config[f"{name}_token_id"] = int(meta[gguf_key])
    if any(n.startswith("blk.0.ffn_gate_exps") or n.startswith("blk.0.ffn_gate_inp") for n in tensor_names):
        raise GGUFError(f"{path}: a llama file with experts (Mixtral-style MoE) is not supported; only dense llama")
    return config


def _rope_scaling(path: Path, meta: dict, tensor_names: set[str]) -> dict | None:
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1 bakes its scaling into per-frequency factors; the parameters that made them (original
        # context, low/high frequency factors) cannot be recovered uniquely from the factors alone.
        raise GGUFError(
            f"{path}: Llama-3.1-style rope frequency factors (rope_freqs.weight) are not supported yet; "
            f"import the Hugging Face checkpoint instead"
        )
    kind = meta.get("llama.rope.scaling.type", "none" if "llama.rope.scale_linear" not in meta else "linear")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if kind == "none" or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _f32(factor)}
        if "llama.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta["llama.rope.scaling.original_context_length"])
        if "llama.rope.scaling.attn_factor" in meta:
            scaling["attention_factor"] = _f32(meta["llama.rope.scaling.attn_factor"])
        return scaling
    raise GGUFError(f"{path}: rope scaling {kind!r} is not supported; supported: none, linear, yarn")


# ------------------------------------------------------------------------------------------------- weights


def _hf_name(name: str) -> str | None:
    """Hugging Face name of a GGUF tensor; None for tensors with no counterpart; KeyError when unknown."""
    if name in _IGNORED or name.endswith(".attn_rot_embd"):
        return None
    stem, _, suffix = name.rpartition(".")  # suffix: weight or bias
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise KeyError(name)


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for a Q or K projection (weight or bias) with `n_heads` heads.

    llama.cpp's converter stores each head's rows as pairs (r0, r_half, r1, r_half+1, ...) because its RoPE
    rotates adjacent elements; transformers rotates the first half against the second. Rows are
    [heads, pairs, 2] in the file and [heads, 2, pairs] here. K has the key/value head count, not Q's."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"cannot undo the rotary permutation: {rows} rows are not {n_heads} heads of even size")
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _state_dict(path: Path, reader: GGUFFile, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = {}
    for tensor in reader.tensors:  # check every tensor before the slow part, so a bad file fails at once
        try:
            names[tensor.name] = _hf_name(tensor.name)
        except KeyError:
            raise GGUFError(
                f"{path}: tensor {tensor.name!r} has no counterpart in a Hugging Face Llama model; "
                f"the file is not a plain llama checkpoint"
            ) from None
        if names[tensor.name] and tensor.tensor_type not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which read_gguf does not "
                f"dequantize; supported types: {', '.join(t.name for t in SUPPORTED_TYPES)}. Re-quantize the "
                f"file to one of them with llama.cpp's llama-quantize (for example Q8_0)."
            )
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if (hf_name := names[tensor.name]) is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dimensions fastest-first
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        projection = hf_name.split(".")[-2]
        if projection in heads:
            values = unpermute_rotary(values, heads[projection])  # a fresh array (the reshape copies)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
            values = values.copy()
        state_dict[hf_name] = torch.from_numpy(values).to(dtype)
    _check_shapes(path, state_dict, config)
    return state_dict


def _check_shapes(path: Path, sd: dict[str, torch.Tensor], c: dict) -> None:
    """Metadata and tensors must agree; a mismatch means a damaged or mislabelled file."""
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,), "self_attn.q_proj": (q, d),
             "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
             "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}  # fmt: skip
    expected = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    expected |= {} if c["tie_word_embeddings"] else {"lm_head.weight": (c["vocab_size"], d)}
    expected |= {f"model.layers.{i}.{n}.weight": s for i in range(c["num_hidden_layers"]) for n, s in layer.items()}
    missing = [name for name in expected if name not in sd]
    if missing:
        raise GGUFError(f"{path}: {len(missing)} tensors are missing, for example {missing[0]!r}"
                        "; the file is incomplete")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise GGUFError(f"{path}: tensor {name} has shape {tuple(sd[name].shape)}, the metadata implies {shape}")


# ------------------------------------------------------------------------------------------------ tokenizer

# The split patterns llama.cpp uses for each `tokenizer.ggml.pre` (llama-vocab.cpp); the same strings are the
# Split regexes in those models' original tokenizer.json files. Llama 3's is GPT-4's (pretokenize.GPT4_PATTERN).
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> list[dict]:
    return [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        _byte_level(use_regex=False),
    ]


# tokenizer.ggml.pre -> the pre-tokenizer steps before BPE. "default"/"gpt-2": GPT-2's regex inside ByteLevel.
# "smollm": every digit alone, then GPT-2's regex (llama.cpp's SMOLLM; SmolLM2's tokenizer.json says Digits).
_PRE_TOKENIZERS = {
    "default": [_byte_level(use_regex=True)],
    "gpt-2": [_byte_level(use_regex=True)],
    "smollm": [{"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)],
    "llama-bpe": _split(GPT4_PATTERN),
    "llama3": _split(GPT4_PATTERN),
    "llama-v3": _split(GPT4_PATTERN),
    "tekken": _split(_TEKKEN_SPLIT),
}
# Llama 3's own tokenizer.json (and llama.cpp) take a pre-token that is already a vocabulary entry whole.
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3")


def _tokenizer(path: Path, meta: dict) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json contents for the file's byte-level BPE vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZERS:
        raise GGUFError(
            f"{path}: tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_TOKENIZERS)} "
            f"(byte-level BPE)"
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{path}: the file has no vocabulary (tokenizer.ggml.tokens); it cannot be tokenized")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        warnings.warn(
            f"{path}: pre-tokenizer {pre!r} is not known to llmlab; using GPT-2's split (as transformers does), "
            f"so some text may tokenize differently from llama.cpp. Known: {', '.join(_PRE_TOKENIZERS)}",
            stacklevel=3,
        )
    # Every byte-level token is spelled in GPT-2's byte alphabet; a few converters store some tokens as raw
    # text, which we respell from their UTF-8 bytes (as transformers does).
    spelling = BYTE_TO_UNICODE
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [m.split(" ") for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise GGUFError(f"{path}: tokenizer.ggml.merges has an entry that is not two tokens separated by a space")
    def special(name: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    # Control tokens (type 3: <|im_start|>...) and the declared bos/eos/unk/pad are special; user-defined ones
    # (type 4: <think>...) are added but not special. Both match whole in raw text, as in llama.cpp. A token
    # outside the byte alphabet is a converter mislabel that no text can produce: left out, as transformers does.
    declared = {meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": kind != 4}  # fmt: skip
        for i, (t, kind) in enumerate(zip(tokens, types))
        if (kind in (3, 4) or i in declared) and t == spelled[i]
    ]

    bos, eos = special("bos"), special("eos")
    # GPT-2-style vocabularies add nothing unless the file says so (transformers' default; SmolLM2 says False).
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])},
        "post_processor": _template(bos, eos, add_bos, add_eos, meta),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre in _IGNORE_MERGES, "vocab": vocab, "merges": merges,
        },  # fmt: skip
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tokenizer_json, tokenizer_config


def _template(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, meta: dict) -> dict:
    """TemplateProcessing that adds BOS/EOS the way transformers' Llama tokenizers do: `[bos] $A [eos]`, and
    `[bos] $A [eos] [bos] $B [eos]` for pairs (type id 1 on the second)."""

    def sequence(name: str, type_id: int) -> list[dict]:
        items = [{"SpecialToken": {"id": bos, "type_id": type_id}}] if add_bos else []
        items.append({"Sequence": {"id": name, "type_id": type_id}})
        return items + ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if add_eos else [])

    used = {bos: meta.get("tokenizer.ggml.bos_token_id")} if add_bos else {}
    used |= {eos: meta.get("tokenizer.ggml.eos_token_id")} if add_eos else {}
    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": {t: {"id": t, "ids": [int(i)], "tokens": [t]} for t, i in used.items()},
    }
