"""Preference data: pairs (prompt, chosen, rejected) for DPO and reward models, unpaired examples (prompt,
completion, label) for KTO, built from files, from chat data or from ranked samples, encoded through a chat
template, and the accuracy evaluator of reward models and DPO's implicit rewards.

Records (JSON Lines, or the same objects in memory; other keys such as "id" are kept in .meta):

| form | record |
|---|---|
| pair | {"prompt": str or messages, "chosen": str or messages, "rejected": str or messages} |
| conversation pair (implicit prompt: Anthropic HH, TRL) | {"chosen": messages, "rejected": messages}: the messages both share become the prompt; each must go on with an assistant message |
| unpaired (KTO) | {"prompt": str or messages, "completion": str or messages, "label": true/false} |

A completion that is one plain assistant message is stored as its text, so the same pair reads the same in
every form. chosen == rejected is an error (the pair teaches nothing, DPO's loss is a constant log 2 on
it, and it is nearly always a bug in whatever built the file). The BIG-bench hhh_alignment file
(../shared/data/preference/) reads as pairs with "id" and "subset" in .meta: evaluation only, never training.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..tokenizer import Tokenizer
from .corpus import _Errors
from .sft import FormatError, _from_messages, load_conversations
from .sources import shared_data_file

SCHEMAS = ('accepted records: {"prompt", "chosen", "rejected"} (strings or message lists), '
           '{"chosen": messages, "rejected": messages} (the shared first messages are the prompt), or '
           '{"prompt", "completion", "label": bool} (unpaired, KTO)')
FIELDS = ("prompt", "chosen", "rejected", "completion", "label")
MAX_SHOWN = 20


@dataclass
class PreferencePair:
    prompt: str | list[dict]  # a text or the chat messages before the reply
    chosen: str | list[dict]  # the preferred reply: its text, or the messages that follow the prompt
    rejected: str | list[dict]
    meta: dict = field(default_factory=dict)  # the record's other fields (id, subset, scores, ...)


@dataclass
class UnpairedExample:
    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool  # True: desirable
    meta: dict = field(default_factory=dict)


class _AllErrors(_Errors):
    """corpus._Errors, but on_error="fail" reads on and raises once at the end with every problem found (the
    first MAX_SHOWN), so one run shows all that is wrong with a file."""

    def __init__(self, on_error: str, what: str):
        super().__init__(on_error, what)
        self.problems: list[str] = []

    def report(self, where: str, problem: str) -> None:
        if self.on_error == "skip":
            return super().report(where, problem)
        self.problems.append(f"{where}: {problem.replace('; ' + SCHEMAS, '')}")  # the schemas come once, below

    def check(self) -> None:
        if not self.problems:
            return self.warn()
        shown = self.problems[:MAX_SHOWN]
        more = f"\n  ... and {len(self.problems) - MAX_SHOWN} more" if len(self.problems) > MAX_SHOWN else ""
        raise FormatError(f"{len(self.problems)} malformed {self.what}:\n  " + "\n  ".join(shown) + more +
                          f"\n{SCHEMAS}; pass on_error='skip' to skip malformed records")


# ----------------------------------------------------------------------------------------- one record
def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f'"{name}" must be a string or a list of messages, got {type(value).__name__}')
    if not value.strip():
        raise FormatError(f'"{name}" is empty')
    return value


def _messages(value, name: str) -> list[dict]:
    try:
        chat = _from_messages(value)
    except FormatError as e:
        raise FormatError(f'"{name}": {e}') from None
    if not chat:
        raise FormatError(f'"{name}" is an empty message list')
    return chat


def _prompt(value):
    return _messages(value, "prompt") if isinstance(value, list) else _text(value, "prompt")


def _completion(value, name: str):
    """A reply: its text, or the messages after the prompt (kept as a list unless it is one plain reply)."""
    if not isinstance(value, list):
        return _text(value, name)
    chat = _messages(value, name)
    if chat[0]["role"] != "assistant":
        raise FormatError(f'"{name}" must start with an assistant message, got role {chat[0]["role"]!r}')
    if len(chat) == 1 and set(chat[0]) == {"role", "content"}:
        return _text(chat[0]["content"], name)
    return chat


def _split_conversations(chosen, rejected) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit prompt: the longest shared run of first messages; both must go on with an assistant turn."""
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) or k == len(rejected):
        raise FormatError("chosen and rejected are the same conversation" if len(chosen) == len(rejected) else
                          "one of chosen and rejected is a prefix of the other; they must differ in a reply")
    if k == 0:
        raise FormatError("chosen and rejected share no first message, so there is no prompt; give \"prompt\"")
    if chosen[k]["role"] != "assistant" or rejected[k]["role"] != "assistant":
        raise FormatError(f"chosen and rejected first differ at message {k}, which is not an assistant message "
                          "in both; the shared messages must be the whole prompt")
    return chosen[:k], chosen[k:], rejected[k:]


def to_preference(record) -> PreferencePair | UnpairedExample:
    """One record (see the module docstring) -> a pair or an unpaired example; raises FormatError naming
    the problem and the accepted schemas."""
    if not isinstance(record, dict):
        raise FormatError(f"expected a JSON object, got {type(record).__name__}; {SCHEMAS}")
    meta = {k: v for k, v in record.items() if k not in FIELDS}
    if "completion" in record or "label" in record:
        missing = [k for k in ("prompt", "completion", "label") if k not in record]
        if missing:
            raise FormatError(f"an unpaired record is missing {', '.join(map(repr, missing))}; {SCHEMAS}")
        if not isinstance(record["label"], bool):
            raise FormatError(f'"label" must be true or false, got {record["label"]!r:.40}')
        return UnpairedExample(_prompt(record["prompt"]), _completion(record["completion"], "completion"),
                               record["label"], meta)
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing or ("prompt" not in record and not
                   (isinstance(record["chosen"], list) and isinstance(record["rejected"], list))):
        missing = missing or ["prompt"]  # strings without a prompt: nothing tells where the reply starts
        raise FormatError(f"missing {', '.join(map(repr, missing))} (got keys {sorted(record)[:8]}); {SCHEMAS}")
    if "prompt" in record:
        prompt = _prompt(record["prompt"])
        chosen, rejected = _completion(record["chosen"], "chosen"), _completion(record["rejected"], "rejected")
    else:
        prompt, chosen, rejected = _split_conversations(record["chosen"], record["rejected"])
        chosen, rejected = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    if chosen == rejected:
        raise FormatError("chosen and rejected are the same reply; such a pair teaches nothing")
    return PreferencePair(prompt, chosen, rejected, meta)


# --------------------------------------------------------------------------------------------- files
def load_preferences(source, *, on_error: str = "fail") -> list[PreferencePair] | list[UnpairedExample]:
    """Pairs or unpaired examples from a .jsonl file (one record per line), a .json file (a list of records),
    records in memory, or a list of those. All records must be of one kind (the first decides).

    on_error="fail" reads everything and raises one ValueError listing each bad record as file:line (or
    records[i]) with its problem, then the accepted schemas; "skip" drops them with one warning."""
    errors = _AllErrors(on_error, "preference records")
    out: list = []
    for where, record in _records(source, "records"):
        if isinstance(record, FormatError):
            errors.report(where, str(record))
            continue
        try:
            item = to_preference(record)
        except FormatError as e:
            errors.report(where, str(e))
            continue
        if out and type(item) is not type(out[0]):
            errors.report(where, f"{'an unpaired record' if isinstance(item, UnpairedExample) else 'a pair'} "
                                 f"among {'pairs' if isinstance(out[0], PreferencePair) else 'unpaired records'}; "
                                 "keep pairs and unpaired (KTO) records in separate files")
            continue
        out.append(item)
    errors.check()
    if not out:
        where = source if isinstance(source, (str, os.PathLike)) else "the records"
        raise ValueError(f"no preference records in {where}")
    return out


def _records(source, where: str):
    """(location, record) pairs; a line that is not JSON comes as a FormatError in place of its record."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file holds a list of "
                                 "records, use .jsonl for one record per line") from None
            yield from ((f"{path}: record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data]))
            return
        if path.suffix.lower() != ".jsonl":
            raise ValueError(f"{path}: preference records are read from .jsonl or .json files")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path}:{number}", FormatError(f"invalid JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(source, (dict, PreferencePair, UnpairedExample)):
        source = [source]
    if not isinstance(source, Sequence):
        raise TypeError(f"a preference source is a path, records or a list of those; got {type(source).__name__}")
    for i, item in enumerate(source):
        if isinstance(item, (str, os.PathLike)):
            yield from _records(item, where)
        else:
            yield f"{where}[{i}]", _as_record(item)


def _as_record(item):
    if isinstance(item, PreferencePair):
        return {"prompt": item.prompt, "chosen": item.chosen, "rejected": item.rejected, **item.meta}
    if isinstance(item, UnpairedExample):
        return {"prompt": item.prompt, "completion": item.completion, "label": item.label, **item.meta}
    return item


def save_preferences(items: Sequence[PreferencePair | UnpairedExample], path: str | os.PathLike) -> Path:
    """Write pairs or unpaired examples as JSONL (the explicit-prompt form; load_preferences reads it back),
    atomically: a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(_as_record(item), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_hhh_alignment(path: str | os.PathLike | None = None) -> list[PreferencePair]:
    """BIG-bench hhh_alignment (221 pairs; .meta has id and subset). EVALUATION ONLY: never train on it."""
    return load_preferences(shared_data_file(path, "preference/hhh_alignment.jsonl"))


def load_sentiment_pairs(language: str = "english", *, seed: int = 0, path: str | os.PathLike | None = None,
                         prompt: str | None = None) -> list[PreferencePair]:
    """Pairs from BIG-bench multiemo (../shared/data/classification, 8.2k labelled reviews per language): a
    positive review preferred to a negative one (see pairs_from_labels), the pairs of a sentiment reward model.
    The shared prompt asks for a review in the data's language unless prompt= is given."""
    lang = {"english": "en", "chinese": "zh"}.get(language, language)
    prompt = prompt or {"en": "Write a review.", "zh": "写一条评论。"}.get(lang, "Write a review.")
    with open(shared_data_file(path, f"classification/multiemo_{lang}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return pairs_from_labels([(r["text"], r["label"]) for r in rows], chosen_label="positive",
                             rejected_label="negative", prompt=prompt, seed=seed)


# ------------------------------------------------------------------------------------------- building
def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _group(pair) -> str:
    """What split_pairs keeps on one side: meta["group"] when the builder set one, else the prompt."""
    return str(pair.meta["group"]) if "group" in pair.meta else _key(pair.prompt)


def pairs_from_labels(examples: Sequence[tuple[str, str]], *, chosen_label: str, rejected_label: str,
                      prompt: str, seed: int = 0) -> list[PreferencePair]:
    """Pairs from labelled texts: each text labelled chosen_label against one labelled rejected_label, both drawn
    without replacement in a seeded order (min of the two counts pairs; other labels are left out), under one
    shared prompt. Every text is in one pair only, so each pair is its own split group (meta["group"])."""
    good = [t for t, label in examples if label == chosen_label and t.strip()]
    bad = [t for t, label in examples if label == rejected_label and t.strip()]
    if not good or not bad:
        raise ValueError(f"need texts labelled {chosen_label!r} and {rejected_label!r}; got {len(good)} and "
                         f"{len(bad)} (labels present: {sorted({label for _, label in examples})})")
    rng = random.Random(seed)
    rng.shuffle(good)
    rng.shuffle(bad)
    return [PreferencePair(prompt, g, b, {"group": i}) for i, (g, b) in enumerate(zip(good, bad))]


def pairs_from_conversations(conversations, *, seed: int = 0) -> list[PreferencePair]:
    """Synthetic pairs from chat data (message lists, or a source for sft.load_conversations such as
    "chat-english"): prompt = the messages before the last assistant turn, chosen = that turn's reply,
    rejected = the last reply of another conversation drawn with `seed`, never one with the same text or
    the same prompt (a reply to the same question may be just as good). Conversations whose last reply
    is empty or has nothing before it are left out."""
    if isinstance(conversations, (str, os.PathLike)):
        conversations = load_conversations(conversations)
    items = []
    for chat in conversations:
        last = max((j for j, m in enumerate(chat) if m.get("role") == "assistant"), default=0)
        reply = chat[last].get("content") if chat else None
        if last > 0 and isinstance(reply, str) and reply.strip():
            items.append(([dict(m) for m in chat[:last]], reply))
    keys = [_key(p) for p, _ in items]
    rng = random.Random(seed)
    pairs = []
    for i, (prompt, chosen) in enumerate(items):
        def fits(j):
            return items[j][1].strip() != chosen.strip() and keys[j] != keys[i]
        j = next((j for j in (rng.randrange(len(items)) for _ in range(16)) if fits(j)), None)
        if j is None:  # unlucky draws: scan from a random start
            start = rng.randrange(len(items))
            j = next((k % len(items) for k in range(start, start + len(items)) if fits(k % len(items))), None)
        if j is not None:
            pairs.append(PreferencePair(prompt, chosen, items[j][1]))
    if not pairs:
        raise ValueError("no pairs: every conversation's last reply has no different reply to oppose it")
    return pairs


def pairs_from_ranked(prompt, samples: Sequence, scores: Sequence[float]) -> list[PreferencePair]:
    """One pair from model samples scored by a reward: the best (chosen) against the worst (rejected), the
    first of equal scores; [] when all scores tie or the two texts are equal. Scores go to .meta."""
    scores = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} scores")
    if any(math.isnan(s) for s in scores):
        raise ValueError("a score is NaN; rank samples by finite rewards")
    if len(samples) < 2:
        return []
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] == scores[worst] or samples[best] == samples[worst]:
        return []
    return [PreferencePair(prompt, samples[best], samples[worst],
                           {"chosen_score": scores[best], "rejected_score": scores[worst]})]


def split_pairs(pairs: Sequence, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, validation), deterministic in seed. Items with the same prompt (or the same meta["group"], where
    a builder set one) stay on the same side, so no prompt of the validation set is trained on; validation gets
    whole groups until it holds at least round(val_fraction · n) items. Both sides keep the input order."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(_group(p), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"cannot split {len(pairs)} items with {len(groups)} distinct prompt(s): items of one "
                         "prompt stay together, so at least 2 prompts are needed")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    want, val = max(1, round(val_fraction * len(pairs))), set()
    for g in order[:-1]:  # the last group always stays in training
        if len(val) >= want:
            break
        val.update(g)
    return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]


# -------------------------------------------------------------------------------------------- encoding
def _ids(out) -> list[int]:
    out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(i) for i in out]


def _eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and getattr(tokenizer, "eos_token", None):
        eos = tokenizer.token_to_id(tokenizer.eos_token)
    return eos


def encode_completion(tokenizer, prompt, completion, chat_template=None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) such that prompt + completion is what the model reads.

    With a chat template (the tokenizer's or chat_template=): the prompt (a text becomes one user message)
    rendered with add_generation_prompt=True, and the completion = the tokens of the whole conversation
    after those (the reply and its end-of-turn tokens); a template whose prompt rendering is not a prefix of
    the whole raises ValueError. Without one (text prompts only): the prompt encoded with the tokenizer's
    special tokens (BOS), the completion without them, plus the EOS token when the tokenizer has one."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template is None:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("chat messages need a chat template: the tokenizer has none, pass chat_template=")
        user_text = {"parse_special": False} if isinstance(tokenizer, Tokenizer) else {}  # no injected specials
        p = _ids(tokenizer.encode(prompt, add_special_tokens=True, **user_text))
        eos = _eos_id(tokenizer)
        return p, _ids(tokenizer.encode(completion, add_special_tokens=False, **user_text)) + \
            ([eos] if eos is not None else [])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    p = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=chat_template))
    full = _ids(tokenizer.apply_chat_template(messages + reply, chat_template=chat_template))
    if full[:len(p)] != p:
        at = next((k for k, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
        raise ValueError(f"the chat template renders the prompt (with add_generation_prompt=True) differently from "
                         f"the start of the whole conversation (first difference at token {at}), so the reply's "
                         "tokens cannot be told apart; use a template whose generation prompt is a prefix")
    return p, full[len(p):]


def encode_pairs(items: Sequence[PreferencePair | UnpairedExample], tokenizer, *, max_len: int,
                 chat_template=None) -> list[dict]:
    """Token ids per item (see encode_completion): pairs -> {"prompt_ids", "chosen_ids", "rejected_ids"},
    unpaired examples -> {"prompt_ids", "completion_ids", "label"}.

    Longer than max_len (prompt + the longest completion): the prompt loses tokens from its left (its end, next
    to the reply, stays) until the longest completion fits, but keeps at least half of max_len (or all of
    itself when shorter; TRL's max_prompt_length plays this part); then completions are cut to fit (their starts
    stay). So a long reply never crowds out the question a reward model or DPO judges it by. One warning counts
    the truncated items."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (a prompt token and a completion token), got {max_len}")
    out, cut = [], 0
    for i, item in enumerate(items):
        if isinstance(item, PreferencePair):
            names, completions = ("chosen_ids", "rejected_ids"), (item.chosen, item.rejected)
        elif isinstance(item, UnpairedExample):
            names, completions = ("completion_ids",), (item.completion,)
        else:
            raise TypeError(f"items[{i}] is a {type(item).__name__}, not a PreferencePair or UnpairedExample")
        try:
            encoded = [encode_completion(tokenizer, item.prompt, c, chat_template) for c in completions]
        except ValueError as e:
            raise ValueError(f"items[{i}]: {e}") from None
        prompt, comps = encoded[0][0], [c for _, c in encoded]
        if not prompt or not all(comps):
            raise ValueError(f"items[{i}]: the {'prompt' if not prompt else 'completion'} encodes to no tokens")
        longest = max(map(len, comps))
        if len(prompt) + longest > max_len:
            cut += 1
            keep = max(1, max_len - longest, min(len(prompt), max_len // 2))
            prompt = prompt[-keep:]
            comps = [c[:max_len - keep] for c in comps]
        record = {"prompt_ids": prompt, **dict(zip(names, comps))}
        if isinstance(item, UnpairedExample):
            record["label"] = item.label
        out.append(record)
    if cut:
        warnings.warn(f"{cut} of {len(out)} items are longer than max_len={max_len} and were truncated (prompts "
                      "from the left, then completions from the right)", stacklevel=2)
    return out


# ------------------------------------------------------------------------------------------- evaluation
@dataclass
class PreferenceAccuracy:
    accuracy: float  # fraction of pairs with chosen > rejected, a tie counting 1/2 (chance is 0.5)
    margin: float  # mean of chosen - rejected
    n: int
    ties: int


def preference_accuracy(chosen_scores, rejected_scores) -> PreferenceAccuracy:
    """How often the chosen reply scores higher: for reward models (rewards) and DPO (implicit rewards
    β·(log π/π_ref)). A tie counts half, so a constant scorer gets 0.5, not 0 or 1."""
    c = [float(x) for x in (chosen_scores.tolist() if hasattr(chosen_scores, "tolist") else chosen_scores)]
    r = [float(x) for x in (rejected_scores.tolist() if hasattr(rejected_scores, "tolist") else rejected_scores)]
    if len(c) != len(r) or not c:
        raise ValueError(f"need as many chosen as rejected scores, at least one: got {len(c)} and {len(r)}")
    if any(math.isnan(x) for x in c + r):
        raise ValueError("a score is NaN")
    wins = sum(a > b for a, b in zip(c, r))
    ties = sum(a == b for a, b in zip(c, r))
    return PreferenceAccuracy((wins + 0.5 * ties) / len(c), sum(a - b for a, b in zip(c, r)) / len(c), len(c), ties)


__all__ = ["PreferenceAccuracy", "PreferencePair", "UnpairedExample", "encode_completion", "encode_pairs",
           "load_hhh_alignment", "load_preferences", "pairs_from_conversations", "pairs_from_ranked",
           "preference_accuracy", "save_preferences", "split_pairs", "to_preference"]
