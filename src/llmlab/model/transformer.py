"""The Transformer: embeddings → N blocks (attention + MLP or MoE, pre- or post-norm) → head.

Decoder, encoder and prefix-LM differ only in the attention mask; LLaMA, Qwen2, Mistral, GPT-2, BERT and
DeepSeek-style models differ only in the options of ModelConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import make_attention
from .cache import KVCache
from .config import ModelConfig
from .heads import HEADS, head_loss
from .losses import linear_cross_entropy
from .mask import AttentionMask
from .mlp import MLP
from .moe import MoE
from .norm import make_norm
from .position import Rotary, alibi_slopes, run_starts, sinusoidal_table


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab] (LM/MLM), [B, n_labels], [B, T, n_labels] or [B, T, 2] (span)
    hidden_states: torch.Tensor  # final hidden states [B, T, dim] (after the final norm)
    loss: torch.Tensor | None = None  # head loss + MoE auxiliary loss, when labels are given
    aux_loss: torch.Tensor | None = None  # MoE load-balancing + z-loss (already weighted)
    attentions: list[torch.Tensor] | None = None  # per layer [B, H, T, Tk] when need_weights
    cache: KVCache | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = make_attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _mlp(self, x: torch.Tensor, mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mlp(x, mask.real_queries()) if isinstance(self.mlp, MoE) else (self.mlp(x), None)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # no module call when dropout does nothing: per-call overhead is what a batch-1 decode step is made of
        return self.drop(x) if self.training and self.drop.p > 0 else x

    def forward(self, x, rope, mask, cache=None, need_weights=False):
        if self.pre_norm:  # x + f(norm(x)) (GPT-2 onwards)
            a, probs = self.attn(self.attn_norm(x), rope, mask, cache, self.layer, need_weights)
            x = x + self._drop(a)
            m, aux = self._mlp(self.mlp_norm(x), mask)
            return x + self._drop(m), aux, probs
        # norm(x + f(x)) (original Transformer, BERT)
        a, probs = self.attn(x, rope, mask, cache, self.layer, need_weights)
        x = self.attn_norm(x + self._drop(a))
        m, aux = self._mlp(x, mask)
        return self.mlp_norm(x + self._drop(m)), aux, probs


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.type_emb = nn.Embedding(cfg.n_token_types, cfg.dim) if cfg.n_token_types else None
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.dim), persistent=False)
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        if cfg.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_heads), persistent=False)
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_placement == "pre" else None
        self.head = HEADS[cfg.head](cfg) if cfg.head != "none" else None
        self.apply(self._init_weights)
        if cfg.tie_embeddings and cfg.head in ("lm", "mlm"):
            self.head.proj.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module) -> None:
        # N(0, σ) everywhere; residual projections get σ/√(2L) so the residual stream's variance does not
        # grow with depth (GPT-2, Radford et al. 2019).
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | int | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        return_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] (int); attention_mask [B, T] or, with a cache, [B, cached + T] (1 = real token);
        prefix_len [B] or int: length of the bidirectional prefix (prefix_lm only).
        document_ids [B, T]: several documents packed in one row; attention stays inside each document and
        positions restart at each document (unless position_ids are given), so every document gets exactly
        the logits it gets alone.
        return_logits=False with labels on an LM head computes the loss chunk by chunk without ever holding
        the [B, T, vocab] logits (losses.linear_cross_entropy); out.logits is then None. Without labels it
        skips the head (the inference engine applies it to the positions it samples from).
        inputs_embeds [B, T, dim] (float) replaces the token embedding lookup tok_emb(input_ids) (then pass
        input_ids=None): soft prompts (peft/prompt.py) feed vectors that are no token. Everything after the
        lookup (embed_scale, token types, learned/sinusoidal positions, the embedding norm) applies as usual."""
        cfg = self.cfg
        if inputs_embeds is not None:
            self._check_embeds(input_ids, inputs_embeds)
            # positions, masks and the checks below need only the ids' shape and device: a placeholder
            input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        self._check_input(input_ids, attention_mask, prefix_len, cache, check_values=inputs_embeds is None)
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if document_ids is not None:
            if cache is not None or document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids must have the shape of input_ids {tuple(input_ids.shape)} and "
                                 "cannot be combined with a KV cache (it is for packed training batches)")
            if position_ids is None:  # restart positions at each document: index minus its document's start
                idx = torch.arange(T, device=input_ids.device).expand(B, T)
                position_ids = idx - torch.where(run_starts(document_ids), idx, 0).cummax(dim=1).values
        query_valid, n_keys, segments = None, offset + T, None
        if getattr(cache, "per_row", False):
            # An inference-engine batch: rows of different lengths, each with its keys left-aligned, or several
            # sequences packed into one row; the cache view knows offsets, key validity, positions and segments.
            offset, n_keys, key_valid, query_valid = cache.q_offset, cache.n_keys, cache.key_valid, cache.query_valid
            positions, segments = cache.positions, cache.segments
        else:
            key_valid, positions = self._keys_and_positions(input_ids, attention_mask, position_ids, cache, offset)

        h = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        if cfg.embed_scale != 1.0:
            h = h * cfg.embed_scale
        if self.type_emb is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            h = h + self.type_emb(types)
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions)
        elif cfg.position == "sinusoidal":
            h = h + self.pos_table[positions].to(h.dtype)
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        h = self.drop(h)

        rope = None
        if self.rotary is not None:
            rope = self.rotary(positions, h.dtype, self._sequences(document_ids, segments, positions))
        key_pos = None
        if prefix_len is not None:
            prefix_len = torch.as_tensor(prefix_len, device=input_ids.device).expand(B)
            key_pos = positions if cache is None else cache.key_pos
        mask = AttentionMask(
            causal=cfg.is_causal, n_queries=T, n_keys=n_keys, q_offset=offset, key_valid=key_valid,
            query_valid=query_valid,
            key_pos=key_pos, prefix_len=prefix_len, window=cfg.sliding_window,
            alibi=self.alibi if cfg.position == "alibi" else None, document_ids=document_ids, segments=segments,
        )

        aux_total, attentions = None, [] if need_weights else None
        for block in self.blocks:
            if cfg.gradient_checkpointing and self.training and cache is None:
                h, aux, probs = checkpoint(block, h, rope, mask, None, need_weights, use_reentrant=False)
            else:
                h, aux, probs = block(h, rope, mask, cache, need_weights)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
            if need_weights:
                attentions.append(probs)
        if cache is not None:
            cache.length += T
        if self.norm is not None:
            h = self.norm(h)
        if labels is not None and self.head is None:
            raise ValueError("labels were given but the model has head='none'; pick a head in ModelConfig")
        logits, loss = None, None
        if labels is not None and not return_logits and cfg.head == "lm":
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t+1
            proj = self.head.proj
            loss = linear_cross_entropy(h.flatten(0, 1), proj.weight, shifted.flatten(), proj.bias)
        elif self.head is not None and (return_logits or labels is not None):
            logits = self.head(h, attention_mask if attention_mask is None else attention_mask[:, -T:])
            if labels is not None:
                loss = head_loss(cfg, logits, labels)
        if loss is not None:
            if aux_total is not None:
                loss = loss + aux_total
        return ModelOutput(logits, h, loss, aux_total, attentions, cache)

    def _check_embeds(self, input_ids, inputs_embeds) -> None:
        if input_ids is not None:
            raise ValueError("pass either input_ids or inputs_embeds to forward(), not both")
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError("inputs_embeds must be a floating-point torch.Tensor [batch, seq, dim]")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.dim:
            raise ValueError(f"inputs_embeds must have shape [batch, seq, dim={self.cfg.dim}], "
                             f"got {tuple(inputs_embeds.shape)}")

    def _check_input(self, input_ids, attention_mask, prefix_len, cache, check_values: bool = True) -> None:
        cfg = self.cfg
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}; "
                            "use input_ids.long()")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}; "
                             "add a batch dimension with input_ids[None]")
        # The range check reads values back to Python, which would break a torch.compile graph: eager only.
        if check_values and input_ids.numel() and not torch.compiler.is_compiling() and \
                (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}) (vocab_size); "
                             f"got values in [{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None:
            past = cache.length if cache is not None else 0
            if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0] or \
                    attention_mask.shape[1] not in (input_ids.shape[1], past + input_ids.shape[1]):
                raise ValueError(f"attention_mask must have shape [batch, seq] = {tuple(input_ids.shape)} "
                                 f"(or [batch, cached + seq]); got {tuple(attention_mask.shape)}")
        if cfg.kind == "prefix_lm" and prefix_len is None:
            raise ValueError("a prefix_lm model needs prefix_len (an int or a [batch] tensor) in forward()")
        if cfg.kind != "prefix_lm" and prefix_len is not None:
            raise ValueError(f"prefix_len is only used by kind='prefix_lm'; this model is kind={cfg.kind!r}")

    def _sequences(self, document_ids, segments, positions: torch.Tensor) -> torch.Tensor | None:
        """[1 or B, T] which sequence each query belongs to in a packed row (dynamic NTK stretches RoPE by each
        sequence's own length); None when every row is one sequence or nothing needs it."""
        if self.cfg.rope_scaling != "dynamic_ntk":
            return None
        if document_ids is not None:
            return document_ids
        if segments is not None:  # the engine's packed prompt chunks: (q0, q1, k0, k1, cached) per sequence
            sizes = torch.tensor([q1 - q0 for q0, q1, *_ in segments], device=positions.device)
            return torch.repeat_interleave(torch.arange(len(segments), device=positions.device), sizes)[None]
        return None

    def _keys_and_positions(self, input_ids, attention_mask, position_ids, cache, offset):
        """Validity of every key (None when there is no padding) and the positions of the new tokens.
        With padding, positions count real tokens only, so a left-padded sequence gets the same positions
        (and logits) as the sequence alone."""
        B, T = input_ids.shape
        device = input_ids.device
        new_valid = None
        if attention_mask is not None:
            new_valid = attention_mask[:, -T:].bool()
            if cache is None and bool(new_valid.all()):
                new_valid = None
        past_valid = cache.key_valid if cache is not None else None
        if new_valid is None and past_valid is None:
            key_valid = None
            pos = torch.arange(offset, offset + T, device=device).expand(B, T)
        else:
            if new_valid is None:
                new_valid = torch.ones(B, T, dtype=torch.bool, device=device)
            if past_valid is None and offset:
                past_valid = torch.ones(B, offset, dtype=torch.bool, device=device)
            seen = past_valid.sum(dim=1, keepdim=True) if past_valid is not None else 0
            pos = (seen + new_valid.long().cumsum(dim=1) - 1).clamp_min(0)
            key_valid = new_valid if past_valid is None else torch.cat((past_valid, new_valid), dim=1)
        if position_ids is not None:
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids must have shape {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}")
            pos = position_ids
        if self.cfg.position in ("learned", "sinusoidal") and T and int(pos.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(pos.max())} is beyond max_seq_len={self.cfg.max_seq_len} of the "
                             f"{self.cfg.position} position table; shorten the input or raise max_seq_len")
        if cache is not None:
            cache.key_valid = key_valid
            cache.key_pos = pos if cache.length == 0 else torch.cat((cache.key_pos, pos), dim=1)
        return key_valid, pos
