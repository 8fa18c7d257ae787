"""llmlab's own checkpoint directory, and the file machinery the Hugging Face importer shares with it.

A checkpoint is a directory:

    config.json                    ModelConfig.to_json()
    model.safetensors              every tensor under its llmlab name (a tied head is stored once, as tok_emb)
      or model-0000k-of-0000n.safetensors + model.safetensors.index.json   above max_shard_bytes
    generation_config.json         when a generation config is passed
    tokenizer.json, ...            when a tokenizer is passed (anything with .save(directory))

It is written into a temporary sibling directory and swapped in with one rename, so a save that dies half way
leaves the previous checkpoint as it was. Loading builds the model on the meta device and assigns the tensors
read from disk, so a load holds one copy of the weights, not two.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmlab.model import ModelConfig, Transformer
from llmlab.model.position import Rotary, alibi_slopes, rope_inv_freq, sinusoidal_table

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")  # what llmlab.tokenizer.load reads
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' long-standing default shard size ("5GB")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit the model; the message names the file and tensor."""


# ============================================================================================ atomic writes
@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`; when the block finishes, it replaces `path`.

    If the block raises (or the process dies), `path` is untouched and the temporary directory is removed
    (or, after a kill, left behind as a hidden `.NAME.tmp-*` sibling that nothing reads)."""
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # the data must be on disk before the rename makes it visible
            _fsync(f)
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new directory on failure, the old one after an exchange


def _check_replaceable(path: Path) -> None:
    # Replacing a directory deletes what was there: only ever do that to a model directory.
    if path.is_file():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory. Choose another path.")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_NAME).exists():
        raise CheckpointError(f"{path} exists and is not a model directory (no {CONFIG_NAME}); refusing to replace "
                              "it. Choose a new path or empty it.")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):  # Linux renameat2(RENAME_EXCHANGE): `path` is never missing, not even briefly
        return
    # Elsewhere: two renames. A crash between them leaves the old checkpoint at `old`; resolve() finds it.
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def resolve(path: str | os.PathLike) -> Path:
    """The directory to read: `path`, or the previous checkpoint a save interrupted between its two renames
    left next to it (only on systems without an atomic exchange)."""
    path = Path(path)
    if path.exists():
        return path
    left = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.exists() else []
    if left:
        warnings.warn(f"{path} is missing but an interrupted save left the previous checkpoint at {left[-1]}; "
                      f"loading that (rename it to {path} to make this permanent)", stacklevel=3)
        return left[-1]
    raise CheckpointError(f"{path} does not exist")


# ============================================================================================ safetensors out
def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    """Write tensors as model.safetensors, or as numbered shards plus model.safetensors.index.json (the layout
    transformers reads) when they exceed max_shard_bytes. A tensor larger than the limit gets a shard of its
    own. Returns the file names written."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    files = [WEIGHTS_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        # one shard at a time on the CPU, contiguous: never a second copy of the whole model
        part = {n: tensors[n].detach().to("cpu").contiguous() for n in names}
        save_file(part, str(directory / file), metadata={"format": "pt"})
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


# ============================================================================================ tensors in
class TensorFiles(Mapping[str, torch.Tensor]):
    """The tensors of a model directory, read one at a time on access (so a converter that fuses or transposes
    never holds the file's copy and its own of more than one tensor). Reads model.safetensors, sharded
    safetensors with their index, or pytorch_model.bin (sharded too) through torch.load(weights_only=True).

    dtype converts floating-point tensors as they are read; device is where they are put."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, device: Any = "cpu"):
        self.directory = Path(directory)
        self.dtype, self.device = dtype, torch.device(device)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        d = self.directory
        if (d / INDEX_NAME).exists() or (d / WEIGHTS_NAME).exists():
            self.source = d / INDEX_NAME if (d / INDEX_NAME).exists() else d / WEIGHTS_NAME
            for file in self._files_from(self.source):
                handle = self._open_safetensors(file)
                for key in handle.keys():
                    self._file_of.setdefault(key, file)
            self._check_index()
        elif (d / BIN_INDEX_NAME).exists() or (d / BIN_NAME).exists():
            self.source = d / BIN_INDEX_NAME if (d / BIN_INDEX_NAME).exists() else d / BIN_NAME
            for file in self._files_from(self.source):
                for key in self._open_bin(file):
                    self._file_of.setdefault(key, file)
            self._check_index()
        else:
            raise CheckpointError(f"{d} holds no weights: expected {WEIGHTS_NAME}, {INDEX_NAME}, {BIN_NAME} or "
                                  f"{BIN_INDEX_NAME}")

    # ---- Mapping
    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        if file in self._handles:
            t = self._handles[file].get_tensor(key)
        else:
            t = self._bins[file][key]
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def close(self) -> None:
        self._handles.clear()
        self._bins.clear()

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- reading
    def _files_from(self, source: Path) -> list[Path]:
        if not source.name.endswith(".index.json"):
            return [source]
        try:
            self._index = json.loads(source.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: not a valid shard index ({e}); expected JSON with a 'weight_map' "
                                  "object of tensor name -> shard file") from e
        files = sorted(set(self._index.values()))
        for f in files:
            if not (self.directory / f).exists():
                raise CheckpointError(f"{source} lists shard {f!r}, which is missing from {self.directory}")
        return [self.directory / f for f in files]

    def _check_index(self) -> None:
        for key, f in getattr(self, "_index", {}).items():
            if key not in self._file_of:
                raise CheckpointError(f"{self.source} says tensor {key!r} is in {f}, but that file does not hold it")
            self._file_of[key] = self.directory / f

    def _open_safetensors(self, file: Path) -> Any:
        try:
            handle = safe_open(str(file), framework="pt")
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}). It is probably truncated or "
                                  "corrupt (an interrupted download or copy): fetch or save it again.") from e
        self._handles[file] = handle
        return handle

    def _open_bin(self, file: Path) -> dict[str, torch.Tensor]:
        # weights_only=True refuses anything but tensors and plain containers: a .bin never runs code here.
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:
            raise CheckpointError(f"{file}: could not be read with torch.load(weights_only=True) ({e}). It may be "
                                  "truncated or corrupt, or need full unpickling, which llmlab refuses for safety: "
                                  "convert it to safetensors with a tool you trust.") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{file}: expected a dict of tensor name -> tensor, got {type(sd).__name__}")
        self._bins[file] = sd
        return sd


# ============================================================================================ building a model
def build_model(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], *, source: Any, device: Any = "cpu") -> Transformer:
    """A Transformer whose parameters are exactly the tensors of `sd` (llmlab names), without a second copy.

    The model is built under torch.device("meta") (no memory, no random init), checked against `sd` (missing,
    unexpected, shapes: the errors name `source`), then the tensors are assigned. A tied head may be absent
    from `sd`; it is tied to tok_emb. Non-persistent buffers (RoPE frequencies, sinusoidal table, ALiBi
    slopes) are recomputed on `device`. The model is returned in eval mode, like transformers' from_pretrained."""
    with torch.device("meta"):
        model = Transformer(cfg)
    tied = cfg.tie_embeddings and cfg.head in ("lm", "mlm")
    sd = dict(sd)
    if tied and "tok_emb.weight" in sd:
        sd["head.proj.weight"] = sd["tok_emb.weight"]
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_few(unexpected)}")
        raise CheckpointError(f"{source}: {' and '.join(parts)} for this ModelConfig (head={cfg.head!r}, "
                              f"n_layers={cfg.n_layers}); the weights and config.json do not describe the same model")
    for key, want in expected.items():
        if tuple(sd[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(sd[key].shape)}, the config expects "
                                  f"{tuple(want.shape)}; the weights and config.json do not describe the same model")
    model.load_state_dict(sd, strict=True, assign=True)
    if tied:  # assign=True gives each module its own Parameter; a tie must be one Parameter
        model.head.proj.weight = model.tok_emb.weight
    _rebuild_buffers(model, torch.device(device))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a new buffer in the model that _rebuild_buffers does not know yet
        raise RuntimeError(f"llmlab.io: {_few(on_meta)} left on the meta device after loading; teach "
                           "llmlab.io.checkpoint._rebuild_buffers to compute them")
    return model.eval()


def _rebuild_buffers(model: Transformer, device: torch.device) -> None:
    # Buffers made under the meta device have no values: compute them again, as Transformer.__init__ does.
    cfg = model.cfg
    for module in model.modules():
        if isinstance(module, Rotary):
            module.inv_freq = rope_inv_freq(module.cfg)[0].to(device)
    if getattr(model, "pos_table", None) is not None:
        model.pos_table = sinusoidal_table(cfg.max_seq_len, cfg.dim).to(device)
    if getattr(model, "alibi", None) is not None:
        model.alibi = alibi_slopes(cfg.n_heads).to(device)


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


# ============================================================================================ llmlab checkpoints
def save_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    tokenizer: Any = None,
    generation_config: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write model (+ tokenizer, + generation config: a dict, a dataclass or anything with to_dict()) to the
    directory `path`, replacing an existing checkpoint there atomically. Returns the path."""
    cfg = model.cfg
    sd = model.state_dict()
    if cfg.tie_embeddings and cfg.head in ("lm", "mlm"):
        del sd["head.proj.weight"]  # the same tensor as tok_emb.weight; safetensors stores no aliases
    with atomic_directory(path) as tmp:
        cfg.to_json(tmp / CONFIG_NAME)
        write_safetensors(sd, tmp, max_shard_bytes)
        if generation_config is not None:
            data = _as_dict(generation_config)
            (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
        if tokenizer is not None:
            if not callable(getattr(tokenizer, "save", None)):
                raise TypeError(f"tokenizer must have a .save(directory) method, got {type(tokenizer).__name__}")
            tokenizer.save(tmp)
    return Path(path)


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: Any = "cpu"
) -> tuple[Transformer, Any]:
    """Read a directory written by save_checkpoint: (model in eval mode, tokenizer or None)."""
    path = resolve(path)
    config_file = path / CONFIG_NAME
    data = read_json(config_file)
    if "model_type" in data or "architectures" in data:
        raise CheckpointError(f"{config_file} is a Hugging Face config (model_type={data.get('model_type')!r}); "
                              "load this directory with llmlab.io.load_hf")
    try:
        cfg = ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not a valid llmlab ModelConfig: {e}") from e
    with TensorFiles(path, dtype=dtype, device=device) as files:
        model = build_model(cfg, files, source=files.source, device=device)
    tokenizer = None
    if any((path / name).exists() for name in TOKENIZER_FILES):
        from llmlab import tokenizer as tokenizers

        tokenizer = tokenizers.load(path)
    return model, tokenizer


def load_generation_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The generation_config.json of a checkpoint (llmlab or Hugging Face) as a dict, or None."""
    file = resolve(path) / GENERATION_CONFIG_NAME
    return read_json(file) if file.exists() else None


def _as_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if callable(getattr(obj, "to_dict", None)):
        return obj.to_dict()
    raise TypeError(f"generation_config must be a dict, a dataclass or have to_dict(); got {type(obj).__name__}")
