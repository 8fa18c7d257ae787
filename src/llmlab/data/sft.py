"""Supervised fine-tuning data: conversations in the common formats, encoded with a chat template so that
only assistant tokens are trained, batched padded or packed.

Formats (detected per record with format="auto"):

| format | record | becomes |
|---|---|---|
| alpaca | {"instruction", "input"?, "output", "system"?} | system? / user: instruction + "\\n\\n" + input / assistant: output |
| sharegpt | {"conversations": [{"from": "human"/"gpt"/"system"/..., "value"}], "system"?} | one message per turn |
| messages | {"messages": [{"role", "content", ...}]} (OpenAI) | the messages as they are |
"""

from __future__ import annotations

import bisect
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..progress import Bar
from . import sources
from .corpus import _Errors
from .packing import IGNORE, EpochLoader

FORMATS = ("alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool"}
NAMED = {"chat-english": "english", "chat-chinese": "chinese"}
EXPECTED = ('expected alpaca {"instruction", "input"?, "output"}, sharegpt {"conversations": [{"from", "value"}]} '
            'or messages {"messages": [{"role", "content"}]}')


class FormatError(ValueError):
    """A record that is not a conversation in the requested format."""


def _detect(record) -> str:
    if isinstance(record, list):
        return "messages"  # already a list of messages
    if not isinstance(record, dict):
        raise FormatError(f"{EXPECTED}; got a {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise FormatError(f"{EXPECTED}; got an object with keys {sorted(record)[:8]}")


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _from_alpaca(r: dict) -> list[dict]:
    if "instruction" not in r or "output" not in r:
        raise FormatError(f'alpaca records need "instruction" and "output"; got keys {sorted(r)[:8]}')
    prompt = _string(r["instruction"], '"instruction"')
    extra = r.get("input") or ""
    if extra:  # Stanford Alpaca's layout: the input follows the instruction after a blank line
        prompt = prompt + "\n\n" + _string(extra, '"input"')
    chat = [{"role": "system", "content": _string(r["system"], '"system"')}] if r.get("system") else []
    answer = _string(r["output"], '"output"')
    return chat + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _from_sharegpt(r: dict) -> list[dict]:
    turns = r.get("conversations")
    if not isinstance(turns, list):
        raise FormatError('sharegpt records need "conversations": a list of {"from", "value"}; got '
                          f"{type(turns).__name__}")
    chat = [{"role": "system", "content": _string(r["system"], '"system"')}] if r.get("system") else []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise FormatError(f'turn {i} must be {{"from", "value"}}, got {t!r:.80}')
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise FormatError(f'turn {i} has "from": {t["from"]!r}; use one of {", ".join(SHAREGPT_ROLES)}')
        chat.append({"role": role, "content": _string(t["value"], f'turn {i} "value"')})
    return chat


def _from_messages(r) -> list[dict]:
    messages = r if isinstance(r, list) else r.get("messages")
    if not isinstance(messages, list):
        raise FormatError(f'"messages" must be a list of {{"role", "content"}}, got {type(messages).__name__}')
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise FormatError(f'message {i} needs "role" in {ROLES}, got {m!r:.80}')
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            raise FormatError(f'message {i} needs a string "content" (or "tool_calls"), got {m!r:.80}')
        chat.append(dict(m))
    return chat


CONVERTERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages}


def to_conversation(record, format: str = "auto") -> list[dict]:
    """One record -> a list of {"role", "content"} messages; raises FormatError saying what is expected."""
    kind = _detect(record) if format == "auto" else format
    if kind != "messages" and not isinstance(record, dict):
        raise FormatError(f"a {kind} record is a JSON object, got a {type(record).__name__}")
    chat = CONVERTERS[kind](record)
    if not any(m["role"] == "assistant" for m in chat):
        raise FormatError("the conversation has no assistant turn, so nothing in it would be trained")
    return chat


def load_conversations(source, *, format: str = "auto", on_error: str = "fail") -> list[list[dict]]:
    """Conversations (lists of {"role", "content"} messages) from .jsonl / .json files (a .json file holds a
    list of records), a directory of them, in-memory records, a list of any of those, or a named source:
    "chat-english" / "chat-chinese" (single-turn chats from chatterbot-corpus).

    format: "auto" (per record), "alpaca", "sharegpt" or "messages". A malformed record raises ValueError
    naming file:line (or the record's index) and what is expected; on_error="skip" skips it instead and warns
    once with the count and the first."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use 'auto' or one of {', '.join(FORMATS)}")
    errors = _Errors(on_error, "conversations")
    out = list(_load(source, format, errors, "records"))
    errors.warn()
    if not out:
        raise ValueError(f"no conversations in {source if isinstance(source, (str, os.PathLike)) else 'the records'}"
                         f"; {EXPECTED}")
    return out


def _convert_all(items, format: str, errors: _Errors):
    for where, record in items:
        try:
            yield to_conversation(record, format)
        except FormatError as e:
            errors.report(where, str(e))


def _load(source, format: str, errors: _Errors, where: str):
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and source.lower() in NAMED and not Path(source).exists():
            pairs = sources.chat_pairs(NAMED[source.lower()])
            yield from ([{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs)
            return
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".jsonl", ".json") and p.is_file())
            for f in files:
                yield from _convert_all(_records(f, errors), format, errors)
            return
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such file or directory, and not a named source "
                                    f"({', '.join(NAMED)})")
        yield from _convert_all(_records(path, errors), format, errors)
        return
    if isinstance(source, dict):
        source = [source]
    if not isinstance(source, Sequence):
        raise TypeError(f"a conversation source is a path, a named source, records or a list of those; got "
                        f"{type(source).__name__}")
    for i, item in enumerate(source):
        if isinstance(item, (str, os.PathLike)):
            yield from _load(item, format, errors, where)
        else:
            yield from _convert_all([(f"{where}[{i}]", item)], format, errors)


def _records(path: Path, errors: _Errors):
    """(location, record) pairs of a .jsonl (one per line) or .json (a list, or one record) file."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file holds a list of "
                             "records, use .jsonl for one record per line") from None
        data = data if isinstance(data, list) else [data]
        yield from ((f"{path}: record {i}", r) for i, r in enumerate(data))
        return
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: conversations are read from .jsonl or .json files")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                errors.report(f"{path}:{number}", f"invalid JSON ({e.msg} at column {e.colno})")


def encode_conversations(conversations: Sequence[list[dict]], tokenizer, *, max_len: int, chat_template=None,
                         on_overflow: str = "truncate", progress: bool = True) -> list[dict]:
    """Each conversation -> {"input_ids", "labels"}: the chat template's tokens, labels = input_ids on the
    assistant tokens (their contents and end-of-turn tokens, tokenizer.apply_chat_template's assistant mask)
    and -100 elsewhere.

    Longer than max_len: "truncate" keeps the first max_len tokens (dropping the example, with a warning, if
    no assistant token is left), "skip" drops it (one warning with the count), "fail" raises."""
    if on_overflow not in ("truncate", "skip", "fail"):
        raise ValueError(f"on_overflow must be 'truncate', 'skip' or 'fail', got {on_overflow!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    examples, long_, dropped = [], 0, 0
    with Bar(len(conversations), "encoding conversations", progress) as bar:
        for i, chat in enumerate(conversations):
            bar.update()
            out = tokenizer.apply_chat_template(chat, chat_template=chat_template, return_assistant_mask=True)
            ids, mask = out["input_ids"], out["assistant_mask"]
            if len(ids) > max_len:
                long_ += 1
                if on_overflow == "fail":
                    raise ValueError(f"conversation {i} has {len(ids)} tokens > max_len={max_len}; raise max_len or "
                                     "pass on_overflow='truncate' or 'skip'")
                if on_overflow == "skip":
                    continue
                ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):  # labels[0] is never a target (nothing precedes it)
                dropped += 1
                continue
            examples.append({"input_ids": list(ids), "labels": [t if m else IGNORE for t, m in zip(ids, mask)]})
    if long_ and on_overflow != "fail":
        what = "skipped" if on_overflow == "skip" else "truncated"
        warnings.warn(f"{long_} of {len(conversations)} conversations are longer than max_len={max_len} and were "
                      f"{what}", stacklevel=2)
    if dropped:
        warnings.warn(f"dropped {dropped} conversations without assistant tokens (within max_len={max_len})",
                      stacklevel=2)
    if not examples:
        raise ValueError(f"no trainable examples: every conversation was dropped (max_len={max_len}, "
                         f"on_overflow={on_overflow!r}); raise max_len")
    return examples


class SFTLoader(EpochLoader):
    """Batches of encoded examples, endless over epochs, resumable (see packing.EpochLoader).

    pack=False: batch_size examples per batch, right-padded with pad_id to the longest: "input_ids",
    "attention_mask" (1 on real tokens), "labels" (-100 on padding), all long [B, T].
    pack=True: examples placed into rows of seq_len tokens (best fit in a shuffled order: each example goes
    to the fullest row it fits in), batch_size rows per batch: "input_ids", "labels", "document_ids" (one id
    per example, padding its own with labels -100), so attention never crosses examples and every example
    gets the loss it gets alone. drop_last drops each epoch's last partial batch."""

    def __init__(self, examples: Sequence[dict], *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 pack: bool = False, seq_len: int | None = None, pad_id: int = 0, drop_last: bool = True):
        super().__init__(seed)
        if not examples:
            raise ValueError("no examples; encode_conversations(...) gives them")
        self.examples = [(np.asarray(e["input_ids"], dtype=np.int64), np.asarray(e["labels"], dtype=np.int64))
                         for e in examples]
        self.lengths = np.array([len(ids) for ids, _ in self.examples])
        self.batch_size, self.shuffle, self.pack, self.pad_id = int(batch_size), shuffle, pack, int(pad_id)
        self.seq_len, self.drop_last = seq_len, drop_last
        if pack:
            if seq_len is None:
                raise ValueError("pack=True needs seq_len (the row length examples are packed into)")
            longest = int(self.lengths.max())
            if longest > seq_len:
                raise ValueError(f"example {int(self.lengths.argmax())} has {longest} tokens > seq_len={seq_len}; "
                                 f"encode with max_len <= {seq_len} or raise seq_len")
        if self.batches_in_epoch(0) == 0:
            raise ValueError(f"an epoch makes fewer than batch_size={batch_size} "
                             f"{'rows' if pack else 'examples'}; lower batch_size or pass drop_last=False")

    def _signature(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "shuffle": self.shuffle, "pack": self.pack,
                "seq_len": self.seq_len, "drop_last": self.drop_last, "n_examples": len(self.examples),
                "n_tokens": int(self.lengths.sum())}

    def _plan_epoch(self, epoch: int) -> list:
        rng = self._rng(epoch)
        order = rng.permutation(len(self.examples)) if self.shuffle else np.arange(len(self.examples))
        units = _best_fit(order, self.lengths, self.seq_len) if self.pack else [[i] for i in order]
        if self.pack and self.shuffle:  # rows opened late are emptier: do not leave them all for the end
            units = [units[i] for i in rng.permutation(len(units))]
        stop = len(units) - len(units) % self.batch_size if self.drop_last else len(units)
        return [units[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _make_batch(self, units: list[list[int]]) -> dict[str, torch.Tensor]:
        if not self.pack:
            T = max(len(self.examples[u[0]][0]) for u in units)
            ids = np.full((len(units), T), self.pad_id, dtype=np.int64)
            labels = np.full((len(units), T), IGNORE, dtype=np.int64)
            mask = np.zeros((len(units), T), dtype=np.int64)
            for b, (i,) in enumerate(units):
                x, y = self.examples[i]
                ids[b, :len(x)], labels[b, :len(x)], mask[b, :len(x)] = x, y, 1
            return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                    "labels": torch.from_numpy(labels)}
        T = self.seq_len
        ids = np.full((len(units), T), self.pad_id, dtype=np.int64)
        labels = np.full((len(units), T), IGNORE, dtype=np.int64)
        docs = np.zeros((len(units), T), dtype=np.int64)
        for b, row in enumerate(units):
            at = 0
            for d, i in enumerate(row):
                x, y = self.examples[i]
                ids[b, at:at + len(x)], labels[b, at:at + len(x)], docs[b, at:at + len(x)] = x, y, d
                labels[b, at] = IGNORE  # alone, an example's first label is never a target; packed it must not be
                at += len(x)
            docs[b, at:] = len(row)  # padding: a document of its own
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "document_ids": torch.from_numpy(docs)}


def _best_fit(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Rows of example indices: each example, in order, goes to the row with the least room that still fits
    it (best fit), else a new row. Rows are bucketed by their free room, so a placement is one bisect."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> rows with exactly that room
    rooms: list[int] = []  # the sorted keys of by_room
    for i in order:
        need = int(lengths[i])
        k = bisect.bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(int(i))
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(r)
    return rows
