"""(IA)³ on llmlab's Transformer, saved and loaded in PEFT's format (our own code; `peft` is only the test oracle).

(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638) learns three vectors per block that rescale activations element-wise:

    k' = l_k ⊙ (W_k x),    v' = l_v ⊙ (W_v x),    y = W_down (l_ff ⊙ h)   (h = act(gate) ⊙ up)

All vectors start at ones, so a fresh adapter is exactly the base model, and only 2·kv + hidden numbers per
block train (GQA: kv = n_kv_heads · head_dim). Because a rescaling is linear, merging is exact:

    attention (output side):  W[rows] <- diag(l) W[rows]   (and the bias rows b <- l ⊙ b)
    feed-forward (input side): W <- W diag(l)               (columns of W_down; the bias is untouched)

and unmerging divides again (PEFT adds 1e-8 to the divisor; we divide exactly and refuse zeros).

Our attention has ONE fused `qkv` Linear ([q; k; v] rows), so l_k and l_v scale the k and v row slices of its
output: exactly PEFT's vectors on k_proj and v_proj of a Hugging Face Llama. "down" is a feed-forward module
(as PEFT's default for Llama: `feedforward_modules=["down_proj"]`): its vector scales the INPUT of `mlp.down`,
i.e. the MLP's intermediate activation. A non-feed-forward target scales its output rows (PEFT's rule).

Implementation: the model's modules are left in place (names, `weight` and fused layout unchanged, so LoRA's
target resolution and the HF converters still see the plain layers); each targeted Linear gets a child module
`ia3` holding the vectors of every adapter, and a forward hook (output side) or pre-hook (input side) that
applies the active adapter's vectors unless they are merged. The LM head is not a supported target (the
chunked LM loss reads `head.proj.weight` directly).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .lora import HF_NAMES, Part, resolve_targets


@dataclass
class IA3Config:
    # HF vocabulary (k v down, or k_proj v_proj down_proj, ...) mapped onto our fused layers, or regexes
    # matched in full against our module names (a fused layer as a whole)
    target_modules: tuple[str, ...] = ("k", "v", "down")
    # targets whose vector scales the layer's INPUT (feed-forward); every other target scales its output rows
    feedforward_modules: tuple[str, ...] = ("down",)

    def __post_init__(self):
        for f in ("target_modules", "feedforward_modules"):
            v = getattr(self, f)
            setattr(self, f, (v,) if isinstance(v, str) else tuple(v))
        if not self.target_modules:
            raise ValueError("IA3Config.target_modules is empty")
        short = {HF_NAMES.get(t, t) for t in self.target_modules}
        stray = [f for f in self.feedforward_modules if HF_NAMES.get(f, f) not in short]
        if stray:
            raise ValueError(f"IA3Config.feedforward_modules {stray} must be a subset of target_modules "
                             f"{list(self.target_modules)} (PEFT's rule)")

    def to_dict(self) -> dict:
        return asdict(self)


class IA3Part(nn.Module):
    """One learned vector of one adapter: output rows [start, stop) of the layer, or (feedforward) its whole
    input."""

    def __init__(self, part: Part, size: int, feedforward: bool, dtype, device):
        super().__init__()
        self.name, self.start, self.stop, self.feedforward = part.name, part.start, part.stop, feedforward
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=dtype, device=device))


class IA3Vectors(nn.Module):
    """Child `ia3` of a targeted Linear: adapter name -> part name -> IA3Part, the active adapter, merged
    state, and the hooks that apply them."""

    def __init__(self, module_name: str):
        super().__init__()
        self.module_name = module_name
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []

    def _live(self):
        if self.active is None or self.active in self.merged or self.active not in self.adapters:
            return ()
        return self.adapters[self.active].values()

    def scale_input(self, layer: nn.Linear, args):
        # feed-forward target: y = W (l ⊙ h) + b
        x = args[0]
        for p in self._live():
            if p.feedforward:
                x = x * p.ia3_l.to(x.dtype)
        return (x, *args[1:])

    def scale_output(self, layer: nn.Linear, args, out):
        # attention target: rows [start, stop) of W x + b multiplied by l (bias included, as PEFT)
        parts = [p for p in self._live() if not p.feedforward]
        if not parts:
            return out
        scale, at = [], 0
        for p in sorted(parts, key=lambda p: p.start):
            scale += [out.new_ones(p.start - at), p.ia3_l.to(out.dtype)]
            at = p.stop
        scale.append(out.new_ones(out.shape[-1] - at))
        return out * torch.cat(scale)

    @torch.no_grad()
    def merge(self, layer: nn.Linear, name: str) -> None:
        if name in self.merged:
            return
        for p in self.adapters[name].values():
            if p.feedforward:   # W diag(l): column j of W times l_j
                layer.weight.mul_(p.ia3_l.to(layer.weight.dtype)[None, :])
            else:               # diag(l) W, and the bias rows
                layer.weight[p.start:p.stop].mul_(p.ia3_l.to(layer.weight.dtype)[:, None])
                if layer.bias is not None:
                    layer.bias[p.start:p.stop].mul_(p.ia3_l.to(layer.bias.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, layer: nn.Linear, name: str) -> None:
        if name not in self.merged:
            return
        for p in self.adapters[name].values():
            if (p.ia3_l == 0).any():
                raise ValueError(f"{self.module_name}: adapter {name!r} vector {p.name!r} has zeros; "
                                 "a merged zero scale cannot be undone")
            if p.feedforward:
                layer.weight.div_(p.ia3_l.to(layer.weight.dtype)[None, :])
            else:
                layer.weight[p.start:p.stop].div_(p.ia3_l.to(layer.weight.dtype)[:, None])
                if layer.bias is not None:
                    layer.bias[p.start:p.stop].div_(p.ia3_l.to(layer.bias.dtype))
        self.merged.remove(name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active!r}, merged={self.merged}"


# ============================================================================================ public API
def _configs(model: nn.Module) -> dict[str, IA3Config]:
    if not hasattr(model, "ia3_configs"):
        model.ia3_configs = {}
    return model.ia3_configs


def _check_name(model: nn.Module, name: str) -> None:
    if name not in _configs(model):
        have = list(_configs(model))
        raise ValueError(f"no IA3 adapter named {name!r} on this model; adapters: {have or 'none (call add_ia3)'}")


def _ia3_layers(model: nn.Module) -> dict[str, tuple[nn.Linear, IA3Vectors]]:
    """module name -> (the Linear, its IA3Vectors)."""
    return {n: (m, m.ia3) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, "ia3", None), IA3Vectors)}


def add_ia3(model: nn.Module, config: IA3Config | None = None, name: str = "default", *,
            targets: dict[str, list[tuple[Part, bool]]] | None = None) -> nn.Module:
    """Add (IA)³ adapter `name` (all vectors = 1: outputs unchanged), make it active and freeze everything else.
    `targets` (module -> [(part, feedforward)]) overrides the config's patterns (load_ia3 uses it)."""
    config = config or IA3Config()
    if name in _configs(model):
        raise ValueError(f"IA3 adapter {name!r} already exists; adapters: {list(_configs(model))}")
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and without '.', got {name!r}")
    if any(v.merged for _, v in _ia3_layers(model).values()):
        raise ValueError("unmerge_ia3 the merged adapter before adding another")
    if targets is None:
        chosen = resolve_targets(model, config.target_modules)
        ff_names = {HF_NAMES[f] for f in config.feedforward_modules if f in HF_NAMES}
        ff_rx = tuple(f for f in config.feedforward_modules if f not in HF_NAMES)
        ff_modules = set(resolve_targets(model, ff_rx)) if ff_rx else set()
        targets = {}
        for module, parts in chosen.items():
            # a feed-forward target scales the layer's input: one vector for the whole layer, not per part
            ff = [p for p in parts if p.name in ff_names or module in ff_modules]
            if ff and len(ff) != len(parts):
                raise ValueError(f"{module}: parts {[p.name for p in ff]} are feed-forward (input side) but "
                                 f"{[p.name for p in parts if p not in ff]} are not; a fused layer has one input")
            targets[module] = [(p, bool(ff)) for p in parts]
    modules = dict(model.named_modules())
    for module, parts in targets.items():
        if module == "head.proj":
            raise ValueError("IA3 on the LM head is not supported (the chunked LM loss reads head.proj.weight)")
        if not isinstance(modules.get(module), nn.Linear):
            raise ValueError(f"IA3 target {module!r} is not a Linear of this model")
        if sum(ff for _, ff in parts) > 1:
            raise ValueError(f"{module}: more than one feed-forward vector for one input")
    for module, parts in targets.items():
        layer = modules[module]
        if not isinstance(getattr(layer, "ia3", None), IA3Vectors):
            layer.ia3 = IA3Vectors(module)
            layer.register_forward_pre_hook(layer.ia3.scale_input)
            layer.register_forward_hook(layer.ia3.scale_output)
        W = layer.weight
        # vectors of a half-precision model are kept in fp32 (as PEFT's adapters are)
        dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
        layer.ia3.adapters[name] = nn.ModuleDict({
            p.name: IA3Part(p, layer.in_features if ff else p.stop - p.start, ff, dtype, W.device)
            for p, ff in parts})
    _configs(model)[name] = config
    set_ia3_adapter(model, name)
    return model


def set_ia3_adapter(model: nn.Module, name: str | None) -> None:
    """Make IA3 adapter `name` active (its vectors trainable, every other parameter frozen), or with None
    disable IA3: the base model exactly."""
    if name is not None:
        _check_name(model, name)
    layers = _ia3_layers(model)
    merged = {n for _, v in layers.values() for n in v.merged}
    if merged and merged != {name}:
        raise ValueError(f"IA3 adapter {sorted(merged)} is merged; unmerge_ia3 it before switching to {name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, v in layers.values():
        v.active = name if name in v.adapters else None
        if v.active is not None:
            for p in v.adapters[name].parameters():
                p.requires_grad_(True)
    model.ia3_active = name


def merge_ia3(model: nn.Module, name: str = "default") -> None:
    """Fold adapter `name` into the weights (diag(l) W for output-side vectors, W diag(l) for feed-forward)."""
    _check_name(model, name)
    set_ia3_adapter(model, name)
    for layer, v in _ia3_layers(model).values():
        if name in v.adapters:
            v.merge(layer, name)


def unmerge_ia3(model: nn.Module, name: str = "default") -> None:
    """Undo merge_ia3 (the vectors are applied on the fly again)."""
    _check_name(model, name)
    for layer, v in _ia3_layers(model).values():
        if name in v.adapters:
            v.unmerge(layer, name)


def ia3_parts(model: nn.Module, name: str = "default") -> dict[str, dict[str, IA3Part]]:
    """module name -> part name -> IA3Part of adapter `name`."""
    _check_name(model, name)
    return {m: dict(v.adapters[name]) for m, (_, v) in _ia3_layers(model).items() if name in v.adapters}


def ia3_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """`{module}.ia3.adapters.{name}.{part}.ia3_l` -> vector (detached, sharing storage with the parameters)."""
    return {f"{m}.ia3.adapters.{name}.{pn}.ia3_l": p.ia3_l.detach()
            for m, ps in ia3_parts(model, name).items() for pn, p in ps.items()}


# ============================================================================================ PEFT format
# PEFT's IA3 tensors, adapter name stripped:  base_model.model.{hf module}.ia3_l
#   output side (k_proj, v_proj):  [out, 1]        feed-forward (down_proj):  [1, in]
_KEY = re.compile(r"(?P<module>.+?)\.ia3_l(?:\.[^.]+)?")


def save_ia3(model, path: str | os.PathLike, name: str = "default", base_model_name_or_path: str | None = None):
    """Write IA3 adapter `name` as PEFT does (`peft.PeftModel.from_pretrained(hf_model, path)` loads it)."""
    from safetensors.torch import save_file

    from .io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, _family, _hf_map, peft_module_names

    _check_name(model, name)
    family = _family(model)
    if family == "gpt2":
        raise ValueError("IA3 adapters are mapped for Llama-family models (separate k_proj/v_proj); not gpt2")
    tensors, modules, ff_modules = {}, [], []
    for hf, p in peft_module_names(family, ia3_parts(model, name), f"IA3 adapter {name!r}"):
        modules.append(hf)
        if p.feedforward:
            ff_modules.append(hf)
        v = p.ia3_l.detach().contiguous().cpu()
        tensors[PREFIX + hf + ".ia3_l"] = v[None, :] if p.feedforward else v[:, None]

    def patterns(chosen: list[str]):
        # a list of suffixes when it covers every layer (PEFT matches suffixes), else an exact regex
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in chosen})
        everywhere = {h for h in _hf_map(model, family) if h.rsplit(".", 1)[-1] in suffixes}
        return suffixes if everywhere == set(chosen) else "^(" + "|".join(re.escape(m) for m in sorted(chosen)) + ")$"

    adapter_config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "target_modules": patterns(modules), "feedforward_modules": patterns(ff_modules) if ff_modules else [],
        "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
        "revision": None,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def load_ia3(model, path: str | os.PathLike, name: str = "default"):
    """Read a PEFT IA3 adapter directory into IA3 adapter `name` of our model (and make it active). Whether a
    module is feed-forward is read from the tensor's shape ([1, in] vs [out, 1]) and checked against the
    config's feedforward_modules."""
    from safetensors.torch import load_file

    from .io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, _family, _hf_map
    from .lora import _linears

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
    c = json.loads((path / CONFIG_NAME).read_text())
    if c.get("peft_type") != "IA3":
        raise ValueError(f"{path}: peft_type={c.get('peft_type')!r}; load_ia3 reads IA3 adapters")
    if c.get("modules_to_save") or c.get("fan_in_fan_out"):
        raise ValueError(f"{path}: modules_to_save / fan_in_fan_out are not supported for IA3")
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (re-save a .bin adapter with safe_serialization)")
    family = _family(model)
    hf_map = _hf_map(model, family)
    ff_cfg = c.get("feedforward_modules") or []

    def is_ff(hf: str) -> bool:
        if isinstance(ff_cfg, str):
            return re.fullmatch(ff_cfg, hf) is not None
        return any(hf == f or hf.endswith("." + f) for f in ff_cfg)

    targets: dict[str, list[tuple[Part, bool]]] = {}
    found: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in load_file(str(path / WEIGHTS_NAME)).items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.fullmatch(k)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in an IA3 adapter")
        hf = m.group("module")
        if hf not in hf_map:
            raise ValueError(f"{path}: adapter module {hf!r} does not exist in this {family} model; modules "
                             f"include {', '.join(list(hf_map)[:6])}")
        p = hf_map[hf]
        ff = is_ff(hf)
        want = (1, _linears(model)[p.module].in_features) if ff else (p.stop - p.start, 1)
        if tuple(t.shape) != want:
            raise ValueError(f"{path}: {hf}.ia3_l has shape {tuple(t.shape)}, but the base model's {hf} (our "
                             f"{p.module} part {p.name!r}, {'feed-forward' if ff else 'output side'}) needs {want}")
        targets.setdefault(p.module, []).append((p, ff))
        found[(p.module, p.name)] = t.reshape(-1)
    targets = {m: sorted(ps, key=lambda pf: pf[0].start) for m, ps in targets.items()}
    hf_names = sorted({hf.rsplit(".", 1)[-1] for hf, p in hf_map.items() if (p.module, p.name) in found})
    ff_names = sorted({hf.rsplit(".", 1)[-1] for hf, p in hf_map.items() if (p.module, p.name) in found and is_ff(hf)})
    add_ia3(model, IA3Config(target_modules=tuple(hf_names), feedforward_modules=tuple(ff_names)), name,
            targets=targets)
    with torch.no_grad():
        for module, ps in ia3_parts(model, name).items():
            for pname, part in ps.items():
                part.ia3_l.copy_(found[(module, pname)])
    return model
