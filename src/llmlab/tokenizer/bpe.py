"""BPE: the model (encoding one pre-token) and the trainer, byte-level and character-level.

BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units") starts from single
symbols and repeatedly merges the most frequent adjacent pair into a new symbol. GPT-2 (Radford et al. 2019)
runs it on UTF-8 bytes (spelled in a 256-character alphabet by the ByteLevel pre-tokenizer), so every string
round-trips with no unknown token. Llama/sentencepiece-style BPE runs on characters instead and falls back
to byte tokens "<0x00>".."<0xFF>" for characters outside its alphabet.

The model sees pre-tokens that are already in its alphabet: each character is one initial symbol.
"""

import heapq
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import accumulate

from ..progress import Bar
from .bytelevel import BYTE_TO_UNICODE
from .pretokenize import byte_symbols
from .vocab import VocabModel

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
CHAR_CACHE_LIMIT = 1 << 16  # characters kept by tokenize_raw; past it the cache starts again


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


class BPE(VocabModel):
    """A BPE model: vocab (token string -> id) and ranked merges, with the options of `tokenizers`' BPE:
    unk_token (None: unknown characters are dropped), fuse_unk (one unk for a run of unknowns), byte_fallback
    (unknown characters become their UTF-8 byte tokens), ignore_merges (a pre-token that is itself in the
    vocab is one token, as in Llama 3), continuing_subword_prefix and end_of_word_suffix."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, unk_token: str | None = None,
                 fuse_unk: bool = False, byte_fallback: bool = False, ignore_merges: bool = False,
                 continuing_subword_prefix: str | None = None, end_of_word_suffix: str | None = None):
        super().__init__(vocab)
        if unk_token is not None and unk_token not in self.vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocab")
        self.merges = [tuple(m) for m in merges]
        self.unk_token, self.fuse_unk, self.byte_fallback = unk_token, fuse_unk, byte_fallback
        self.ignore_merges = ignore_merges
        self.prefix, self.suffix = continuing_subword_prefix or "", end_of_word_suffix or ""
        self._unk_id = None if unk_token is None else self.vocab[unk_token]
        self._byte_ids = [self.vocab.get(t) for t in BYTE_TOKENS] if byte_fallback else []
        # (left id, right id) -> (rank, merged id); the lowest rank is applied first.
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        plen = len(self.prefix)
        for rank, (a, b) in enumerate(self.merges):
            merged = a + (b[plen:] if plen and b.startswith(self.prefix) else b)
            if a not in self.vocab or b not in self.vocab or merged not in self.vocab:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses a token missing from the vocab")
            # A later duplicate overwrites an earlier one, as in `tokenizers`.
            self._ranks[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[merged])
        # rank -> its pair and merged id (-1 for a rank a later duplicate overwrote): _merge checks a heap entry
        # with two list reads instead of a dict look-up
        self._rank_left, self._rank_right = [-1] * len(self.merges), [-1] * len(self.merges)
        for (a, b), (rank, _) in self._ranks.items():
            self._rank_left[rank], self._rank_right[rank] = a, b
        self._rank_new = [-1] * len(self.merges)
        for rank, merged_id in self._ranks.values():
            self._rank_new[rank] = merged_id
        self._tables = self._many = None  # bpe_many.RankTables and ManyMerger, built on first use
        self._free: dict[tuple[int, int], int] | None = None  # RankTables.free_pairs(), built on first use
        self._char_ids: dict[str, list[int]] = {}  # tokenize_raw: a character's symbols after its free merges
        self._by_character: bool | None = None  # whether tokenize_raw can start from _char_ids; decided on first use

    def _rank_tables(self):
        if self._tables is None:
            from .bpe_many import RankTables  # numpy: built once, on the first merge

            self._tables = RankTables(self._ranks, len(self.vocab))
        return self._tables

    def _free_pairs(self) -> dict[tuple[int, int], int]:
        if self._free is None:
            self._free = self._rank_tables().free_pairs()
        return self._free

    def _tokenize(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids = self._symbols(word)
        return self._merge(ids) if len(ids) > 1 else ids

    def tokenize_raw(self, piece: str) -> list[int]:
        """The ids of a raw pre-token of a byte-level pipeline (one that only cuts the text, then ByteLevel), which
        tokenize() takes spelled in GPT-2's byte alphabet. Most of the merges in CJK text are inside characters,
        and with a merge list in rank order many are free (RankTables.free_pairs): those are made once per
        character and kept, then the merge loop finishes the word. A free merge may be made at any time, so
        making the ones inside each character first gives the same ids."""
        if self._by_character is None:  # plain byte-level BPE: every byte a symbol, no option that looks at words
            self._by_character = bool(self._free_pairs()) and not (self.ignore_merges or self.prefix or self.suffix) \
                and all(c in self.vocab for c in BYTE_TO_UNICODE.values())
        if not self._by_character:
            return self._tokenize(byte_symbols(piece))
        cache = self._char_ids
        try:
            ids = [i for c in piece for i in cache[c]]
        except KeyError:
            if len(cache) > CHAR_CACHE_LIMIT:
                cache.clear()
            for c in piece:
                if c not in cache:
                    cache[c] = self._free_merges(self._symbols(byte_symbols(c)))
            ids = [i for c in piece for i in cache[c]]
        return self._merge(ids) if len(ids) > 1 else ids

    def _symbols(self, word: str) -> list[int]:
        if not (self.prefix or self.suffix):
            try:  # the common case, every character in the vocab (always so for byte-level BPE)
                return list(map(self.vocab.__getitem__, word))
            except KeyError:
                pass
        vocab, ids, last_unk = self.vocab, [], False
        n = len(word)
        for j, c in enumerate(word):
            s = c
            if self.prefix and j:
                s = self.prefix + s
            if self.suffix and j == n - 1:
                s = s + self.suffix
            i = vocab.get(s)
            if i is not None:
                ids.append(i)
                last_unk = False
                continue
            if self.byte_fallback:
                fallback = [self._byte_ids[b] for b in c.encode("utf-8")]
                if None not in fallback:
                    ids.extend(fallback)
                    last_unk = False
                    continue
            if self._unk_id is not None and not (self.fuse_unk and last_unk):
                ids.append(self._unk_id)
            last_unk = self._unk_id is not None
        return ids

    def _free_merges(self, ids: list[int]) -> list[int]:
        """ids after merging every free pair (RankTables.free_pairs), all at once since they never overlap, and
        again until none is left."""
        free = self._free_pairs().get
        while True:
            found = list(map(free, zip(ids, ids[1:])))
            if found.count(None) == len(found):
                return ids
            found.append(None)  # consumed[i]: symbol i was the right half of a merged pair
            ids = [t if f is None else f for t, f, consumed in zip(ids, found, [None] + found) if consumed is None]

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply merges lowest rank first, leftmost on ties (the order `tokenizers` uses, which matters only
        when two merges produce the same token). A heap of candidate pairs over a linked list of symbols keeps
        this O(n log n) in the piece length: Chinese text without spaces makes pre-tokens hundreds long.
        Short pieces (most words) are faster with a plain rescan for the best pair."""
        ids = self._free_merges(ids)
        ranks, n = self._ranks, len(ids)
        get = ranks.get
        if n <= 12:
            while True:
                found = list(map(get, zip(ids, ids[1:])))  # (rank, merged id) of each adjacent pair, or None
                best = min(filter(None, found), default=None)  # equal ranks are the same pair: leftmost is first
                if best is None:
                    return ids
                at = found.index(best)
                ids[at:at + 2] = [best[1]]
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        nxt[-1] = -1
        heap = [(r[0], i) for i, r in enumerate(map(get, zip(ids, ids[1:]))) if r is not None]
        heapq.heapify(heap)
        heappop, heappush = heapq.heappop, heapq.heappush
        left, right, new = self._rank_left, self._rank_right, self._rank_new
        while heap:
            rank, i = heappop(heap)
            if not alive[i]:
                continue
            j = nxt[i]
            if j == -1 or ids[i] != left[rank] or ids[j] != right[rank]:
                continue  # stale: a neighbour was merged since this entry was pushed
            ids[i], alive[j], nxt[i] = new[rank], False, nxt[j]
            if nxt[i] != -1:
                prev[nxt[i]] = i
            for a in (prev[i], i):  # the two pairs the merged symbol now takes part in
                if a != -1 and nxt[a] != -1 and (r := get((ids[a], ids[nxt[a]]))) is not None:
                    heappush(heap, (r[0], a))
        return [t for t, keep in zip(ids, alive) if keep]

    def tokenize_many(self, words: Sequence[str]) -> list[list[int]]:
        """The ids of many pre-tokens, each as tokenize() gives them (uncached)."""
        return self.tokenize_joined("".join(words), [len(w) for w in words])

    def tokenize_joined(self, symbols: str, lengths: Sequence[int]) -> list[list[int]]:
        """tokenize_many for the words that symbols holds back to back (lengths in characters). With plain
        symbols and a merge list in rank order, all the words merge together in numpy (bpe_many); otherwise
        (or when a character is not a token: unknown, byte fallback) one by one."""
        if not (self.ignore_merges or self.prefix or self.suffix):
            if self._many is None:
                from .bpe_many import ManyMerger

                self._many = ManyMerger(self._rank_tables(), self.vocab)
            if self._many.rank_ordered:
                got = self._many.tokenize(symbols, lengths, self._merge)
                if got is not None:
                    return got
        ends = list(accumulate(lengths))
        return [self._tokenize(symbols[a:b]) for a, b in zip([0] + ends[:-1], ends)]

    def to_hf_model(self) -> dict:
        return {
            "type": "BPE",
            "dropout": None,
            "unk_token": self.unk_token,
            "continuing_subword_prefix": self.prefix or None,
            "end_of_word_suffix": self.suffix or None,
            "fuse_unk": self.fuse_unk,
            "byte_fallback": self.byte_fallback,
            "ignore_merges": self.ignore_merges,
            "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def from_hf_model(cls, model: dict) -> "BPE":
        if model.get("dropout") not in (None, 0, 0.0):
            raise ValueError(f"unsupported BPE option dropout={model['dropout']!r}: BPE-dropout is not implemented")
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
        return cls(vocab, merges, unk_token=model.get("unk_token"), fuse_unk=bool(model.get("fuse_unk", False)),
                   byte_fallback=bool(model.get("byte_fallback", False)),
                   ignore_merges=bool(model.get("ignore_merges", False)),
                   continuing_subword_prefix=model.get("continuing_subword_prefix"),
                   end_of_word_suffix=model.get("end_of_word_suffix"))


def train_bpe(
    word_counts: dict[str, int],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
    initial_alphabet: Iterable[str] = (),
    limit_alphabet: int | None = None,
    byte_fallback: bool = False,
    unk_token: str | None = None,
    progress: bool = False,
) -> BPE:
    """Learn merges on pre-tokens (each character one initial symbol) until the vocab reaches vocab_size.

    Id layout: special tokens, then the 256 byte tokens if byte_fallback, then the alphabet (initial_alphabet
    in its order, then the corpus characters sorted), then merges in the order learned. limit_alphabet caps the
    alphabet: the initial alphabet, always kept whole, then the most frequent other corpus characters (ties:
    smaller code point). Merges never cross a dropped character (it cuts its word, where `tokenizers` joins the
    characters around it); byte_fallback (or unk_token) covers it at encoding time.

    Tie-breaking: the pair with the highest count wins; among equal counts, the smallest (left id, right id).
    Stops early when the best pair occurs fewer than min_frequency times or no pairs are left.
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    if not word_counts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if unk_token is not None and unk_token not in special_tokens:
        raise ValueError(f"unk_token {unk_token!r} must be one of special_tokens {special_tokens!r}")
    tokens: list[str] = list(special_tokens) + (BYTE_TOKENS if byte_fallback else [])
    token_ids = {t: i for i, t in enumerate(tokens) if i >= len(special_tokens)}  # merges never yield a special
    alphabet = list(dict.fromkeys(initial_alphabet))
    char_counts: dict[str, int] = defaultdict(int)
    for w, f in word_counts.items():
        for c in w:
            char_counts[c] += f
    # the initial alphabet counts toward limit_alphabet once; the corpus fills the rest with characters it lacks
    corpus_chars = sorted(set(char_counts) - set(alphabet), key=lambda c: (-char_counts[c], c))
    if limit_alphabet is not None:
        corpus_chars = corpus_chars[: max(0, limit_alphabet - len(alphabet))]
    alphabet += sorted(corpus_chars)
    for c in alphabet:
        if c not in token_ids:
            token_ids[c] = len(tokens)
            tokens.append(c)
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small: need {len(special_tokens)} special tokens"
                         f"{' + 256 byte tokens' if byte_fallback else ''} + {len(alphabet)} alphabet symbols "
                         f"= {len(tokens)}")

    # Words as id lists; a character outside the alphabet ends one segment and starts the next.
    words: list[list[int]] = []
    freqs: list[int] = []
    for w, f in word_counts.items():
        seg: list[int] = []
        for c in w:
            i = token_ids.get(c)
            if i is None:
                if len(seg) > 1:
                    words.append(seg)
                    freqs.append(f)
                seg = []
            else:
                seg.append(i)
        if len(seg) > 1:
            words.append(seg)
            freqs.append(f)

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
    bar = Bar(vocab_size - len(tokens), "BPE merges", progress)
    while len(tokens) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:
            continue  # stale entry: the live count was pushed again when it changed
        if count < min_frequency:
            break  # the heap top is the max live count, so nothing else qualifies either
        left, right = pair
        new_token = tokens[left] + tokens[right]
        new = token_ids.get(new_token)
        if new is None:  # identical strings share one id (as in `tokenizers`)
            new = token_ids[new_token] = len(tokens)
            tokens.append(new_token)
        if pair not in merged:  # a pair can recur only via a reused id; record each merge once
            merges.append(pair)
            merged.add(pair)
        bar.update()

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

    bar.close()
    return BPE({t: i for i, t in enumerate(tokens)}, [(tokens[a], tokens[b]) for a, b in merges],
               unk_token=unk_token, fuse_unk=unk_token is not None, byte_fallback=byte_fallback)
