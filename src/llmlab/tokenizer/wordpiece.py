"""WordPiece (BERT): training, encoding, decoding and Hugging Face tokenizer.json / vocab.txt I/O.

WordPiece (Schuster & Nakajima 2012; Wu et al. 2016; used by BERT, Devlin et al. 2019) starts from single
characters -- "c" at the start of a word, "##c" inside it -- and repeatedly merges the adjacent pair (a, b)
with the highest likelihood score freq(ab) / (freq(a) * freq(b)), which favours pairs whose parts rarely occur
apart. Encoding does not replay merges: each word is split greedily, longest vocab match first, with "##"
marking pieces that continue a word; a word with no full split (or over max_input_chars_per_word chars)
becomes a single [UNK].

Id layout of a trained model: special tokens first (0..k-1), then the initial alphabet in sorted order,
then merged tokens in the order they were learned.
"""

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Sequence

from ..progress import Bar
from .vocab import VocabModel
from .bpe import merge_pair

DEFAULT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPiece(VocabModel):
    """The WordPiece model: vocab (token -> id), greedy longest-match-first encoding of one pre-token."""

    def __init__(self, vocab: dict[str, int], *, unk_token: str = "[UNK]", continuing_subword_prefix: str = "##",
                 max_input_chars_per_word: int = 100):
        if not vocab:
            raise ValueError("vocab is empty")
        super().__init__(vocab)
        if not continuing_subword_prefix or not isinstance(continuing_subword_prefix, str):
            raise ValueError("continuing_subword_prefix must be a non-empty string")
        if isinstance(max_input_chars_per_word, bool) or not isinstance(max_input_chars_per_word, int) \
                or max_input_chars_per_word < 1:
            raise ValueError(f"max_input_chars_per_word must be a positive int, got {max_input_chars_per_word!r}")
        if unk_token not in self.vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocab")
        self.unk_token, self.unk_id = unk_token, self.vocab[unk_token]
        self.prefix = continuing_subword_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        # the longest possible match, in characters of the word, at its start and after it: no longer one is tried
        self._longest_first = max(map(len, self.vocab))
        self._longest_next = max((len(t) - len(self.prefix) for t in self.vocab if t.startswith(self.prefix)),
                                 default=0)

    def _tokenize(self, word: str) -> list[int]:
        """Greedy longest-match-first split of one pre-token, exactly as `tokenizers`' WordPiece model."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_id]
        ids, start, n, vocab = [], 0, len(word), self.vocab
        while start < n:
            end, found = min(n, start + (self._longest_next if start else self._longest_first)), None
            while start < end:
                sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = vocab.get(sub)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]  # one unmatched position makes the whole word unknown
            ids.append(found)
            start = end
        return ids

    def to_hf_model(self) -> dict:
        return {
            "type": "WordPiece",
            "unk_token": self.unk_token,
            "continuing_subword_prefix": self.prefix,
            "max_input_chars_per_word": self.max_input_chars_per_word,
            "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
        }

    @classmethod
    def from_hf_model(cls, model: dict) -> "WordPiece":
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in vocab.values()):
            raise ValueError("malformed tokenizer.json: model.vocab must be an object of token -> int id")
        return cls(vocab, unk_token=model.get("unk_token", "[UNK]"),
                   continuing_subword_prefix=model.get("continuing_subword_prefix", "##"),
                   max_input_chars_per_word=model.get("max_input_chars_per_word", 100))


def read_vocab_txt(path: str | os.PathLike) -> dict[str, int]:
    """A BERT vocab.txt: the token on line i has id i."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    if tokens and tokens[-1] == "":
        tokens.pop()
    if not tokens:
        raise ValueError(f"{path}: vocab.txt is empty")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"{path}: token {t!r} appears twice (lines {vocab[t] + 1} and {i + 1})")
        vocab[t] = i
    return vocab


def write_vocab_txt(vocab: dict[str, int], path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.txt")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in sorted(vocab, key=vocab.get))
    os.replace(tmp, path)
    return path


# --- training ---------------------------------------------------------------------------------------------


def train_wordpiece(
    word_counts: dict[str, int],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    unk_token: str = "[UNK]",
    continuing_subword_prefix: str = "##",
    max_input_chars_per_word: int = 100,
    progress: bool = False,
) -> WordPiece:
    """Learn a WordPiece vocab of at most vocab_size tokens (specials + alphabet + merges) from pre-token
    counts.

    Each step merges the pair with the highest score count(ab) / (freq(a) * freq(b)), counts weighted by
    word frequency. Ties: the higher pair count wins, then the smaller (left, right) token strings. Pairs
    seen fewer than min_frequency times never merge; training stops when no pair qualifies. Scores are
    Python floats from int / int true division, which is correctly rounded, so equal ratios compare equal.

    Incremental updates: pair counts change only in the words holding the merged pair, and those are the
    only words rewritten. A merge also changes freq(a), freq(b) and freq(ab), which changes the score of every
    pair containing one of them anywhere in the corpus; exactly those pairs (found via a symbol -> pairs
    index), plus pairs whose counts changed, get a fresh heap entry. Older heap entries are recognised as
    stale on pop by recomputing the score (lazy deletion).
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not isinstance(s, str) or not s
                                                              for s in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    if unk_token not in special_tokens:
        raise ValueError(f"unk_token {unk_token!r} must be one of special_tokens {special_tokens!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if not continuing_subword_prefix:
        raise ValueError("continuing_subword_prefix must be a non-empty string")
    prefix = continuing_subword_prefix
    if not word_counts:
        raise ValueError("cannot train a tokenizer on an empty corpus")

    alphabet = sorted({w[0] for w in word_counts} | {prefix + c for w in word_counts for c in w[1:]})
    k = len(special_tokens)
    needed = k + len([a for a in alphabet if a not in special_tokens])
    if vocab_size < needed:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the corpus needs {k} special tokens + "
            f"{needed - k} initial characters = {needed}"
        )

    tokens: list[str] = list(special_tokens)
    token_ids = {t: i for i, t in enumerate(tokens)}
    for a in alphabet:
        if a not in token_ids:
            token_ids[a] = len(tokens)
            tokens.append(a)
    words = [[token_ids[w[0]]] + [token_ids[prefix + c] for c in w[1:]] for w in word_counts]
    freqs = list(word_counts.values())

    sym_freq: dict[int, int] = defaultdict(int)
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words containing it
    pairs_of: dict[int, set[tuple[int, int]]] = defaultdict(set)  # symbol -> live pairs containing it
    for i, w in enumerate(words):
        for s in w:
            sym_freq[s] += freqs[i]
        for p in zip(w, w[1:]):
            pair_counts[p] += freqs[i]
            where[p].add(i)
    for p in pair_counts:
        pairs_of[p[0]].add(p)
        pairs_of[p[1]].add(p)

    def score(p: tuple[int, int]) -> float:
        return pair_counts[p] / (sym_freq[p[0]] * sym_freq[p[1]])

    heap: list = []

    def push(p: tuple[int, int]) -> None:
        c = pair_counts.get(p, 0)
        if c >= max(min_frequency, 1):
            heapq.heappush(heap, (-score(p), -c, tokens[p[0]], tokens[p[1]], p))

    for p in pair_counts:
        push(p)

    bar = Bar(vocab_size - len(tokens), "WordPiece merges", progress)
    while len(tokens) < vocab_size and heap:
        neg_score, neg_count, _, _, pair = heapq.heappop(heap)
        c = pair_counts.get(pair, 0)
        if c != -neg_count or c == 0 or score(pair) != -neg_score:
            continue  # stale: a fresh entry was pushed when the count or a symbol frequency changed
        a, b = pair
        rhs = tokens[b]
        new_str = tokens[a] + (rhs[len(prefix):] if rhs.startswith(prefix) else rhs)
        new = token_ids.get(new_str)
        if new is None:  # the same string can come from different pairs; it keeps one id
            new = token_ids[new_str] = len(tokens)
            tokens.append(new_str)
            bar.update()

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            old_w = words[i]
            new_w = merge_pair(old_w, a, b, new)
            m = (len(old_w) - len(new_w)) * freqs[i]
            sym_freq[a] -= m
            sym_freq[b] -= m
            sym_freq[new] += m
            old_pairs, new_pairs = Counter(zip(old_w, old_w[1:])), Counter(zip(new_w, new_w[1:]))
            for p, n in old_pairs.items():
                delta[p] -= n * freqs[i]
            for p, n in new_pairs.items():
                delta[p] += n * freqs[i]
                where[p].add(i)
            for p in old_pairs.keys() - new_pairs.keys():
                if p != pair:
                    where[p].discard(i)
            words[i] = new_w

        changed = set()
        for p, d in delta.items():
            if d == 0:
                continue
            cnt = pair_counts.get(p, 0) + d
            if cnt > 0:
                pair_counts[p] = cnt
                pairs_of[p[0]].add(p)
                pairs_of[p[1]].add(p)
                changed.add(p)
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
                pairs_of[p[0]].discard(p)
                pairs_of[p[1]].discard(p)
        for s in (a, b, new):
            changed |= pairs_of[s]
        for p in changed:
            push(p)

    bar.close()
    return WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=unk_token, continuing_subword_prefix=prefix,
                     max_input_chars_per_word=max_input_chars_per_word)
