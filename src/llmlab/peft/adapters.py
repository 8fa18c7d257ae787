"""Bottleneck adapters (Houlsby / Pfeiffer) and AdapterFusion on llmlab's Transformer (our own code).

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751), insert a small
bottleneck with its own residual connection after each sublayer of every block:

    adapter(h) = h + W_up · act(W_down · h + b_down) + b_up          W_down: [b, dim], W_up: [dim, b]

where h is the sublayer's output (attention after its output projection, or the MLP's output) BEFORE the
block adds its residual stream. Pre-norm:  x + adapter(attn(norm(x))),  post-norm (BERT):
norm(x + adapter(attn(x))), which is exactly the paper's placement in BERT. W_up and b_up start at zero, so
a fresh adapter is the identity and the model's outputs are unchanged; W_down starts at N(0, init_std) so
W_up gets a useful gradient from the first step. Per adapter and per placement: 2·dim·b + b + dim numbers.

Placement "both" is Houlsby's (after attention and after the MLP); "mlp" is Pfeiffer et al. 2021's cheaper
variant (after the MLP only), which they found as good.

AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
arXiv:2005.00247) combines N trained, frozen adapters with a learned attention at every placement of every
layer. With h the sublayer output (the query's source) and z_n = adapter_n(h):

    q = Q h + b_Q          k_n = K z_n                v_n = V z_n + b_V
    s = softmax_n(q · k_n)                                          (over the adapters, per token)
    fused = Σ_n s_n v_n

K has no bias: q · (K z_n + b) = q · K z_n + q · b shifts every adapter's score by the same amount, which the
softmax ignores, so such a bias would never get a gradient. Q and K start at N(0, init_std) and V at the
identity (zero biases), as in the paper, so at the start the output is a convex combination of the adapters'
outputs. Only Q, K, V train (3·dim² + 2·dim per placement). With one adapter the softmax is 1 and, V = I,
fusion returns that adapter's output exactly.

Implementation (the (IA)³ style, peft/ia3.py): no layer is replaced, so module names, fused layouts and the
HF converters are untouched. Each hooked sublayer (`blocks.{i}.attn`, `blocks.{i}.mlp`) gets a child module
`adapters` (an AdapterSlot holding every named adapter and fusion at that site) and a forward hook that
rewrites the sublayer's output (the first element of a tuple output: attention returns (out, probs), MoE
(out, aux)). The hook runs before the block's residual dropout, i.e. the adapter sees drop-free sublayer
outputs and its result is dropped out with the branch (Houlsby's BERT code applies dropout first; identical
at eval and with dropout = 0).

Setups: set_adapters(model, names) runs the named adapters one after another at every site (several names =
a stack, as MAD-X stacks a task adapter on a language adapter) and makes exactly their parameters trainable;
set_fusion(model, names) (add_fusion activates it too) runs the fusion over names, adapters frozen, fusion
trainable. Every other parameter of the model is frozen by both (unfreeze a new head yourself).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
# placement -> the sublayers that get an adapter
PLACEMENTS = {"both": ("attn", "mlp"), "mlp": ("mlp",)}
SITES = ("attn", "mlp")


@dataclass
class AdapterConfig:
    bottleneck: int | None = None  # hidden size b of the bottleneck; None: dim // reduction_factor
    reduction_factor: int = 16
    placement: str = "both"  # "both" (Houlsby: after attention and MLP) or "mlp" (Pfeiffer: after the MLP)
    activation: str = "relu"
    init_std: float = 0.02  # W_down ~ N(0, init_std); W_up, b_up, b_down = 0

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {list(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"AdapterConfig.bottleneck must be >= 1, got {self.bottleneck}")
        if self.reduction_factor < 1:
            raise ValueError(f"AdapterConfig.reduction_factor must be >= 1, got {self.reduction_factor}")

    def hidden(self, dim: int) -> int:
        return self.bottleneck if self.bottleneck is not None else max(1, dim // self.reduction_factor)

    def to_dict(self) -> dict:
        return asdict(self)


class Bottleneck(nn.Module):
    """h + up(act(down(h))), up zero-initialized (identity at init)."""

    def __init__(self, dim: int, config: AdapterConfig, dtype, device):
        super().__init__()
        b = config.hidden(dim)
        self.activation = config.activation
        self.down = nn.Linear(dim, b, dtype=dtype, device=device)
        self.up = nn.Linear(b, dim, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, 0.0, config.init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(ACTIVATIONS[self.activation](self.down(h)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class Fusion(nn.Module):
    """AdapterFusion at one site: softmax over adapters of (Q h)·(K z_n), values V z_n (V = I at init)."""

    def __init__(self, dim: int, names: tuple[str, ...], init_std: float, dtype, device):
        super().__init__()
        self.names = names
        self.query = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.key = nn.Linear(dim, dim, bias=False, dtype=dtype, device=device)  # a bias cancels in the softmax
        self.value = nn.Linear(dim, dim, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(self.query.weight, 0.0, init_std)
            nn.init.zeros_(self.query.bias)
            nn.init.normal_(self.key.weight, 0.0, init_std)
            self.value.weight.copy_(torch.eye(dim, dtype=dtype, device=device))
            nn.init.zeros_(self.value.bias)

    def weights(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h [..., dim], z [..., N, dim] -> s [..., N] (sums to 1 over the adapters)."""
        q = self.query(h)
        k = self.key(z)
        return torch.softmax((k * q.unsqueeze(-2)).sum(-1), dim=-1)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        s = self.weights(h, z)
        return (s.unsqueeze(-1) * self.value(z)).sum(-2)

    def extra_repr(self) -> str:
        return f"adapters={list(self.names)}"


def fusion_key(names: Sequence[str]) -> str:
    return ",".join(names)


class AdapterSlot(nn.Module):
    """Child `adapters` of a hooked sublayer: adapter name -> Bottleneck, fusion key -> Fusion, the setup
    in use, and the forward hook applying it to the sublayer's output."""

    def __init__(self, module_name: str, dim: int):
        super().__init__()
        self.module_name, self.dim = module_name, dim
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.active: tuple[str, ...] = ()  # stack, applied in order
        self.fusion: str | None = None  # key of the active fusion (overrides the stack)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fusion is not None and self.fusion in self.fusions:
            f = self.fusions[self.fusion]
            z = torch.stack([self.adapters[n](h) for n in f.names], dim=-2)  # [..., N, dim]
            return f(h, z)
        for name in self.active:
            if name in self.adapters:
                h = self.adapters[name](h)
        return h

    def hook(self, module: nn.Module, args, out):
        if isinstance(out, tuple):
            return (self(out[0]), *out[1:])
        return self(out)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, fusion={self.fusion!r}"


# ============================================================================================ public API
_BLOCK = re.compile(r"(?:(?P<prefix>.*)\.)?blocks\.(?P<i>\d+)")


def _configs(model: nn.Module) -> dict[str, AdapterConfig]:
    if not hasattr(model, "adapter_configs"):
        model.adapter_configs = {}
    return model.adapter_configs


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, block, dim) of every Transformer block (the model itself or a wrapper around it)."""
    found = []
    for name, m in model.named_modules():
        match = _BLOCK.fullmatch(name)
        if match is None or not (hasattr(m, "attn") and hasattr(m, "mlp")):
            continue
        owner = model.get_submodule(match.group("prefix") or "")
        cfg = getattr(owner, "cfg", None)
        if cfg is None:
            raise ValueError(f"{name}: the module holding the blocks has no .cfg (ModelConfig) to read dim from")
        found.append((name, m, cfg.dim))
    if not found:
        raise ValueError("no Transformer blocks (modules `blocks.{i}` with .attn and .mlp) in this model")
    return found


def _slots(model: nn.Module) -> dict[str, AdapterSlot]:
    """sublayer name (`blocks.{i}.attn` / `.mlp`) -> its AdapterSlot, for the sites that have one."""
    return {n: m.adapters for n, m in model.named_modules() if isinstance(getattr(m, "adapters", None), AdapterSlot)}


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    have = list(_configs(model))
    for name in names:
        if name not in have:
            raise ValueError(f"no adapter named {name!r} on this model; adapters: {have or 'none (call add_adapter)'}")


def _normalize(names: str | Sequence[str] | None) -> tuple[str, ...]:
    if names is None:
        return ()
    names = (names,) if isinstance(names, str) else tuple(names)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {list(names)}")
    return names


def add_adapter(model: nn.Module, config: AdapterConfig | None = None, name: str = "default") -> nn.Module:
    """Add bottleneck adapter `name` (identity at init) at the config's placement in every block, make it
    the only active adapter and the only trainable parameters (set_adapters(model, name))."""
    config = config or AdapterConfig()
    if name in _configs(model):
        raise ValueError(f"adapter {name!r} already exists; adapters: {list(_configs(model))}")
    if not name or "." in name or "," in name:
        raise ValueError(f"adapter name must be non-empty and without '.' or ',', got {name!r}")
    for block_name, block, dim in _blocks(model):
        for site in PLACEMENTS[config.placement]:
            sub = getattr(block, site)
            if not isinstance(getattr(sub, "adapters", None), AdapterSlot):
                if hasattr(sub, "adapters"):
                    raise ValueError(f"{block_name}.{site} already has an attribute `adapters`")
                sub.adapters = AdapterSlot(f"{block_name}.{site}", dim)
                sub.register_forward_hook(sub.adapters.hook)
            ref = next(sub.parameters())
            sub.adapters.adapters[name] = Bottleneck(dim, config, ref.dtype, ref.device)
    _configs(model)[name] = config
    set_adapters(model, name)
    return model


def set_adapters(model: nn.Module, names: str | Sequence[str] | None, *, train: bool = True) -> None:
    """Run adapters `names` at every site, in the given order (one name, or a stack); None/[] = the base
    model. Freezes every parameter, then (train=True) unfreezes exactly these adapters'."""
    names = _normalize(names)
    _check_names(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for slot in _slots(model).values():
        slot.active, slot.fusion = names, None
        if train:
            for n in names:
                if n in slot.adapters:
                    for p in slot.adapters[n].parameters():
                        p.requires_grad_(True)
    model.adapter_setup = ("stack", names)


def add_fusion(model: nn.Module, adapter_names: Sequence[str], *, init_std: float = 0.02) -> nn.Module:
    """Add AdapterFusion over `adapter_names` (>= 1 adapters) at every site where they sit, and make it
    active: the adapters are frozen, only the fusion's Q, K, V train (set_fusion)."""
    names = _normalize(adapter_names)
    if not names:
        raise ValueError("add_fusion needs at least one adapter name")
    _check_names(model, names)
    key = fusion_key(names)
    if key in getattr(model, "adapter_fusions", ()):
        raise ValueError(f"a fusion over {list(names)} already exists")
    slots = _slots(model)
    for site, slot in slots.items():
        present = [n for n in names if n in slot.adapters]
        if present and len(present) != len(names):
            missing = [n for n in names if n not in present]
            raise ValueError(f"{site}: adapters {missing} are not placed here but {present} are; fuse adapters "
                             "with the same placement")
    for slot in slots.values():
        if names[0] in slot.adapters:
            ref = next(slot.adapters[names[0]].parameters())
            slot.fusions[key] = Fusion(slot.dim, names, init_std, ref.dtype, ref.device)
    if not hasattr(model, "adapter_fusions"):
        model.adapter_fusions = []
    model.adapter_fusions.append(key)
    set_fusion(model, names)
    return model


def set_fusion(model: nn.Module, adapter_names: Sequence[str], *, train: bool = True) -> None:
    """Run the fusion over `adapter_names` (added by add_fusion). Freezes every parameter, then (train=True)
    unfreezes the fusion's; the fused adapters stay frozen (Pfeiffer et al.'s second stage)."""
    names = _normalize(adapter_names)
    key = fusion_key(names)
    if key not in getattr(model, "adapter_fusions", ()):
        raise ValueError(f"no fusion over {list(names)}; fusions: {getattr(model, 'adapter_fusions', [])}")
    for p in model.parameters():
        p.requires_grad_(False)
    for slot in _slots(model).values():
        slot.active, slot.fusion = (), key
        if train and key in slot.fusions:
            for p in slot.fusions[key].parameters():
                p.requires_grad_(True)
    model.adapter_setup = ("fusion", names)


def active_adapters(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """("stack", names) or ("fusion", names); ("stack", ()) when no adapter was ever added."""
    return getattr(model, "adapter_setup", ("stack", ()))


def adapter_modules(model: nn.Module, name: str) -> dict[str, Bottleneck]:
    """sublayer name -> adapter `name`'s Bottleneck there."""
    _check_names(model, (name,))
    return {site: slot.adapters[name] for site, slot in _slots(model).items() if name in slot.adapters}


def fusion_modules(model: nn.Module, adapter_names: Sequence[str]) -> dict[str, Fusion]:
    """sublayer name -> the Fusion over `adapter_names` there."""
    key = fusion_key(_normalize(adapter_names))
    return {site: slot.fusions[key] for site, slot in _slots(model).items() if key in slot.fusions}


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """`{sublayer}.adapters.adapters.{name}.{down|up}.{weight|bias}` -> tensor (detached, shared storage);
    the keys are the model's own state_dict keys, so load_state_dict(..., strict=False) restores them."""
    return {f"{site}.adapters.adapters.{name}.{k}": v.detach()
            for site, mod in adapter_modules(model, name).items() for k, v in mod.state_dict().items()}


def adapter_parameter_count(dim: int, config: AdapterConfig, n_layers: int) -> int:
    """Closed form: n_layers · placements · (2·dim·b + b + dim)."""
    b = config.hidden(dim)
    return n_layers * len(PLACEMENTS[config.placement]) * (2 * dim * b + b + dim)


def save_bottleneck_adapter(model: nn.Module, path, name: str = "default") -> None:
    """adapter `name` to `path`/: bottleneck_adapter.safetensors (our state-dict keys; PEFT has no bottleneck
    adapters, so no PEFT format) and bottleneck_adapter.json (its AdapterConfig)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    _check_names(model, [name])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    save_file(tensors, str(path / "bottleneck_adapter.safetensors"), metadata={"format": "pt"})
    (path / "bottleneck_adapter.json").write_text(json.dumps(
        {"peft_type": "BOTTLENECK_ADAPTER (llmlab names)", "name": name, **_configs(model)[name].to_dict()},
        indent=2) + "\n")


def load_bottleneck_adapter(model: nn.Module, path) -> str:
    """Add the adapter saved by save_bottleneck_adapter to `model` (made active and trainable, as add_adapter
    does) and return its name. A model of another shape is refused naming the first tensor that differs."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "bottleneck_adapter.json").is_file():
        raise FileNotFoundError(f"{path} has no bottleneck_adapter.json (written by save_bottleneck_adapter)")
    meta = json.loads((path / "bottleneck_adapter.json").read_text())
    name = meta.pop("name")
    meta.pop("peft_type", None)
    add_adapter(model, AdapterConfig(**meta), name)
    tensors = load_file(str(path / "bottleneck_adapter.safetensors"))
    own = model.state_dict()
    for key, value in tensors.items():
        if key not in own or own[key].shape != value.shape:
            got = tuple(own[key].shape) if key in own else "no such module"
            raise ValueError(f"adapter tensor {key} {tuple(value.shape)} does not fit this model ({got}): it was "
                             "trained on a base model of another shape")
    model.load_state_dict(tensors, strict=False)
    return name
