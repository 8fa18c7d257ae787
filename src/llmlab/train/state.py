"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    OUT/checkpoints/step-00000100/
        config.json, model.safetensors, tokenizer.json ...   an llmlab checkpoint: llmlab.load() reads it
        training_state.json          step, counters, schedule, best validation loss, and the structure of:
        training_state.safetensors   the optimizer state, RNG states (python, numpy, torch) and the data
                                     loader's state_dict(), tensors stored here by reference

No pickle anywhere: the optimizer state, the RNG states and the loader state are nested containers of
numbers, strings, tensors and numpy arrays; `encode` writes the containers as JSON and every tensor or array
into safetensors, `decode` puts them back (int dict keys and tuples included, which JSON alone would lose).

A checkpoint is written into a temporary sibling and renamed into place (io.checkpoint.atomic_directory), so
a run killed mid-save leaves the previous checkpoint untouched and the half-written one invisible.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmlab.io.checkpoint import CONFIG_NAME, atomic_directory, write_safetensors

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
PREFIX = "step-"
FORMAT_VERSION = 1


# ============================================================================================ JSON + tensors
def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """obj as JSON-able data; tensors and numpy arrays go into `tensors` and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()  # no copy on the CPU: written straight from memory
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        # uint32 (numpy's Mersenne Twister state) has no safe torch twin everywhere: widen, narrow on load
        arr = obj.astype(np.int64) if obj.dtype.kind == "u" else obj
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [encode(x, tensors) for x in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint; state_dict() methods must "
                    "return containers of numbers, strings, tensors and numpy arrays")


def decode(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [decode(x, tensors) for x in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__ndarray__" in data:
            return tensors[data["__ndarray__"]].numpy().astype(np.dtype(data["dtype"]))
        if "__tuple__" in data:
            return tuple(decode(x, tensors) for x in data["__tuple__"])
        if "__items__" in data:
            return {decode(k, tensors): decode(v, tensors) for k, v in data["__items__"]}
        return {k: decode(v, tensors) for k, v in data.items()}
    return data


# ============================================================================================ RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


# ============================================================================================ model tensors
def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases (a tied LM head is the embedding table): safetensors stores no aliases."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else (name,)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _load_model_tensors(model: nn.Module, directory: Path) -> None:
    from llmlab.io.checkpoint import TensorFiles

    with TensorFiles(directory) as files:
        sd = {k: files[k] for k in files}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    present = {t.data_ptr() for name, t in model.state_dict().items() if name in sd}
    missing = [k for k in missing if model.state_dict()[k].data_ptr() not in present]  # aliases are fine
    if missing or unexpected:
        raise ValueError(f"{directory}: the checkpoint does not fit this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); resume with the model configuration the run used")


# ============================================================================================ checkpoints
def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first. Half-written ones are hidden temporaries: never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / STATE_JSON).exists():
            found.append((int(p.name[len(PREFIX):]), p))
    return sorted(found)


def save_training_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                             loader: Any, state: dict[str, Any], tokenizer: Any = None) -> Path:
    """Write model, tokenizer, optimizer, RNG and loader state (and `state`: step, counters...) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    payload = {
        "format_version": FORMAT_VERSION,
        **state,
        "optimizer": encode(optimizer.state_dict(), tensors),
        "rng": encode(rng_state(), tensors),
        "loader": encode(loader.state_dict(), tensors) if hasattr(loader, "state_dict") else None,
    }
    with atomic_directory(path) as tmp:
        cfg = getattr(model, "cfg", None)
        if cfg is not None and hasattr(cfg, "to_json"):
            cfg.to_json(tmp / CONFIG_NAME)
        else:  # not an llmlab Transformer: still a directory atomic_directory may replace later
            (tmp / CONFIG_NAME).write_text("{}\n")
        write_safetensors(unique_state_dict(model), tmp, max_shard_bytes=5 * 10**9)
        if tokenizer is not None:
            tokenizer.save(tmp)
        save_file(tensors, str(tmp / STATE_TENSORS))
        # the JSON last: list_checkpoints only lists directories that have it
        (tmp / STATE_JSON).write_text(json.dumps(payload, indent=1) + "\n")
    return Path(path)


def load_training_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                             loader: Any) -> dict[str, Any]:
    """Restore a checkpoint into an already built model, optimizer and loader and set the RNG states.
    Returns the rest of the saved state (step, counters...)."""
    path = Path(path)
    payload = json.loads((path / STATE_JSON).read_text())
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: training state format {payload.get('format_version')}, this llmlab reads "
                         f"{FORMAT_VERSION}")
    tensors = load_file(str(path / STATE_TENSORS))
    _load_model_tensors(model, path)
    try:
        optimizer.load_state_dict(decode(payload.pop("optimizer"), tensors))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: the optimizer state does not fit this model's parameter groups ({e}); "
                         "resume with the model and trainable parameters the run used") from e
    loader_state = payload.pop("loader")
    if loader_state is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(decode(loader_state, tensors))
    set_rng_state(decode(payload.pop("rng"), tensors))
    return payload


def remove_checkpoint(path: Path) -> None:
    # Rename first (atomic), then delete: a kill during the delete leaves a hidden directory, never a
    # half-deleted checkpoint that list_checkpoints would offer for resuming.
    trash = path.parent / f".{path.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: str | os.PathLike, keep_last: int, keep_steps: set[int] = frozenset()) -> None:
    """Delete all but the newest keep_last checkpoints and the steps in keep_steps (the best one)."""
    found = list_checkpoints(root)
    newest = {s for s, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step not in newest and step not in keep_steps:
            remove_checkpoint(path)


def clean_temporaries(root: str | os.PathLike) -> None:
    """Remove what killed saves and deletes left behind (hidden .step-*.tmp-* / .trash directories)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(f".{PREFIX}") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
