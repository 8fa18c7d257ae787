"""Recipes: a workflow's typed config dataclass filled from a YAML file plus `key=value` overrides.

    cfg = load_recipe(PretrainConfig, "recipes/pretrain/micro.yaml", ["train.lr=1e-3", "data.seq_len=128"])

Keys are dotted paths through nested dataclasses. Values are parsed with yaml.safe_load ("1e-3" -> 0.001,
"[a, b]" -> a list, "null" -> None) and checked against the field's type. An unknown key is an error naming
the closest valid key (difflib). A dict field may list its valid keys in field metadata ("keys": a callable
returning them), so `model.dimm=64` is caught here too and not only when the model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe or override is wrong; the message names the key and what to write instead."""


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({e})") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of keys to values, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(cls, data, source=str(path) if path else "overrides")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {item!r} has no key before '='")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the plain string
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def valid_keys(cls: type) -> list[str]:
    """Every dotted key the config accepts (nested dataclasses expanded; dict fields with known keys too)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += [f"{f.name}.{k}" for k in valid_keys(tp)]
        else:
            out.append(f.name)
            if "keys" in f.metadata:
                out += [f"{f.name}.{k}" for k in f.metadata["keys"]()]
    return out


def _unknown(full: str, root: type) -> RecipeError:
    """The error for a key the config does not have, naming the closest valid key: by the whole dotted path
    first ("trian.lr" -> "train.lr"), else by its last part ("lr" -> "train.lr")."""
    keys = valid_keys(root)
    parent, _, leaf = full.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    if parent and siblings:  # the section exists: only the last part is wrong
        close = [f"{parent}.{m}" for m in difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1)]
    else:
        close = difflib.get_close_matches(full, keys, n=1, cutoff=0.6)
    if not close:
        leaves: dict[str, str] = {}
        for k in keys:
            leaves.setdefault(k.rpartition(".")[2], k)
        by_leaf = difflib.get_close_matches(leaf, list(leaves), n=1)
        close = [leaves[by_leaf[0]]] if by_leaf else []
    if close:
        hint = f"; did you mean {close[0]!r}?"
    else:  # nothing close: list the keys beside it (a full list of 100 keys would bury the point)
        parent = full.rsplit(".", 1)[0] + "." if "." in full else ""
        here = sorted({k[len(parent):].split(".")[0] for k in keys if k.startswith(parent)})
        hint = f"; valid keys{' under ' + parent.rstrip('.') if parent else ''}: {', '.join(here)}"
    return RecipeError(f"unknown recipe key {full!r}{hint}")


def _first_leaf(key: str, value: Any) -> str:
    while isinstance(value, dict) and value:
        k, value = next(iter(value.items()))
        key = f"{key}.{k}"
    return key


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "recipe", base: Any = None,
              _root: type | None = None, _prefix: str = "") -> T:
    """cls filled from data; fields data does not name keep their defaults, or base's values when given (a
    nested section keeps its parent's defaults: SFTConfig's train section starts from SFT's settings)."""
    root = _root or cls
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {_prefix.rstrip('.') or 'the recipe'} must be a mapping, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(_first_leaf(f"{_prefix}{key}", value), root)
        f = fields[key]
        if "keys" in f.metadata and isinstance(value, dict):
            allowed = list(f.metadata["keys"]())
            for k in value:
                if k not in allowed:
                    raise _unknown(f"{_prefix}{key}.{k}", root)
        tp = _strip_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            kwargs[key] = from_dict(tp, value, source=source, base=default, _root=root, _prefix=f"{_prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{_prefix}{key}", root, source)
    try:
        obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{source}: {e}") from e
    return obj


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _coerce(value: Any, tp: Any, key: str, root: type, source: str) -> Any:
    def bad(expected: str) -> RecipeError:
        return RecipeError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad(" or ".join(getattr(a, "__name__", str(a)) for a in args))
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, root, source)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source=source, _root=root, _prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [value]  # sources=english means [english]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} values")
            return tuple(_coerce(v, a, key, root, source) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, root, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads "1e6" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string (no dot): accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what load_recipe reads back)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def save_recipe(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
