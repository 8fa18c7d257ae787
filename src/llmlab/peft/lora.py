"""LoRA, rsLoRA and DoRA adapters on llmlab's Transformer (our own code; the `peft` library is only the test
oracle).

LoRA (Hu et al. 2021, arXiv:2106.09685): freeze W [out, in] and learn a low-rank update,

    y = W x + s · B A x,      A [r, in] (Kaiming-uniform),  B [out, r] = 0,  s = alpha / r

B starts at zero so a fresh adapter leaves the model exactly as it was; only r·(in + out) numbers per layer
are trained. rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses s = alpha / sqrt(r): with alpha / r the
update's scale shrinks as r grows and large ranks learn no better than small ones; 1/sqrt(r) keeps it stable.

DoRA (Liu et al. 2024, arXiv:2402.09353) splits the weight into a magnitude and a direction,

    W' = m ⊙ (W + s·BA) / ||W + s·BA||_c

where m is a learned vector initialized to ||W||_c. As PEFT implements it, the "column" norm is taken over
the input dimension, i.e. one norm per OUTPUT row (torch.linalg.norm(W + s·BA, dim=1)), so m has `out`
entries; and the norm is detached from the graph (paper §4.3: treated as a constant, which saves memory and
barely changes the result). With g = m / ||W + s·BA|| (a per-row gain),

    y = g ⊙ (W x + s·B A x) + b = W x + b + (g - 1) ⊙ W x + g ⊙ s·B A x

which is how the forward below adds DoRA on top of the base output without a second full matmul.

Our attention has ONE fused `qkv` Linear ([q heads; k heads; v heads] by rows) and our gated MLP ONE fused
`up` Linear ([gate; up]). Hugging Face models have separate q_proj/k_proj/v_proj and gate_proj/up_proj, and a
PEFT adapter has its own A and B for each. So a wrapped layer holds a list of parts, each (row slice, A, B):
the base weight stays one matmul, and each part's delta lands in its own rows of the fused output. A LoRA
on "q" and one on "k" of the fused layer is then exactly a LoRA on q_proj and one on k_proj (GQA k/v parts
simply have fewer rows), which is what makes adapters interchangeable with PEFT (see io.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Hugging Face vocabulary -> our part names. Short names (q, k, v, o, gate, up, down) and PEFT's module
# names (q_proj, ...) are both accepted.
HF_NAMES = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "gate", "up": "up", "down": "down",
            "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down", "lm_head": "lm_head"}
WHOLE = "all"  # the part name of a whole fused layer targeted by a regex


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    # names in HF vocabulary (q k v o gate up down, or q_proj ... lm_head), mapped onto our fused layers,
    # or regexes matched in full against our module names (e.g. r"blocks\.0\.attn\.qkv", "head.proj")
    target_modules: tuple[str, ...] = ("q", "k", "v", "o")
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r} is not supported; only 'none' (biases stay frozen)")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty")

    @property
    def scaling(self) -> float:
        # LoRA: alpha / r;  rsLoRA: alpha / sqrt(r) (keeps the update's scale independent of the rank)
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of module `module`'s output, called `name` (q, k, v, o, gate, up, down, lm_head,
    or 'all' for a whole fused layer)."""
    module: str
    name: str
    start: int
    stop: int


# ============================================================================================ layers
class LoraPart(nn.Module):
    """One (row slice, A, B[, magnitude]) of a wrapped Linear, for one adapter."""

    def __init__(self, part: Part, in_features: int, r: int, scaling: float, base_rows: torch.Tensor | None,
                 dtype: torch.dtype, device):
        super().__init__()
        self.name, self.start, self.stop, self.scaling = part.name, part.start, part.stop, scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        # A as nn.Linear's default init (what PEFT uses), B = 0: the product BA starts at exactly zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(part.stop - part.start, r, dtype=dtype, device=device))
        # DoRA: m = ||W||_c per output row (B = 0, so W + s·BA = W)
        self.lora_magnitude = None if base_rows is None else \
            nn.Parameter(torch.linalg.norm(base_rows.detach().to(dtype), dim=1))
        self.merged_norm: torch.Tensor | None = None  # DoRA: ||W + s·BA|| remembered at merge, for unmerge

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def dora_gain(self, base_rows: torch.Tensor) -> torch.Tensor:
        """g = m / ||W + s·BA|| per output row, the norm detached (DoRA §4.3)."""
        with torch.no_grad():
            norm = torch.linalg.norm(base_rows.to(self.lora_A.dtype) + self.delta_weight(), dim=1)
        return self.lora_magnitude / norm


class LoraAdapter(nn.Module):
    def __init__(self, parts: dict[str, LoraPart], dropout: float):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


class LoraLinear(nn.Module):
    """A frozen nn.Linear (`base_layer`) plus named adapters, each a set of row-slice parts; one adapter (or
    none) is active. `weight` is the effective weight of the active adapter (so code that reads
    `layer.weight`, like the chunked LM loss, sees the adapted layer)."""

    def __init__(self, base_layer: nn.Linear, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def weight(self) -> torch.Tensor:
        W = self.base_layer.weight
        if self.active is None or self.active in self.merged:
            return W
        rows, at = [], 0
        for p in sorted(self.adapters[self.active].parts.values(), key=lambda p: p.start):
            rows.append(W[at:p.start])
            rows.append(self._adapted_rows(p).to(W.dtype))
            at = p.stop
        rows.append(W[at:])
        return torch.cat(rows)

    def _adapted_rows(self, p: LoraPart) -> torch.Tensor:
        base = self.base_layer.weight[p.start:p.stop]
        adapted = base.to(p.lora_A.dtype) + p.delta_weight()
        if p.lora_magnitude is not None:
            adapted = p.dora_gain(base)[:, None] * adapted
        return adapted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x).contiguous()  # its own memory, row-major: the parts add into it in place
        name = self.active
        if name is None or name in self.merged:
            return out
        adapter = self.adapters[name]
        dropped = adapter.dropout(x)
        bias = self.base_layer.bias
        for p in adapter.parts.values():
            xa = dropped.to(p.lora_A.dtype)
            delta = F.linear(F.linear(xa, p.lora_A), p.lora_B) * p.scaling  # s · B A x
            if p.lora_magnitude is not None:
                W = self.base_layer.weight[p.start:p.stop]
                g = p.dora_gain(W)
                if dropped is x:  # W x from the base output (PEFT does the same); else W·dropout(x), as PEFT
                    base = out[..., p.start:p.stop] - (bias[p.start:p.stop] if bias is not None else 0)
                else:
                    base = F.linear(xa, W.to(xa.dtype))
                # g (W x + s BA x) = W x + (g - 1) W x + g s BA x
                delta = (g - 1) * base.to(delta.dtype) + g * delta
            out[..., p.start:p.stop] += delta.to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        W = self.base_layer.weight
        for p in self.adapters[name].parts.values():
            if p.lora_magnitude is not None:
                # the norm must be the unmerged one (as forward computes it); remember it to undo the merge
                p.merged_norm = torch.linalg.norm(W[p.start:p.stop].to(p.lora_A.dtype) + p.delta_weight(), dim=1)
            W[p.start:p.stop] = self._adapted_rows(p).to(W.dtype)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        W = self.base_layer.weight
        for p in self.adapters[name].parts.values():
            rows = W[p.start:p.stop].to(p.lora_A.dtype)
            if p.lora_magnitude is not None:  # W' = g (W + s BA)  =>  W = W' / g - s BA
                rows = rows * (p.merged_norm / p.lora_magnitude)[:, None]
                p.merged_norm = None
            W[p.start:p.stop] = (rows - p.delta_weight()).to(W.dtype)
        self.merged.remove(name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active!r}, merged={self.merged}"


# ============================================================================================ targets
def _lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the model by its name (a wrapped layer under its own name, not `.base_layer`)."""
    out: dict[str, nn.Linear] = {}
    wrapped = set()
    for n, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out[n] = m.base_layer
            wrapped.add(n + ".base_layer")
        elif isinstance(m, nn.Linear) and n not in wrapped:
            out[n] = m
    return out


def natural_parts(model: nn.Module) -> dict[str, list[Part]]:
    """The parts of each Linear in Hugging Face terms: fused qkv -> q, k, v (GQA: k, v have n_kv_heads
    rows each); fused gated up -> gate, up; attn.out -> o; mlp.down -> down; head.proj -> lm_head; any other
    Linear is one part 'all'."""
    from llmlab.model.attention import Attention, MultiHeadLatentAttention
    from llmlab.model.mlp import MLP

    modules = dict(model.named_modules())
    parts: dict[str, list[Part]] = {}
    for name, lin in _linears(model).items():
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name) if parent_name else model
        out = lin.out_features
        if isinstance(parent, Attention) and leaf == "qkv":
            q, kv = parent.n_heads * parent.head_dim, parent.n_kv_heads * parent.head_dim
            p = [Part(name, "q", 0, q), Part(name, "k", q, q + kv), Part(name, "v", q + kv, q + 2 * kv)]
        elif isinstance(parent, (Attention, MultiHeadLatentAttention)) and leaf == "out":
            p = [Part(name, "o", 0, out)]
        elif isinstance(parent, MLP) and leaf == "up":
            p = [Part(name, "gate", 0, out // 2), Part(name, "up", out // 2, out)] if parent.gated \
                else [Part(name, "up", 0, out)]
        elif isinstance(parent, MLP) and leaf == "down":
            p = [Part(name, "down", 0, out)]
        elif name == "head.proj":
            p = [Part(name, "lm_head", 0, out)]
        else:
            p = [Part(name, WHOLE, 0, out)]
        parts[name] = p
    return parts


def resolve_targets(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, list[Part]]:
    """module name -> the parts the patterns select. HF names pick parts of every layer; any other pattern is
    a regex matched in full against module names (or a dotted suffix such as 'attn.out') and selects the
    whole layer."""
    catalog = natural_parts(model)
    chosen: dict[str, dict[str, Part]] = {}
    unmatched = []
    for pat in patterns:
        hit = False
        if pat in HF_NAMES:
            for module, ps in catalog.items():
                for p in ps:
                    if p.name == HF_NAMES[pat]:
                        chosen.setdefault(module, {})[p.name] = p
                        hit = True
        else:
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ValueError(f"target_modules pattern {pat!r} is not a valid regex ({e})") from None
            for module, ps in catalog.items():
                if rx.fullmatch(module) or module.endswith("." + pat):
                    # a one-part layer keeps its HF name; a fused layer as a whole is one part 'all'
                    whole = ps[0] if len(ps) == 1 else Part(module, WHOLE, 0, ps[-1].stop)
                    chosen.setdefault(module, {})[whole.name] = whole
                    hit = True
        if not hit:
            unmatched.append(pat)
    if unmatched:
        names = [n for n in catalog if not n.startswith("blocks.") or n.startswith("blocks.0.")]
        raise ValueError(
            f"target_modules {unmatched} matched no Linear layer of the model. Use Hugging Face names "
            f"(q k v o gate up down lm_head, mapped onto our fused layers) or regexes over module names; "
            f"modules that exist include: {', '.join(names[:8])}")
    out = {}
    for module, ps in chosen.items():
        if WHOLE in ps and len(ps) > 1:
            raise ValueError(f"{module}: targeted both as a whole (regex) and by parts {sorted(set(ps) - {WHOLE})}; "
                             "choose one")
        out[module] = sorted(ps.values(), key=lambda p: p.start)
    return out


# ============================================================================================ public API
def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}
    return model.lora_configs


def _check_name(model: nn.Module, name: str) -> None:
    if name not in _configs(model):
        have = list(_configs(model))
        raise ValueError(f"no LoRA adapter named {name!r} on this model; adapters: {have or 'none (call add_lora)'}")


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default", *,
             targets: dict[str, list[Part]] | None = None) -> nn.Module:
    """Wrap the target Linear layers with adapter `name` (B = 0: the model's outputs are unchanged), make it the
    active adapter and freeze everything else: only this adapter's parameters require grad.
    `targets` (module -> parts) overrides config.target_modules (load_adapter uses it)."""
    if name in _configs(model):
        raise ValueError(f"adapter {name!r} already exists; adapters: {list(_configs(model))}")
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and without '.', got {name!r}")
    if any(m.merged for m in _lora_layers(model).values()):
        raise ValueError("unmerge_lora the merged adapter before adding another")
    targets = resolve_targets(model, config.target_modules) if targets is None else targets
    linears = _linears(model)
    for module, parts in targets.items():  # check everything before changing anything
        lin = linears[module]
        for p in parts:
            if config.r > min(lin.in_features, p.stop - p.start):
                raise ValueError(f"r={config.r} is larger than min(in, out) = min({lin.in_features}, "
                                 f"{p.stop - p.start}) of {module} part {p.name!r}")
    modules = dict(model.named_modules())
    for module, parts in targets.items():
        layer = modules[module]
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer, module)
            parent_name, _, leaf = module.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, leaf, layer)
        W = layer.base_layer.weight
        # adapters of a half-precision model are kept in fp32 (as PEFT does): tiny updates survive
        dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
        lora_parts = {p.name: LoraPart(p, layer.in_features, config.r, config.scaling,
                                       W[p.start:p.stop] if config.use_dora else None, dtype, W.device)
                      for p in parts}
        layer.adapters[name] = LoraAdapter(lora_parts, config.dropout)
    _configs(model)[name] = config
    set_adapter(model, name)
    return model


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter (its parameters trainable, every other parameter frozen), or with None
    disable all adapters: the base model exactly."""
    if name is not None:
        _check_name(model, name)
    layers = _lora_layers(model)
    merged = {n for m in layers.values() for n in m.merged}
    if merged and merged != {name}:
        raise ValueError(f"adapter {sorted(merged)} is merged into the weights; unmerge_lora it before switching "
                         f"to {name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.active = name if name in layer.adapters else None
        if layer.active is not None:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
    model.lora_active = name


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "lora_active", None)


def merge_lora(model: nn.Module, name: str = "default") -> None:
    """Fold adapter `name` into the base weights (W <- W + s·BA; DoRA: W <- g (W + s·BA)) and make it the
    active one: the forward pass is then the plain model's, at no extra cost."""
    _check_name(model, name)
    set_adapter(model, name)
    for layer in _lora_layers(model).values():
        if name in layer.adapters:
            layer.merge(name)


def unmerge_lora(model: nn.Module, name: str = "default") -> None:
    """Undo merge_lora (the adapter stays active, applied on the fly again)."""
    _check_name(model, name)
    for layer in _lora_layers(model).values():
        if name in layer.adapters:
            layer.unmerge(name)


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under our module names:
    `{module}.adapters.{name}.parts.{part}.lora_A|lora_B|lora_magnitude` (detached, sharing storage with the
    parameters). PEFT-named files: io.save_adapter."""
    _check_name(model, name)
    tag = f".adapters.{name}.parts."
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if tag in k}


def lora_parts(model: nn.Module, name: str = "default") -> dict[str, dict[str, LoraPart]]:
    """module name -> part name -> LoraPart of adapter `name`."""
    _check_name(model, name)
    return {m: dict(layer.adapters[name].parts) for m, layer in _lora_layers(model).items() if name in layer.adapters}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
