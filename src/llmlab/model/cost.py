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


def _attention(cfg: ModelConfig, norm_gains: bool = True) -> int:
    """Parameters of one attention layer; norm_gains=False leaves out its norms (MLA's latent norms, QK-norm),
    which scale rather than multiply matrices."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        gains = (cfg.kv_lora_rank + cfg.q_lora_rank) if norm_gains else 0
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk if cfg.q_lora_rank else _linear(cfg.qkv_bias, D, H * qk)
        kv = _linear(cfg.qkv_bias, D, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + gains + _linear(cfg.attn_out_bias, H * cfg.v_head_dim, D)
    hd = cfg.head_dim
    qkv = _linear(cfg.qkv_bias, D, (H + 2 * cfg.n_kv_heads) * hd)
    return qkv + _linear(cfg.attn_out_bias, H * hd, D) + (2 * hd if cfg.qk_norm and norm_gains else 0)


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


def _layer_matmul_params(cfg: ModelConfig, layer: int) -> int:
    """Weights each token multiplies with in one block (MoE: router, top_k routed and the shared experts only)."""
    n = _attention(cfg, norm_gains=False)
    if cfg.is_moe_layer(layer):
        n += cfg.dim * cfg.n_experts + cfg.moe_top_k * _mlp(cfg, cfg.moe_hidden_dim)
        n += _mlp(cfg, cfg.moe_hidden_dim * cfg.n_shared_experts) if cfg.n_shared_experts else 0
    else:
        n += _mlp(cfg, cfg.hidden_dim)
    return n


def _head_matmul_params(cfg: ModelConfig) -> int:
    D = cfg.dim
    return D * cfg.vocab_size + (D * D if cfg.head == "mlm" else 0) if cfg.head in ("lm", "mlm") else 0


def _matmul_params_per_token(cfg: ModelConfig) -> int:
    return sum(_layer_matmul_params(cfg, layer) for layer in range(cfg.n_layers)) + _head_matmul_params(cfg)


def mean_context(cfg: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends to: T (encoder), (T+1)/2 (causal), capped by the window."""
    W = cfg.sliding_window or seq_len
    if cfg.kind == "encoder":
        return sum(min(i + W, seq_len) - max(i - W + 1, 0) for i in range(seq_len)) / seq_len
    return sum(min(i + 1, W) for i in range(seq_len)) / seq_len


def training_flops_per_token(cfg: ModelConfig, seq_len: int, *, first_trained_layer: int = 0,
                             trained_weights: int | None = None) -> float:
    """Forward + backward = 3 × forward when every weight trains (Kaplan et al. 2020; PaLM appendix B).
    Forward F: 2 FLOPs per weight a token meets, plus per layer 2·H·ctx·(d_qk + d_v) for QKᵀ and PV.

    With frozen weights (PEFT, a reward model's LoRA on the last blocks) backward does less: gradients flow back
    only from the loss to the first layer that holds a trained parameter, costing that path's forward FLOPs once
    for the inputs' gradients (2·N_path + attention_path), and once more for the gradients of what is trained
    there (2·trained_weights + attention_path: attention's other operand is an activation, so it counts in full).
        total = F + (2·N_path + A_path) + (2·trained_weights + A_path)
    Defaults (everything trains) give 3·F. first_trained_layer = n_layers: only the head trains, so backward
    computes its weights' gradients and nothing else."""
    attn_layer = 2 * cfg.n_heads * mean_context(cfg, seq_len) * (cfg.qk_head_dim + cfg.value_head_dim)
    forward = 2 * _matmul_params_per_token(cfg) + attn_layer * cfg.n_layers
    path_layers = range(max(0, first_trained_layer), cfg.n_layers)
    path_weights = sum(_layer_matmul_params(cfg, layer) for layer in path_layers)
    path_weights += _head_matmul_params(cfg) if path_layers else 0  # only the head trains: no input gradients
    path_attn = attn_layer * len(path_layers)
    trained = path_weights if trained_weights is None else trained_weights
    return forward + (2 * path_weights + path_attn) + (2 * trained + path_attn)


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
