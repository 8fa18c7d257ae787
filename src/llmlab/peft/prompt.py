"""Prompt methods on llmlab's Transformer: prompt tuning, P-tuning and prefix tuning (P-tuning v2), saved and
loaded in PEFT's format (our own code; the `peft` library is only the test oracle).

The base model stays frozen; only a few virtual tokens are learned.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): n soft
embeddings P [n, dim] are prepended to the token embeddings of every input,

    h_0 = [P ; E(x)]          (n·dim trainable numbers)

initialized randomly, from sampled vocabulary embeddings, or from the embeddings of a text (the text's ids cut
or repeated to n tokens, PEFT's prompt_tuning_init="TEXT"): a fresh prompt from a text is that text.

P-tuning (Liu et al. 2021, "GPT Understands, Too"): the same soft prompt, but produced by a prompt encoder
from free embeddings, P = MLP(e) or P = MLP(BiLSTM(e)); the reparameterization eases optimization and couples
the virtual tokens. After training only P matters: it is saved as a plain prompt (PEFT does the same).

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): every layer l
gets n learned key/value vectors K_l, V_l [n_kv_heads, n, head_dim] that every query attends to,

    attn_l(x) = softmax(q [K_l ; k(x)]ᵀ / √d) [V_l ; v(x)]          (2·L·n·n_kv_heads·head_dim numbers)

Optimizing those directly is unstable, so during training they come from a reparameterization: a smaller
matrix P' [n, kv_dim] through an MLP (Linear, tanh, Linear) to all 2·L prefixes (PEFT's prefix_projection).
fold() computes the prefixes once and drops the MLP for inference. P-tuning v2 (Liu et al. 2022) is the same
deep prompt without the reparameterization (prefix_projection=False).

A prefix is just a KV cache that is already filled: PrefixCache holds the prefixes as the cached keys/values
of n earlier positions, so the model needs nothing new. Its length is n, so the real tokens take positions
n, n+1, ... (as Hugging Face models do with a past_key_values of length n, which is how PEFT feeds the
prefix), and the prefix keys carry no rotary rotation (they are learned as they are used). Generation keeps
appending to the same cache.

PEFT's files: adapter_config.json (peft_type PROMPT_TUNING / P_TUNING / PREFIX_TUNING, num_virtual_tokens,
token_dim, num_layers, ...) and adapter_model.safetensors with one tensor `prompt_embeddings`: the soft
prompt [n, dim] (for P-tuning the encoder's output), or for prefix tuning the folded prefixes [n, 2·L·kv_dim]
where row t holds, for l = 0..L-1, K_l then V_l of virtual token t (heads × head_dim each).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmlab.model.cache import KVCache

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY = "prompt_embeddings"


def _check_n(n_virtual_tokens) -> int:
    if isinstance(n_virtual_tokens, bool) or not isinstance(n_virtual_tokens, int) or n_virtual_tokens < 1:
        raise ValueError(f"n_virtual_tokens must be an int >= 1, got {n_virtual_tokens!r}")
    return n_virtual_tokens


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` with the tokenizer's special tokens (PEFT calls tokenizer(text)["input_ids"]): ours and
    Hugging Face tokenizers return a list from encode(); `tokenizers.Tokenizer` returns an Encoding."""
    ids = tokenizer.encode(text)
    ids = list(getattr(ids, "ids", ids))
    if not ids:
        raise ValueError(f"init_text {text!r} encodes to no tokens")
    return [int(i) for i in ids]


def init_prompt_from_text(model, n_virtual_tokens: int, init_text: str, tokenizer) -> torch.Tensor:
    """The embeddings of `init_text`'s ids cut or repeated to n tokens ([n, dim], float32), as PEFT's TEXT init."""
    ids = _text_ids(tokenizer, init_text)
    ids = (ids * -(-n_virtual_tokens // len(ids)))[:n_virtual_tokens]  # repeat ceil(n/len) times, then cut
    if max(ids) >= model.cfg.vocab_size:
        raise ValueError(f"init_text has token id {max(ids)} beyond the model's vocab_size={model.cfg.vocab_size}; "
                         "is this the model's tokenizer?")
    return model.tok_emb.weight[torch.tensor(ids, device=model.tok_emb.weight.device)].detach().float().clone()


def _real_part(out, n: int, T: int):
    """The model output for the real tokens only: the last T positions of logits and hidden states."""
    if out.logits is not None and out.logits.dim() == 3:
        out.logits = out.logits[:, -T:]
    out.hidden_states = out.hidden_states[:, -T:]
    return out


class PromptTuning(nn.Module):
    """A frozen model with a soft prompt of n virtual tokens in front of every input.

    init: "random" (N(0, σ) with σ the std of the model's token embeddings: the prompt starts at the scale of
    real tokens; PEFT's RANDOM uses N(0, 1)), "vocab" (embeddings of n random vocabulary tokens; PEFT's
    SAMPLE_VOCAB, which Lester et al. found better than random), or init_text with its tokenizer (PEFT's TEXT).

    forward returns the model output for the REAL tokens: logits/hidden states [B, T, ...] line up with
    input_ids and labels exactly as without a prompt. PEFT instead returns logits of length n + T (the
    virtual positions first); return_virtual=True gives that. The loss is PEFT's: labels get n leading -100s,
    so the last virtual position's prediction of the first real token counts too (the soft prompt conditions
    the first token as a real prompt would).
    """

    peft_type = "PROMPT_TUNING"

    def __init__(self, model, n_virtual_tokens: int, init_text: str | None = None, tokenizer=None,
                 init: str = "random", seed: int | None = None):
        super().__init__()
        n = _check_n(n_virtual_tokens)
        if init_text is not None and tokenizer is None:
            raise ValueError("init_text needs the model's tokenizer (tokenizer=...) to turn the text into embeddings")
        if init not in ("random", "vocab"):
            raise ValueError(f"init must be 'random' or 'vocab' (or pass init_text), got {init!r}")
        _freeze(model)
        self.model = model
        self.n_virtual_tokens = n
        self.init_text = init_text
        self._init_prompt(init, init_text, tokenizer, seed)

    def _init_prompt(self, init, init_text, tokenizer, seed) -> None:
        weight = self.model.tok_emb.weight
        g = torch.Generator(device="cpu")
        g.manual_seed(seed) if seed is not None else g.seed()
        n, dim = self.n_virtual_tokens, self.model.cfg.dim
        if init_text is not None:
            prompt = init_prompt_from_text(self.model, n, init_text, tokenizer)
        elif init == "vocab":
            ids = torch.randint(0, weight.shape[0], (n,), generator=g)
            prompt = weight.detach()[ids.to(weight.device)].float().clone()
        else:
            prompt = torch.randn(n, dim, generator=g) * weight.detach().float().std().item()
        self.prompt = nn.Parameter(prompt.to(weight.device))

    def soft_prompt(self) -> torch.Tensor:
        """The n virtual token embeddings [n, dim]."""
        return self.prompt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, cache: KVCache | None = None,
                return_virtual: bool = False, **kwargs):
        """input_ids [B, T]; attention_mask [B, T] (1 = real token). With a cache that already holds the
        prompt (after a first call with cache=KVCache()), the new tokens go straight to the model, whose
        cache has the virtual tokens in front; then attention_mask covers [B, cached real tokens + T]."""
        model, n = self.model, self.n_virtual_tokens
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, seq] tensor of token ids")
        B, T = input_ids.shape
        ones = torch.ones(B, n, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            attention_mask = torch.cat((ones, attention_mask.to(ones.dtype)), dim=1)
        if cache is not None and cache.length > 0:  # decode step: the prompt is in the cache already
            return model(input_ids, attention_mask, labels=labels, cache=cache, **kwargs)
        model._check_input(input_ids, None, kwargs.get("prefix_len"), None)  # the same errors as model(input_ids)
        embeds = model.tok_emb(input_ids)
        prompt = self.soft_prompt().to(embeds.dtype)
        embeds = torch.cat((prompt.expand(B, n, -1), embeds), dim=1)
        if labels is not None:
            labels = torch.cat((torch.full_like(ones, -100), labels), dim=1)
        out = model(None, attention_mask, labels=labels, cache=cache, inputs_embeds=embeds, **kwargs)
        return out if return_virtual else _real_part(out, n, T)

    # ---------------------------------------------------------------- PEFT's adapter_config.json
    def peft_config(self) -> dict:
        cfg = self.model.cfg
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": self.n_virtual_tokens,
                "token_dim": cfg.dim, "num_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_transformer_submodules": 1, "inference_mode": True, "modules_to_save": None,
                "revision": None, "auto_mapping": None,
                "prompt_tuning_init": "TEXT" if self.init_text is not None else "RANDOM",
                "prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}

    def embeddings_to_save(self) -> torch.Tensor:
        return self.soft_prompt().detach().float().contiguous().cpu()


class PTuning(PromptTuning):
    """P-tuning: the soft prompt is a prompt encoder's output, P = MLP(e) (Linear-ReLU-Linear-ReLU-Linear,
    hidden h) or P = MLP(BiLSTM(e)) (a bidirectional LSTM of hidden h, then Linear(2h, 2h)-ReLU-Linear(2h, dim)),
    from free embeddings e [n, dim] (PEFT's PromptEncoder, the same modules). fold() replaces the encoder by
    its output (a plain soft prompt), as PEFT saves it."""

    peft_type = "P_TUNING"

    def __init__(self, model, n_virtual_tokens: int, encoder: str = "mlp", encoder_hidden_size: int | None = None,
                 encoder_num_layers: int = 2, encoder_dropout: float = 0.0, seed: int | None = None):
        if encoder not in ("mlp", "lstm"):
            raise ValueError(f"P-tuning encoder must be 'mlp' or 'lstm', got {encoder!r}")
        super().__init__(model, n_virtual_tokens, init="random", seed=seed)
        dim = model.cfg.dim
        h = encoder_hidden_size or dim
        self.encoder_type, self.encoder_hidden_size = encoder, h
        self.encoder_num_layers, self.encoder_dropout = encoder_num_layers, encoder_dropout
        device = model.tok_emb.weight.device
        if encoder == "mlp":
            self.lstm = None
            self.mlp = nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                     nn.Linear(h, dim)).to(device)
        else:
            self.lstm = nn.LSTM(dim, h, num_layers=encoder_num_layers, dropout=encoder_dropout, bidirectional=True,
                                batch_first=True).to(device)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, dim)).to(device)
        self.folded = False

    def soft_prompt(self) -> torch.Tensor:
        if self.folded:
            return self.prompt
        e = self.prompt[None]  # [1, n, dim]: the LSTM runs over the virtual tokens as one sequence
        if self.lstm is not None:
            e = self.lstm(e)[0]
        return self.mlp(e)[0]

    @torch.no_grad()
    def fold(self) -> PTuning:
        """Inference form: the encoder's output becomes the prompt; the encoder is dropped."""
        if not self.folded:
            self.prompt = nn.Parameter(self.soft_prompt().detach().clone())
            self.lstm = self.mlp = None
            self.folded = True
        return self

    def peft_config(self) -> dict:
        c = super().peft_config()
        for k in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
            c.pop(k)
        c.update(encoder_reparameterization_type=self.encoder_type.upper(),
                 encoder_hidden_size=self.encoder_hidden_size, encoder_num_layers=self.encoder_num_layers,
                 encoder_dropout=self.encoder_dropout)
        return c


# -------------------------------------------------------------------------------------------- prefix tuning
class PrefixCache(KVCache):
    """A KV cache that starts with learned per-layer prefixes: update(layer, k, v) returns [prefix_k ; k]
    (and then grows like KVCache during generation); length = n, so the real tokens take positions n, n+1, ...
    and every query sees all n prefix keys.

    prefixes: per layer (K, V), each [B, n_kv_heads, n, head_dim] (or [n_kv_heads, n, head_dim], broadcast)."""

    def __init__(self, prefixes: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
        super().__init__()
        if not prefixes:
            raise ValueError("PrefixCache needs one (key, value) prefix per layer")
        n = prefixes[0][0].shape[-2]
        for layer, (k, v) in enumerate(prefixes):
            if k.dim() == 3:
                k, v = k.expand(batch_size, *k.shape), v.expand(batch_size, *v.shape)
            self.layers[layer] = (k, v)
        self.length = n
        self.n_prefix = n
        self.key_pos = torch.arange(n, device=prefixes[0][0].device).expand(batch_size, n)  # (prefix_lm only)


class PrefixTuning(nn.Module):
    """Learned key/value prefixes of n virtual tokens in every layer of a frozen model (see the module doc).

    projection=True (PEFT's prefix_projection; Li & Liang's reparameterization): P' [n, kv_dim] through
    Linear(kv_dim, h) - tanh - Linear(h, 2·L·kv_dim) gives the prefixes while training; fold() stores them
    and drops the MLP. projection=False is P-tuning v2: the prefixes [n, 2·L·kv_dim] are the parameters.
    Initialization follows PEFT: N(0, 1) embeddings, PyTorch's default Linear init.

    forward(input_ids, attention_mask, labels, cache=None) runs the model on a fresh PrefixCache (or on the
    cache you pass, e.g. the one a previous call returned in out.cache, to keep generating)."""

    def __init__(self, model, n_virtual_tokens: int, projection: bool = False,
                 encoder_hidden_size: int | None = None, seed: int | None = None):
        super().__init__()
        n = _check_n(n_virtual_tokens)
        cfg = model.cfg
        if cfg.attention != "standard":
            raise ValueError(f"prefix tuning needs standard attention (per-head keys and values); this model "
                             f"has attention={cfg.attention!r}")
        _freeze(model)
        self.model = model
        self.n_virtual_tokens = n
        self.kv_dim = cfg.n_kv_heads * cfg.head_dim  # PEFT's token_dim for GQA models
        out = 2 * cfg.n_layers * self.kv_dim
        self.encoder_hidden_size = encoder_hidden_size or self.kv_dim
        device = model.tok_emb.weight.device
        g = torch.Generator(device="cpu")
        g.manual_seed(seed) if seed is not None else g.seed()
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(n, self.kv_dim, generator=g).to(device))
            self.transform = nn.Sequential(nn.Linear(self.kv_dim, self.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, out)).to(device)
        else:
            self.embedding = nn.Parameter(torch.randn(n, out, generator=g).to(device))
            self.transform = None

    def flat_prefix(self) -> torch.Tensor:
        """All prefixes in PEFT's layout [n, 2·L·kv_dim] (row t: K_0, V_0, K_1, V_1, ... of virtual token t)."""
        return self.transform(self.embedding) if self.transform is not None else self.embedding

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V), each [n_kv_heads, n, head_dim]."""
        cfg, n = self.model.cfg, self.n_virtual_tokens
        p = self.flat_prefix().view(n, 2 * cfg.n_layers, cfg.n_kv_heads, cfg.head_dim).permute(1, 2, 0, 3)
        dtype = self.model.tok_emb.weight.dtype
        return [(p[2 * i].to(dtype), p[2 * i + 1].to(dtype)) for i in range(cfg.n_layers)]

    def cache(self, batch_size: int) -> PrefixCache:
        return PrefixCache(self.prefixes(), batch_size)

    @torch.no_grad()
    def fold(self) -> PrefixTuning:
        """Inference form: the MLP's output becomes the prefix parameters (exactly the same forward)."""
        if self.transform is not None:
            self.embedding = nn.Parameter(self.flat_prefix().detach().clone())
            self.transform = None
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, cache: KVCache | None = None, **kwargs):
        if cache is None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError("input_ids must be a [batch, seq] tensor of token ids")
            cache = self.cache(input_ids.shape[0])
        return self.model(input_ids, attention_mask, labels=labels, cache=cache, **kwargs)

    def peft_config(self) -> dict:
        cfg = self.model.cfg
        # The file holds the folded prefixes, so prefix_projection is False: it describes the stored tensor
        # (PEFT writes its training setting there but reads the folded tensor the same way in inference mode).
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.n_virtual_tokens,
                "token_dim": self.kv_dim, "num_layers": cfg.n_layers, "num_attention_heads": cfg.n_kv_heads,
                "num_transformer_submodules": 1, "inference_mode": True, "modules_to_save": None,
                "revision": None, "auto_mapping": None, "encoder_hidden_size": self.encoder_hidden_size,
                "prefix_projection": False, "init_weights": None}

    def embeddings_to_save(self) -> torch.Tensor:
        return self.flat_prefix().detach().float().contiguous().cpu()


def p_tuning_v2(model, n_virtual_tokens: int, seed: int | None = None) -> PrefixTuning:
    """P-tuning v2 (Liu et al. 2022): deep prompts in every layer, i.e. prefix tuning without reparameterization."""
    return PrefixTuning(model, n_virtual_tokens, projection=False, seed=seed)


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -------------------------------------------------------------------------------------------- PEFT files
def save_prompt(module: PromptTuning | PrefixTuning, path: str | os.PathLike,
                base_model_name_or_path: str | None = None) -> None:
    """Write a prompt method as PEFT does, loadable with `peft.PeftModel.from_pretrained(hf_model, path)`:
    the soft prompt (P-tuning: the encoder's output; prefix tuning: the folded prefixes) as `prompt_embeddings`."""
    if not isinstance(module, (PromptTuning, PrefixTuning)):
        raise TypeError(f"save_prompt takes a PromptTuning, PTuning or PrefixTuning, got {type(module).__name__}")
    config = {**module.peft_config(), "base_model_name_or_path": base_model_name_or_path}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({KEY: module.embeddings_to_save()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_prompt(model, path: str | os.PathLike) -> PromptTuning | PrefixTuning:
    """Read a PEFT PROMPT_TUNING / P_TUNING / PREFIX_TUNING adapter onto our model, in inference form: a
    PromptTuning (P-tuning's saved prompt is the encoder's output, so it is a plain soft prompt) or a folded
    PrefixTuning. The model is frozen; the prompt stays trainable."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
    c = json.loads((path / CONFIG_NAME).read_text())
    kind = c.get("peft_type")
    if kind not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ValueError(f"{path}: peft_type={kind!r}; prompt methods are PROMPT_TUNING, P_TUNING, PREFIX_TUNING")
    if c.get("num_transformer_submodules", 1) != 1 or c.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ValueError(f"{path}: only decoder-only CAUSAL_LM prompt adapters are supported")
    if not (path / WEIGHTS_NAME).is_file():  # a pickled adapter_model.bin is never unpickled
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (re-save a .bin adapter with safe_serialization)")
    tensors = load_file(str(path / WEIGHTS_NAME))
    if set(tensors) != {KEY}:
        raise ValueError(f"{path}: expected one tensor {KEY!r}, found {sorted(tensors)}")
    t = tensors[KEY]
    n, cfg = int(c["num_virtual_tokens"]), model.cfg
    if kind == "PREFIX_TUNING":
        module = PrefixTuning(model, n, projection=False, encoder_hidden_size=c.get("encoder_hidden_size"), seed=0)
        want = (n, 2 * cfg.n_layers * module.kv_dim)
        what = f"2 · n_layers={cfg.n_layers} · n_kv_heads={cfg.n_kv_heads} · head_dim={cfg.head_dim}"
        param = module.embedding
    else:
        module = PromptTuning(model, n, seed=0)
        want, what, param = (n, cfg.dim), f"dim={cfg.dim}", module.prompt
    if tuple(t.shape) != want:
        raise ValueError(f"{path}: {KEY} has shape {tuple(t.shape)}, but this model needs {want} "
                         f"(num_virtual_tokens={n}, {what})")
    with torch.no_grad():
        param.copy_(t)
    return module


__all__ = ["PTuning", "PrefixCache", "PrefixTuning", "PromptTuning", "init_prompt_from_text", "load_prompt",
           "p_tuning_v2", "save_prompt", "trainable_count"]
