"""LoRA/DoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names tensors by the Hugging Face module they adapt, with the adapter name stripped:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight     [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight     [out, r]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector   [out]   (DoRA)

Our fused layers map part by part: qkv's q/k/v parts <-> q_proj/k_proj/v_proj, the gated up's gate/up parts
<-> gate_proj/up_proj (Llama, Qwen2, Mistral). GPT-2 keeps c_attn fused as we do, so there the whole qkv
layer is one PEFT module (fan_in_fan_out: Conv1D stores W as [in, out]; lora_A/lora_B are nn.Linear-shaped
anyway, so the tensors are the same).

(IA)³ adapters (peft_type "IA3") are written and read by ia3.save_ia3 / ia3.load_ia3; save_adapter and
load_adapter dispatch to them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .lora import WHOLE, LoraConfig, Part, _configs, _check_name, _linears, add_lora, lora_parts, natural_parts

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# (our layer, our part) -> HF module suffix, per family
_LLAMA = {("attn.qkv", "q"): "self_attn.q_proj", ("attn.qkv", "k"): "self_attn.k_proj",
          ("attn.qkv", "v"): "self_attn.v_proj", ("attn.out", "o"): "self_attn.o_proj",
          ("mlp.up", "gate"): "mlp.gate_proj", ("mlp.up", "up"): "mlp.up_proj", ("mlp.down", "down"): "mlp.down_proj"}
_GPT2 = {("attn.qkv", WHOLE): "attn.c_attn", ("attn.out", "o"): "attn.c_proj", ("mlp.up", "up"): "mlp.c_fc",
         ("mlp.down", "down"): "mlp.c_proj"}
_FAMILIES = {"llama": ("model.layers.", _LLAMA), "qwen2": ("model.layers.", _LLAMA),
             "mistral": ("model.layers.", _LLAMA), "gpt2": ("transformer.h.", _GPT2)}


def _family(model) -> str:
    from llmlab.io.hf import config_to_hf

    family = config_to_hf(model.cfg)["model_type"]
    if family not in _FAMILIES:
        raise ValueError(f"PEFT adapters are mapped for {', '.join(_FAMILIES)} models; this one is {family!r}")
    return family


def hf_module_name(family: str, part: Part) -> str | None:
    """The Hugging Face module (as PEFT names it, without the base_model prefix) of one of our parts."""
    layers, table = _FAMILIES[family]
    if part.module == "head.proj" and part.name == "lm_head":
        return "lm_head"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", part.module)
    if m is None or (m.group(2), part.name) not in table:
        return None
    return f"{layers}{m.group(1)}.{table[(m.group(2), part.name)]}"


def peft_module_names(family: str, parts_by_module: dict, what: str):
    """(Hugging Face module name, part) for every part of an adapter (lora_parts / ia3_parts); an error for a
    part that has no PEFT equivalent."""
    for module, parts in parts_by_module.items():
        for p in parts.values():
            hf = hf_module_name(family, Part(module, p.name, p.start, p.stop))
            if hf is None:
                raise ValueError(f"{module} part {p.name!r} of {what} has no PEFT equivalent in a {family} model; "
                                 "target it by Hugging Face names (q k v o gate up down)")
            yield hf, p


def _hf_map(model, family: str) -> dict[str, Part]:
    """HF module name -> our part, for every part the model has (fused GPT-2 qkv counts as one part)."""
    out = {}
    for module, parts in natural_parts(model).items():
        if len(parts) > 1:
            parts = parts + [Part(module, WHOLE, 0, parts[-1].stop)]
        for p in parts:
            hf = hf_module_name(family, p)
            if hf is not None:
                out[hf] = p
    return out


def save_adapter(model, path: str | os.PathLike, name: str = "default", base_model_name_or_path: str | None = None):
    """Write adapter `name` as PEFT does, loadable with `peft.PeftModel.from_pretrained(hf_model, path)`."""
    if name not in _configs(model) and name in getattr(model, "ia3_configs", {}):  # an (IA)³ adapter
        from .ia3 import save_ia3
        return save_ia3(model, path, name, base_model_name_or_path)
    _check_name(model, name)
    config: LoraConfig = _configs(model)[name]
    family = _family(model)
    tensors, modules = {}, []
    for hf, p in peft_module_names(family, lora_parts(model, name), f"adapter {name!r}"):
        modules.append(hf)
        key = PREFIX + hf
        tensors[key + ".lora_A.weight"] = p.lora_A.detach().contiguous().cpu()
        tensors[key + ".lora_B.weight"] = p.lora_B.detach().contiguous().cpu()
        if p.lora_magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = p.lora_magnitude.detach().contiguous().cpu()
    # PEFT matches a list of target_modules by module-name suffix in every layer; when the adapter covers a
    # subset of layers, an exact regex (matched in full) says precisely which modules it adapts.
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    everywhere = {h for h in _hf_map(model, family) if h.rsplit(".", 1)[-1] in suffixes}
    targets: list[str] | str = suffixes if everywhere == set(modules) else \
        "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": config.bias,
        "fan_in_fan_out": family == "gpt2", "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "lora_bias": False, "revision": None,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


# module.lora_A.weight / module.lora_B.weight / module.lora_magnitude_vector (older files keep the adapter name:
# module.lora_A.default.weight, module.lora_magnitude_vector.default.weight)
_KEY = re.compile(r"(?P<module>.+?)\.(?:(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.weight"
                  r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?)")


def load_adapter(model, path: str | os.PathLike, name: str = "default"):
    """Read a PEFT LoRA/DoRA adapter directory into adapter `name` of our model (and make it active); an IA3
    adapter (peft_type "IA3") goes to ia3.load_ia3."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
    c = json.loads((path / CONFIG_NAME).read_text())
    if c.get("peft_type") == "IA3":
        from .ia3 import load_ia3
        return load_ia3(model, path, name)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type={c.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise ValueError(f"{path}: {key} is not supported (one r and alpha for every module): {c[key]}")
    if c.get("lora_bias") or c.get("bias", "none") != "none" or c.get("modules_to_save"):
        raise ValueError(f"{path}: trained biases / modules_to_save are not supported")
    config = LoraConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout") or 0.0),
                        target_modules=("<from file>",), use_rslora=bool(c.get("use_rslora", False)),
                        use_dora=bool(c.get("use_dora", False)))
    if not (path / WEIGHTS_NAME).is_file():  # a pickled adapter_model.bin is never unpickled
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (re-save a .bin adapter with safe_serialization)")
    tensors = load_file(str(path / WEIGHTS_NAME))
    family = _family(model)
    hf_map = _hf_map(model, family)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.fullmatch(k)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        found.setdefault(m.group("module"), {})[m.group("ab") or "magnitude"] = t
    targets: dict[str, list[Part]] = {}
    for hf, ts in found.items():
        if hf not in hf_map:
            raise ValueError(f"{path}: adapter module {hf!r} does not exist in this {family} model; modules "
                             f"include {', '.join(list(hf_map)[:6])}")
        if set(ts) - {"magnitude"} != {"lora_A", "lora_B"} or ("magnitude" in ts) != config.use_dora:
            raise ValueError(f"{path}: module {hf!r} has tensors {sorted(ts)}; expected lora_A, lora_B"
                             + (" and lora_magnitude_vector (use_dora)" if config.use_dora else ""))
        p = hf_map[hf]
        in_features = _linears(model)[p.module].in_features
        want = {"lora_A": (config.r, in_features), "lora_B": (p.stop - p.start, config.r),
                "magnitude": (p.stop - p.start,)}
        for k, t in ts.items():
            if tuple(t.shape) != want[k]:
                raise ValueError(f"{path}: {hf}.{k} has shape {tuple(t.shape)}, but the base model's {hf} "
                                 f"(our {p.module} part {p.name!r}) needs {want[k]} (r={config.r})")
        targets.setdefault(p.module, []).append(p)
    add_lora(model, config, name, targets={m: sorted(ps, key=lambda p: p.start) for m, ps in targets.items()})
    parts = lora_parts(model, name)
    hf_of = {(p.module, p.name): hf for hf, p in hf_map.items()}
    with torch.no_grad():
        for module, ps in parts.items():
            for pname, lp in ps.items():
                ts = found[hf_of[(module, pname)]]
                lp.lora_A.copy_(ts["lora_A"])
                lp.lora_B.copy_(ts["lora_B"])
                if lp.lora_magnitude is not None:
                    lp.lora_magnitude.copy_(ts["magnitude"])
    # the patterns actually loaded, in HF vocabulary, so that a re-save writes the same target_modules
    _configs(model)[name].target_modules = tuple(sorted({hf.rsplit(".", 1)[-1] for hf in found}))
    return model
