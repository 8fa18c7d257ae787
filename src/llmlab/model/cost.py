"""What a configuration costs, computed from the config alone: parameters (exact), training FLOPs per
token, KV-cache bytes per token and an activation-memory estimate. Tests check the parameter formula against
the built modules and the activation estimate against the tensors autograd actually saves."""

from __future__ import annotations

from .config import ModelConfig


def _norm(cfg: ModelConfig, d: int) -> int:
    return d if cfg.norm == "rmsnorm" or not cfg.norm_bias else 2 * d


def _linear(cfg_bias: bool, n_in: int, n_out: int) -> int:
    return n_in * n_out + (n_out if cfg_bias else 0)


def _mlp(cfg: ModelConfig, hidden: int) -> int:
    return _linear(cfg.mlp_bias, cfg.dim, hidden * (2 if cfg.gated else 1)) + _linear(cfg.mlp_bias, hidden, cfg.dim)


def _attention(cfg: ModelConfig) -> int:
    D, H = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
        else:
            q = _linear(cfg.qkv_bias, D, H * qk)
        kv = _linear(cfg.qkv_bias, D, cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
        kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + _linear(cfg.attn_out_bias, H * cfg.v_head_dim, D)
    hd = cfg.head_dim
    qkv = _linear(cfg.qkv_bias, D, (H + 2 * cfg.n_kv_heads) * hd)
    return qkv + _linear(cfg.attn_out_bias, H * hd, D) + (2 * hd if cfg.qk_norm else 0)


def _ffn(cfg: ModelConfig, layer: int) -> int:
    if not cfg.is_moe_layer(layer):
        return _mlp(cfg, cfg.hidden_dim)
    shared = _mlp(cfg, cfg.moe_hidden_dim * cfg.n_shared_experts) if cfg.n_shared_experts else 0
    return cfg.dim * cfg.n_experts + cfg.n_experts * _mlp(cfg, cfg.moe_hidden_dim) + shared


def _head(cfg: ModelConfig) -> int:
    D, V = cfg.dim, cfg.vocab_size
    tied = cfg.tie_embeddings
    if cfg.head == "lm":
        return (0 if tied else D * V) + (V if cfg.lm_head_bias else 0)
    if cfg.head == "mlm":
        return D * D + D + 2 * D + (0 if tied else D * V) + V
    if cfg.head == "classification":
        return (D * D + D if cfg.classifier_pooler else 0) + D * cfg.n_labels + cfg.n_labels
    if cfg.head == "token_classification":
        return D * cfg.n_labels + cfg.n_labels
    if cfg.head == "span":
        return 2 * D + 2
    return 0


def num_parameters(cfg: ModelConfig) -> int:
    D = cfg.dim
    n = cfg.vocab_size * D + cfg.n_token_types * D
    n += cfg.max_seq_len * D if cfg.position == "learned" else 0
    n += _norm(cfg, D) if cfg.embed_norm else 0
    for layer in range(cfg.n_layers):
        n += 2 * _norm(cfg, D) + _attention(cfg) + _ffn(cfg, layer)
    n += _norm(cfg, D) if cfg.norm_placement == "pre" else 0
    return n + _head(cfg)


def _matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights each token multiplies with (MoE: router, top_k routed and the shared experts only)."""
    D = cfg.dim
    n = 0
    for layer in range(cfg.n_layers):
        n += _attention(cfg)
        if cfg.is_moe_layer(layer):
            n += D * cfg.n_experts + cfg.moe_top_k * _mlp(cfg, cfg.moe_hidden_dim)
            n += _mlp(cfg, cfg.moe_hidden_dim * cfg.n_shared_experts) if cfg.n_shared_experts else 0
        else:
            n += _mlp(cfg, cfg.hidden_dim)
    if cfg.head in ("lm", "mlm"):
        n += D * cfg.vocab_size + (D * D if cfg.head == "mlm" else 0)
    return n


def mean_context(cfg: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends to: T (encoder), (T+1)/2 (causal), capped by the window."""
    W = cfg.sliding_window or seq_len
    if cfg.kind == "encoder":
        return sum(min(i + W, seq_len) - max(i - W + 1, 0) for i in range(seq_len)) / seq_len
    return sum(min(i + 1, W) for i in range(seq_len)) / seq_len


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward = 3 × forward (Kaplan et al. 2020; PaLM appendix B).
    Forward: 2 FLOPs per weight a token meets, plus per layer 2·H·ctx·(d_qk + d_v) for QKᵀ and PV."""
    attn = 2 * cfg.n_heads * mean_context(cfg, seq_len) * (cfg.qk_head_dim + cfg.value_head_dim) * cfg.n_layers
    return 3 * (2 * _matmul_params_per_token(cfg) + attn)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """K and V per layer (2·L·H_kv·d); MLA keeps only the latent and the shared rotary key."""
    if cfg.attention == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * per_layer * bytes_per_element


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, bytes_per_element: int = 4) -> int:
    """Estimate of the activations autograd keeps for backward (sdpa/flash backend, no dropout).

    Per token and layer: the two norms keep input, normalized input and output, and the residual adds keep
    their sums (8·D all told), Q K V (or MLA's pieces), the attention
    output twice (the kernel's and the reshaped copy the output projection keeps), and the MLP's hidden
    tensors (gated: up/gate, act(gate), product = 4·hidden; plain: 2·hidden). Head: final norm in and out
    and the logits. With gradient checkpointing only each block's input is kept, plus one block live.
    """
    D, H = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        qkv = H * cfg.qk_head_dim * 2 + H * cfg.v_head_dim + cfg.kv_lora_rank * 2 + cfg.qk_rope_head_dim
    else:
        qkv = (H + 2 * cfg.n_kv_heads) * cfg.head_dim
    attn = qkv + 2 * H * cfg.value_head_dim
    if cfg.attn_backend == "math":
        attn += 2 * H * mean_context(cfg, seq_len) * 2  # scores and probabilities, full rows

    def mlp(hidden: int) -> int:
        return (4 if cfg.gated else 2) * hidden

    per_layer = []
    for layer in range(cfg.n_layers):
        if cfg.is_moe_layer(layer):
            ffn = cfg.moe_top_k * (mlp(cfg.moe_hidden_dim) + D) + 2 * cfg.n_experts
            ffn += mlp(cfg.moe_hidden_dim * cfg.n_shared_experts) if cfg.n_shared_experts else 0
        else:
            ffn = mlp(cfg.hidden_dim)
        per_layer.append(8 * D + attn + ffn)
    head = 2 * D + (cfg.vocab_size if cfg.head in ("lm", "mlm") else 0)
    if cfg.gradient_checkpointing:
        total = cfg.n_layers * D + max(per_layer) + head
    else:
        total = sum(per_layer) + head
    return int(batch * seq_len * total * bytes_per_element)
