"""Documents for pretraining: read from files, directories or named corpora, and split by document.

What a source may be:

| source | documents |
|---|---|
| `.txt` file | the whole file is one document; a file holding many documents separates them with a line that is exactly `<|endoftext|>` (the GPT-2 convention for text dumps) |
| `.jsonl` file | one per line: the string under `text_key` (blank lines are ignored) |
| `.json` file | a list of strings, or of objects with a string under `text_key` |
| `.parquet` file | the `text_key` column (needs pyarrow: `pip install 'llmlab[parquet]'`) |
| a directory | every file of those kinds below it, in sorted path order |
| a list | each entry read in turn |
| a name (when no such path exists) | "english" (State of the Union speeches + Moby Dick chapters), "chinese" (People's Daily articles), "sotu", "moby_dick", "peoples_daily" |

Empty and whitespace-only documents are dropped everywhere: they would only add separators.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import sources

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_SEPARATOR = re.compile(r"^<\|endoftext\|>[ \t]*(?:\r?\n|\Z)", re.MULTILINE)  # the line, its newline too


def _english() -> list[str]:
    return [s["text"] for s in sources.sotu_speeches()] + sources.moby_dick_chapters()


NAMED: dict[str, Callable[[], list[str]]] = {
    "english": _english,
    "chinese": sources.peoples_daily_articles,
    "sotu": lambda: [s["text"] for s in sources.sotu_speeches()],
    "moby_dick": sources.moby_dick_chapters,
    "peoples_daily": sources.peoples_daily_articles,
}


class _Errors:
    """Collects malformed records: raise at once (fail) or count them and warn once at the end (skip)."""

    def __init__(self, on_error: str, what: str):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error, self.what, self.count, self.first = on_error, what, 0, None

    def report(self, where: str, problem: str) -> None:
        if self.on_error == "fail":
            raise ValueError(f"{where}: {problem} (pass on_error='skip' to skip malformed {self.what})")
        self.count += 1
        self.first = self.first or f"{where}: {problem}"

    def warn(self) -> None:
        if self.count:
            warnings.warn(f"skipped {self.count} malformed {self.what}; the first: {self.first}", stacklevel=3)


def read_documents(source, *, text_key: str = "text", on_error: str = "fail") -> list[str]:
    """The documents of source (see the module docstring for what a source may be), in order.

    Malformed JSONL lines (bad JSON, no string under text_key) raise ValueError naming file:line with
    on_error="fail"; with "skip" they are skipped and one warning gives the count and the first file:line.
    A source without any document raises ValueError("no documents in ...")."""
    errors = _Errors(on_error, "records")
    docs = [d for d in _read(source, text_key, errors) if d.strip()]
    errors.warn()
    if not docs:
        raise ValueError(f"no documents in {_describe(source)}: every file was empty or every record malformed "
                         f"(documents are read from {', '.join(SUFFIXES)} files; JSON records need a string "
                         f"under {text_key!r})")
    return docs


def _describe(source) -> str:
    if isinstance(source, (list, tuple)):
        return "[" + ", ".join(_describe(s) for s in source[:3]) + (", ..." if len(source) > 3 else "") + "]"
    return str(source)


def _read(source, text_key: str, errors: _Errors) -> list[str]:
    if isinstance(source, (list, tuple)):
        return [d for s in source for d in _read(s, text_key, errors)]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a document source is a path, a directory, a corpus name or a list of those; got "
                        f"{type(source).__name__}")
    path = Path(source)
    if not path.exists():
        name = str(source).lower().replace("-", "_")
        if isinstance(source, str) and name in NAMED:
            return NAMED[name]()
        raise FileNotFoundError(f"{source}: no such file or directory, and not a named corpus "
                                f"({', '.join(NAMED)})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return [d for f in files for d in _read_file(f, text_key, errors)]
    return _read_file(path, text_key, errors)


def _read_file(path: Path, text_key: str, errors: _Errors) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return TXT_SEPARATOR.split(path.read_text(encoding="utf-8"))
    if suffix == ".jsonl":
        return _read_jsonl(path, text_key, errors)
    if suffix == ".json":
        return _read_json(path, text_key, errors)
    if suffix == ".parquet":
        return _read_parquet(path, text_key)
    raise ValueError(f"{path}: cannot read {suffix or 'files without a suffix'}; documents come from "
                     f"{', '.join(SUFFIXES)} files")


def _text_of(record, text_key: str) -> str | None:
    if isinstance(record, dict) and isinstance(record.get(text_key), str):
        return record[text_key]
    return None


def _expected(record, text_key: str) -> str:
    got = f"an object with keys {sorted(record)[:8]}" if isinstance(record, dict) else type(record).__name__
    return f"expected an object with a string under {text_key!r}, got {got}"


def _read_jsonl(path: Path, text_key: str, errors: _Errors) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                errors.report(f"{path}:{number}", f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            text = _text_of(record, text_key)
            if text is None:
                errors.report(f"{path}:{number}", _expected(record, text_key))
            else:
                docs.append(text)
    return docs


def _read_json(path: Path, text_key: str, errors: _Errors) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # one broken file is not a malformed record: always an error
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json corpus holds one list, "
                         "use .jsonl for one record per line") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of strings or of objects with {text_key!r}, "
                         f"got {type(data).__name__}")
    docs = []
    for i, record in enumerate(data):
        text = record if isinstance(record, str) else _text_of(record, text_key)
        if text is None:
            errors.report(f"{path}: record {i}", _expected(record, text_key))
        else:
            docs.append(text)
    return docs


def _read_parquet(path: Path, text_key: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'llmlab[parquet]' (or pip install "
                          "pyarrow)") from None
    schema = pq.read_schema(path)
    if text_key not in schema.names:
        raise ValueError(f"{path}: no column {text_key!r}; its columns are {schema.names}; pass "
                         f"text_key= with the text column")
    column = pq.read_table(path, columns=[text_key]).column(0)
    return [t for t in column.to_pylist() if isinstance(t, str)]  # nulls are no documents


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded random choice of whole documents for validation, so no document is
    seen on both sides. n_val = round(n * val_fraction), at least 1 when val_fraction > 0 and n >= 2, and
    at most n - 1. Both lists keep the input order; the same (docs, val_fraction, seed) gives the same split."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = list(docs)
    n = len(docs)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(n * val_fraction)), n - 1)
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return [d for d, c in zip(docs, chosen) if not c], [d for d, c in zip(docs, chosen) if c]
