"""ModelConfig: one dataclass that describes every architecture llmlab builds.

LLaMA, Qwen2, Mistral, GPT-2, BERT, DeepSeek-style MLA and MoE are all points in this option space, not
separate classes. The config also knows its own cost (parameters, FLOPs, KV-cache and activation bytes); the
formulas live in `cost.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every string option and its valid values. Validation and error messages read from this table.
CHOICES: dict[str, tuple[str, ...]] = {
    "kind": ("decoder", "encoder", "prefix_lm"),
    "attention": ("standard", "mla"),
    "attn_backend": ("sdpa", "math", "flash"),
    "position": ("none", "sinusoidal", "learned", "rope", "alibi"),
    "rope_scaling": ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"),
    "norm": ("rmsnorm", "layernorm"),
    "norm_placement": ("pre", "post"),
    "activation": ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"),
    "router": ("softmax", "sigmoid"),
    "head": ("lm", "mlm", "classification", "token_classification", "span", "none"),
    "pooling": ("cls", "mean", "last"),
}

GATED_ACTIVATIONS = ("swiglu", "geglu")


def _round_up(x: float, multiple: int) -> int:
    return int(multiple * math.ceil(x / multiple))


@dataclass
class ModelConfig:
    # --- shape
    kind: str = "decoder"  # decoder: causal; encoder: bidirectional; prefix_lm: bidirectional prefix, causal rest
    vocab_size: int = 8192
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 < n < n_heads: GQA; 1: MQA
    head_dim: int | None = None  # None = dim // n_heads
    hidden_dim: int | None = None  # MLP width; None = 8/3·dim (gated) or 4·dim, rounded up to 64
    max_seq_len: int = 1024

    # --- attention
    attention: str = "standard"  # standard (MHA/GQA/MQA) or mla (DeepSeek-V2 latent attention)
    attn_backend: str = "sdpa"
    qk_norm: bool = False  # RMSNorm on each head's q and k (OLMo-2, Qwen3)
    sliding_window: int | None = None  # a query sees at most this many keys (itself included)
    attn_dropout: float = 0.0
    flash_block_size: int = 64  # tile size of the `flash` backend
    # MLA (DeepSeek-V2, arXiv:2405.04434): the cache holds kv_lora_rank + qk_rope_head_dim numbers per token.
    q_lora_rank: int = 0  # 0: full-rank query projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # --- position
    position: str = "rope"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # fraction of each head's dims that rotate
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # context the model was trained at (None = max_seq_len)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # YaRN's attention factor mscale(m) = 0.1·m·ln(s) + 1 (mscale(0) = 1): cos/sin are scaled by
    # mscale(yarn_mscale) / mscale(yarn_mscale_all_dim), and MLA's softmax scale by mscale(yarn_mscale_all_dim)²
    # (DeepSeek-V2/V3 checkpoints set both to 1 or 0.707; plain YaRN leaves them at 1 and 0)
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0

    # --- norm
    norm: str = "rmsnorm"
    norm_placement: str = "pre"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)

    # --- MLP
    activation: str = "swiglu"

    # --- mixture of experts (0 experts = dense)
    n_experts: int = 0
    moe_top_k: int = 2
    n_shared_experts: int = 0
    moe_hidden_dim: int | None = None  # per expert; None = hidden_dim
    router: str = "softmax"
    moe_norm_topk: bool = True  # renormalize the top-k weights to sum to 1
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0
    moe_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    moe_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight

    # --- embeddings, biases, dropout
    tie_embeddings: bool = False
    n_token_types: int = 0  # > 0 adds segment embeddings (BERT)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(dim))
    dropout: float = 0.0  # embeddings and residual branches
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm bias (ignored by RMSNorm)
    lm_head_bias: bool = False
    pad_token_id: int | None = None

    # --- head
    head: str = "lm"
    n_labels: int = 2
    pooling: str = "cls"
    classifier_pooler: bool = False  # BERT pooler: dense + tanh on the pooled vector
    classifier_dropout: float = 0.0

    # --- init and memory
    init_std: float = 0.02
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            mult = 8 / 3 if self.activation in GATED_ACTIVATIONS else 4
            self.hidden_dim = _round_up(mult * self.dim, 64)
        if self.moe_hidden_dim is None:
            self.moe_hidden_dim = self.hidden_dim
        if self.rope_original_max_seq_len is None:
            self.rope_original_max_seq_len = self.max_seq_len
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name, valid in CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"ModelConfig.{name}={value!r} is not valid; choose one of {', '.join(valid)}")

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "hidden_dim", "flash_block_size"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        if self.attention == "standard":
            need(
                self.dim % self.n_heads == 0 or self.head_dim is not None,
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; valid n_heads for this dim: "
                f"{[d for d in range(1, self.dim + 1) if self.dim % d == 0]} (or set head_dim)",
            )
            need(self.n_kv_heads > 0, f"n_kv_heads must be positive, got {self.n_kv_heads}")
            need(
                self.n_heads % self.n_kv_heads == 0,
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                f"valid n_kv_heads: {[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}",
            )
            need(self.head_dim > 0, f"head_dim must be positive, got {self.head_dim}")
        else:  # mla
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"attention='mla' needs {name} > 0, got {getattr(self, name)}")
            need(self.q_lora_rank >= 0, f"q_lora_rank must be >= 0, got {self.q_lora_rank}")
            need(self.position in ("rope", "none"), f"attention='mla' uses position 'rope' or 'none', got {self.position!r}")
            need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            need(not self.qk_norm, "qk_norm is not defined for attention='mla'; set qk_norm=False")
        if self.position == "rope":
            need(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                 f"partial_rotary_factor={self.partial_rotary_factor} with head_dim={self.rope_head_dim} "
                 f"gives rotary_dim={self.rotary_dim}; it must be an even number >= 2")
            need(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor must be in (0, 1]")
            need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.rope_factor >= 1.0, f"rope_factor must be >= 1, got {self.rope_factor}")
        need(self.yarn_mscale >= 0 and self.yarn_mscale_all_dim >= 0,
             f"yarn_mscale and yarn_mscale_all_dim must be >= 0, got {self.yarn_mscale}, {self.yarn_mscale_all_dim}")
        need(self.rope_scaling == "none" or self.position == "rope",
             f"rope_scaling={self.rope_scaling!r} needs position='rope', got {self.position!r}")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or None")
        need(0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1, "dropout and attn_dropout must be in [0, 1)")
        need(self.attn_dropout == 0 or self.attn_backend != "flash",
             "attn_dropout > 0 is not supported by attn_backend='flash'; use 'sdpa' or 'math'")
        if self.n_experts > 0:
            need(0 < self.moe_top_k <= self.n_experts,
                 f"moe_top_k={self.moe_top_k} must be in 1..n_experts={self.n_experts}")
            need(self.moe_every >= 1, f"moe_every must be >= 1, got {self.moe_every}")
            need(self.moe_hidden_dim > 0, f"moe_hidden_dim must be positive (None = hidden_dim), got {self.moe_hidden_dim}")
        need(self.n_shared_experts >= 0 and self.n_experts >= 0, "n_experts and n_shared_experts must be >= 0")
        need(self.kind != "encoder" or self.head not in ("lm",),
             "an encoder has no causal LM head; use head='mlm' (or classification/token_classification/span/none)")
        need(self.head not in ("classification", "token_classification") or self.n_labels > 0,
             f"n_labels must be positive, got {self.n_labels}")
        need(self.n_token_types >= 0, "n_token_types must be >= 0")
        for name in ("norm_eps", "init_std", "embed_scale"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")

    # ------------------------------------------------------------------ derived
    @property
    def is_causal(self) -> bool:
        return self.kind != "encoder"

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def rope_head_dim(self) -> int:
        """Per-head dimension RoPE acts on (MLA rotates only its decoupled key/query part)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rotary_dim(self) -> int:
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    # ------------------------------------------------------------------ presets and the size dial
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_depth(cls, depth: int, **overrides: Any) -> "ModelConfig":
        """The size dial: depth sets everything else (64 channels per layer, 64-dim heads, 8/3 MLP)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        dim = 64 * depth
        n_heads = max(1, dim // 64)
        n_kv = max(d for d in range(1, n_heads + 1) if n_heads % d == 0 and d <= max(1, n_heads // 3))
        base = dict(dim=dim, n_layers=depth, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=32768,
                    max_seq_len=2048, hidden_dim=None)
        return cls.from_dict({**base, **overrides})

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"ModelConfig has no field {key!r}{hint}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(path_or_text)
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ cost (formulas in cost.py)
    def num_parameters(self) -> int:
        from .cost import num_parameters

        return num_parameters(self)

    def flops_per_token(self, seq_len: int | None = None, *, first_trained_layer: int = 0,
                        trained_weights: int | None = None) -> float:
        """Training FLOPs per token (model.cost.training_flops_per_token; frozen layers shorten backward)."""
        from .cost import training_flops_per_token

        return training_flops_per_token(self, seq_len or self.max_seq_len, first_trained_layer=first_trained_layer,
                                        trained_weights=trained_weights)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        from .cost import kv_cache_bytes_per_token

        return kv_cache_bytes_per_token(self, bytes_per_element)

    def activation_bytes(self, batch: int, seq_len: int, bytes_per_element: int = 4) -> int:
        from .cost import activation_bytes

        return activation_bytes(self, batch, seq_len, bytes_per_element)


PRESETS: dict[str, dict[str, Any]] = {
    # nano: what the tests build. A forward and backward take milliseconds.
    "nano": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128),
    # micro: the laptop demo and the benchmark shape (15.7M parameters).
    "micro": dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024, max_seq_len=1024),
    "small": dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=2048,
                  max_seq_len=2048, tie_embeddings=True),
    "base": dict(vocab_size=32768, dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, hidden_dim=2816,
                 max_seq_len=4096, tie_embeddings=True),
}
