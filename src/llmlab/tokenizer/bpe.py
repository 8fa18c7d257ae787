"""Byte-level BPE: training, encoding, decoding and Hugging Face tokenizer.json I/O.

BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units") starts from single
symbols and repeatedly merges the most frequent adjacent pair into a new symbol. GPT-2 (Radford et al. 2019)
runs it on UTF-8 bytes inside regex pre-tokens, so every string round-trips with no unknown token.

Id layout of a trained tokenizer: special tokens first (0..k-1), then byte b at id k+b, then merges in order.
"""

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import regex

from .bytelevel import BYTE_TO_UNICODE, bytes_to_symbols, pretokenize, symbols_to_bytes

_CACHE_LIMIT = 100_000  # pre-token -> ids cache entries; cleared when full so memory stays bounded


def merge_pair(word: list[int], left: int, right: int, new: int) -> list[int]:
    """Replace every non-overlapping (left, right) in word, scanning left to right, by new."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def special_pattern(specials: Sequence[str]) -> "regex.Pattern | None":
    """One capture group matching any special token, longest first (so "<a><b>" beats "<a>")."""
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


def merge_with_changes(word: list[int], left: int, right: int, new: int) -> tuple[list[int], list[tuple[tuple[int, int], int]]]:
    """merge_pair, plus the pair-count changes it causes, found from each merge site's neighbours only
    (O(merge sites), not O(word length)): (prev, left) and (right, next) become (prev, new) and (new, next).
    Adjacent sites chain correctly because prev is read from the output, where it may already be `new`."""
    out: list[int] = []
    changes: list[tuple[tuple[int, int], int]] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            changes.append(((left, right), -1))
            if out:
                changes += [((out[-1], left), -1), ((out[-1], new), 1)]
            if i + 2 < n:
                changes += [((right, word[i + 2]), -1), ((new, word[i + 2]), 1)]
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out, changes


def _split_specials(texts: Iterable[str], specials: Sequence[str]) -> Iterable[str]:
    # Special tokens are added verbatim; their text must not leak into the learned merges.
    pattern = special_pattern(specials)
    if pattern is None:
        yield from texts
        return
    for text in texts:
        yield from pattern.split(text)[0::2]  # odd pieces are the captured special tokens themselves


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, special_tokens: Sequence[str] = ()
) -> "ByteLevelBPE":
    """Learn merges until the vocab (specials + 256 bytes + merges) reaches vocab_size.

    Tie-breaking: the pair with the highest count wins; among equal counts, the smallest (left id, right id).
    Stops early when the best pair occurs fewer than min_frequency times or no pairs are left.
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    k = len(special_tokens)
    if vocab_size < 256 + k:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least 256 byte tokens + {k} special tokens")
    if isinstance(texts, str):
        texts = [texts]
    word_counts = Counter(w for t in _split_specials(texts, special_tokens) for w in pretokenize(t))
    if not word_counts:
        raise ValueError("cannot train a tokenizer on an empty corpus")

    # id -> bytes for non-special symbols; identical byte strings share one id (as in `tokenizers`).
    tokens: list[bytes] = [b""] * k + [bytes([b]) for b in range(256)]
    token_ids = {t: i for i, t in enumerate(tokens) if i >= k}
    words = [[k + b for b in w.encode("utf-8")] for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words containing it
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_counts[p] += freqs[i]
            where[p].add(i)
    # Max-heap via negated counts; entries go stale when a count changes (lazy deletion on pop).
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    merged: set[tuple[int, int]] = set()
    while len(tokens) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:
            continue  # stale entry: the live count was pushed again when it changed
        if count < min_frequency:
            break  # the heap top is the max live count, so nothing else qualifies either
        left, right = pair
        new_bytes = tokens[left] + tokens[right]
        new = token_ids.get(new_bytes)
        if new is None:
            new = token_ids[new_bytes] = len(tokens)
            tokens.append(new_bytes)
        if pair not in merged:  # a pair can recur only via a reused id; record each merge once
            merges.append(pair)
            merged.add(pair)

        # Update counts only for the words that contain the pair, and only around each merge site.
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            words[i], changes = merge_with_changes(words[i], left, right, new)
            for p, n in changes:
                delta[p] += n * freqs[i]
                if n > 0:
                    where[p].add(i)  # words that lost a pair stay listed; merging there is then a no-op
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts[p] + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]
                where.pop(p, None)

    vocab = {s: i for i, s in enumerate(special_tokens)}
    vocab.update({bytes_to_symbols(t): i for i, t in enumerate(tokens) if i >= k})
    merge_strs = [(bytes_to_symbols(tokens[a]), bytes_to_symbols(tokens[b])) for a, b in merges]
    return ByteLevelBPE(vocab, merge_strs, special_tokens)


class ByteLevelBPE:
    """A byte-level BPE tokenizer defined by a vocab (token string -> id), ranked merges and special tokens."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], special_tokens: Sequence[str] = ()):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = list(special_tokens)
        for s in self.special_tokens:
            self.vocab.setdefault(s, len(self.vocab))
        n = len(self.vocab)
        if sorted(self.vocab.values()) != list(range(n)):
            raise ValueError("vocab ids must be exactly 0..len(vocab)-1, each used once")
        specials = set(self.special_tokens)
        self._id_to_token = [""] * n
        self._id_to_bytes = [b""] * n
        for tok, i in self.vocab.items():
            self._id_to_token[i] = tok
            self._id_to_bytes[i] = tok.encode("utf-8") if tok in specials else symbols_to_bytes(tok)
        self._special_ids = {self.vocab[s] for s in specials}
        missing = [c for c in BYTE_TO_UNICODE.values() if c not in self.vocab]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} of the 256 byte symbols (e.g. {missing[0]!r})")
        self._byte_ids = [self.vocab[BYTE_TO_UNICODE[b]] for b in range(256)]
        # (left id, right id) -> (rank, merged id); the lowest rank is applied first.
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses a token missing from the vocab")
            # A later duplicate overwrites an earlier one, as in `tokenizers`.
            self._ranks[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[a + b])
        self._special_re = special_pattern(self.special_tokens)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        self._check_id(i)
        return self._id_to_token[i]

    # --- encoding -------------------------------------------------------------------------------------

    def _bpe(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
        if len(ids) > 1:
            ids = self._merge(ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply merges lowest rank first, leftmost on ties (the order `tokenizers` uses, which matters only
        when two merges produce the same token). A heap of candidate pairs over a linked list of symbols keeps
        this O(n log n) in the piece length: Chinese text without spaces makes pre-tokens hundreds long."""
        ranks, n = self._ranks, len(ids)
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        nxt[-1] = -1
        heap = [(r[0], i) for i in range(n - 1) if (r := ranks.get((ids[i], ids[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j == -1:
                continue
            r = ranks.get((ids[i], ids[j]))
            if r is None or r[0] != rank:
                continue  # stale: a neighbour was merged since this entry was pushed
            ids[i], alive[j], nxt[i] = r[1], False, nxt[j]
            if nxt[i] != -1:
                prev[nxt[i]] = i
            for a in (prev[i], i):  # the two pairs the merged symbol now takes part in
                if a != -1 and nxt[a] != -1 and (r := ranks.get((ids[a], ids[nxt[a]]))) is not None:
                    heapq.heappush(heap, (r[0], a))
        return [t for t, keep in zip(ids, alive) if keep]

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Text -> ids. With parse_special=False, special-token strings in text are ordinary text, so user
        input cannot inject e.g. an end-of-turn token."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        chunks = self._special_re.split(text) if parse_special and self._special_re else [text]
        ids: list[int] = []
        for j, chunk in enumerate(chunks):
            if j % 2:  # split() with one capture group alternates text, special, text, ...
                ids.append(self.vocab[chunk])
            else:
                for piece in pretokenize(chunk):
                    ids.extend(self._bpe(piece))
        return ids

    # --- decoding -------------------------------------------------------------------------------------

    def _check_id(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._id_to_bytes):
            raise ValueError(f"token id {i!r} is out of range for a vocab of size {len(self._id_to_bytes)}")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i) if hasattr(i, "__index__") and not isinstance(i, int) else i  # numpy / torch ints
            self._check_id(i)
            if skip_special_tokens and i in self._special_ids:
                continue
            out += self._id_to_bytes[i]
        return out.decode("utf-8", errors="replace")

    # --- Hugging Face tokenizer.json ------------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        """The tokenizer.json layout `tokenizers` 0.23 writes for a byte-level BPE."""
        added = [
            {"id": self.vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s in self.special_tokens
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": sorted(added, key=lambda t: t["id"]),
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
                "merges": [list(m) for m in self.merges],
            },
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write tokenizer.json to path (or into path if it is a directory); returns the file written."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:  # temp file + rename: a killed save leaves no half file
            json.dump(self.to_hf_dict(), f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_hf_dict(cls, data: dict) -> "ByteLevelBPE":
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("not a tokenizer.json: expected an object with a 'model' object")
        model = data["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"unsupported model type {model.get('type')!r}: only byte-level BPE is supported so far")
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            raise ValueError(
                f"unsupported pre_tokenizer {pre.get('type')!r}: only byte-level BPE (ByteLevel) is supported so far"
            )
        if pre.get("add_prefix_space", False) or not pre.get("use_regex", True):
            raise ValueError("unsupported ByteLevel options: need add_prefix_space=false and use_regex=true")
        if data.get("normalizer") is not None:
            raise ValueError("unsupported normalizer: only byte-level BPE without normalization is supported so far")
        post = data.get("post_processor")
        if post is not None and post.get("type") != "ByteLevel":  # ByteLevel post-processing only trims offsets
            raise ValueError(f"unsupported post_processor {post.get('type')!r}")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) is not None:
                raise ValueError(f"unsupported BPE option {key}={model[key]!r}")
        for key in ("byte_fallback", "ignore_merges"):
            if model.get(key):
                raise ValueError(f"unsupported BPE option {key}=true")
        vocab, raw_merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(raw_merges, list):
            raise ValueError("malformed tokenizer.json: model.vocab must be an object and model.merges a list")
        merges = []
        for m in raw_merges:
            if isinstance(m, str) and m.count(" ") == 1:  # older format: "left right"
                m = m.split(" ")
            if not (isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m)):
                raise ValueError(f"malformed merge {m!r}: expected two strings")
            merges.append(tuple(m))
        vocab = dict(vocab)
        specials = []
        for t in data.get("added_tokens") or []:
            try:
                content, i = t["content"], t["id"]
            except (TypeError, KeyError):
                raise ValueError(f"malformed added token {t!r}") from None
            if vocab.setdefault(content, i) != i:
                raise ValueError(f"added token {content!r} has id {i} but the vocab says {vocab[content]}")
            specials.append(content)  # non-special added tokens are treated as special (split out) too
        return cls(vocab, merges, specials)


def load(path: str | os.PathLike) -> ByteLevelBPE:
    """Read a Hugging Face tokenizer.json (or a directory containing one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return ByteLevelBPE.from_hf_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
