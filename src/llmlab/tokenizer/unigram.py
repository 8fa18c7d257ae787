"""Unigram language-model tokenizer (Kudo 2018, "Subword Regularization"): the sentencepiece algorithm.

A Unigram model is a vocabulary of pieces x with log-probabilities log p(x). A word w is segmented into the
pieces x_1..x_k (concatenating to w) that maximise  sum_i log p(x_i)  (Viterbi over the lattice of all
vocab pieces found in w). Subword regularization samples a segmentation x with P(x|w) ∝ p(x)^alpha instead.

Training (paper §3.2) starts from a large seed vocabulary and repeats:
  1. EM: the E-step computes each piece's expected count over all segmentations of every word (forward-
     backward on the lattice); the M-step re-estimates log p(x) from those counts;
  2. pruning: each piece's "loss" is how much the corpus likelihood drops if it is removed and its Viterbi
     occurrences are re-segmented by the best segmentation of the piece without it; the pieces with the
     smallest loss are dropped, keeping `shrinking_factor` of the vocabulary,
until the vocabulary is close to the target size; then the best-scoring pieces are kept. Single characters
are never pruned, so every word always has a segmentation. Two deliberate differences from sentencepiece:
characters stay in the model throughout (sentencepiece may drop one in the M-step and re-add it at the end with
a made-up score), and the seed keeps whole words that never prefix another word (see _SPM_SEED_RULE).

Speed: training is pure Python + numpy. All distinct words' lattices are built once, as one global edge list
(edge = piece occurrence: start node -> end node), from the seed substring enumeration. Pruning only removes
pieces, so later lattices are the first one with edges filtered out. Forward, backward and Viterbi run for all
words at once, one numpy step per position in the word (so the Python loop is as long as the longest word).

Unknown characters are handled exactly as Hugging Face `tokenizers` does: a character with no single-character
piece gets an "unknown" node scored min(score) - 10; consecutive unknown tokens are fused into one; with
byte_fallback an unknown token becomes the byte tokens "<0xXX>" of its UTF-8 encoding.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Sequence

import numpy as np

from ..progress import Bar
from .bpe import BYTE_TOKENS
from .vocab import CACHE_LIMIT

SPACE = "\u2581"  # the Metaspace marker "▁" that starts every pre-token
UNK_PENALTY = 10.0  # tokenizers/sentencepiece: an unknown character scores min(score) - 10
EXPECTED_COUNT_THRESHOLD = 0.5  # the M-step drops pieces expected fewer times than this (as sentencepiece)
# Seed rule: sentencepiece's suffix tree over whole sentences sees "▁the▁" after "▁the", so a word that is never
# the prefix of another word (say "▁United", always before "▁States") is no internal node and no seed. We count a
# word end as a branch, which keeps such words (held-out English: 1.6% fewer tokens per word at 8k). Setting this
# to True reproduces sentencepiece's rule (then ~98% of the vocab is the same as sentencepiece's).
_SPM_SEED_RULE = False


class Unigram:
    """A Unigram model: pieces[i] = (piece, log-probability score) and token id i."""

    def __init__(self, pieces: Sequence[tuple[str, float]], unk_id: int | None = None, byte_fallback: bool = False):
        pieces = list(pieces)
        if not pieces:
            raise ValueError("Unigram needs at least one piece; got an empty pieces list")
        self.pieces: list[tuple[str, float]] = []
        self.vocab: dict[str, int] = {}
        for i, entry in enumerate(pieces):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"pieces[{i}] must be a (piece, score) pair, got {entry!r}")
            tok, score = entry
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"pieces[{i}]: the piece must be a non-empty string, got {tok!r}")
            if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
                raise ValueError(f"pieces[{i}] ({tok!r}): the score must be a finite number, got {score!r}")
            if tok in self.vocab:
                raise ValueError(f"piece {tok!r} appears twice (ids {self.vocab[tok]} and {i}); make pieces distinct")
            self.vocab[tok] = i
            self.pieces.append((tok, float(score)))
        if unk_id is not None and (isinstance(unk_id, bool) or not isinstance(unk_id, int)
                                   or not 0 <= unk_id < len(pieces)):
            raise ValueError(f"unk_id must be None or an id in 0..{len(pieces) - 1}, got {unk_id!r}")
        if byte_fallback:
            missing = [b for b in BYTE_TOKENS if b not in self.vocab]
            if missing:
                raise ValueError(f"byte_fallback needs all 256 byte tokens <0x00>..<0xFF> in the vocab; "
                                 f"{len(missing)} are missing (first: {missing[0]})")
        self.unk_id = unk_id
        self.byte_fallback = bool(byte_fallback)
        self._scores = [s for _, s in self.pieces]
        self._max_len = max(len(t) for t, _ in self.pieces)
        self.unk_score = min(self._scores) - UNK_PENALTY
        self._byte_ids = [self.vocab[b] for b in BYTE_TOKENS] if byte_fallback else []
        self._cache: dict[str, list[int]] = {}
        self._prefixes: dict[str, int] | None = None  # _viterbi's table, made on first use

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        return self.pieces[i][0]

    # --- the lattice of one word --------------------------------------------------------------------------
    def _lattice(self, word: str, skip_missing_unk: bool = False) -> list[list[tuple[int, int | None, float]]]:
        """ends[e] = [(start, id, score)] for every piece word[start:e], in increasing start order.

        A character with no single-character piece gets an unknown node (id unk_id, score unk_score), as
        `tokenizers` does, so every word has at least one segmentation. Without an unk_id that node has id None
        (tokenize fails only if it would be on the best path, as in tokenizers) or, with skip_missing_unk, is
        left out."""
        n, vocab, scores = len(word), self.vocab, self._scores
        ends: list[list[tuple[int, int | None, float]]] = [[] for _ in range(n + 1)]
        for s in range(n):
            single = False
            for e in range(s + 1, min(n, s + self._max_len) + 1):
                i = vocab.get(word[s:e])
                if i is not None:
                    ends[e].append((s, i, scores[i]))
                    single = single or e == s + 1
            if not single and not (skip_missing_unk and self.unk_id is None):
                ends[s + 1].append((s, self.unk_id, self.unk_score))
        return ends

    def _missing_unk(self, word: str) -> ValueError:
        unknown = sorted({c for c in word if c not in self.vocab})
        return ValueError(f"{word!r} needs characters that are not in the vocab ({''.join(unknown)!r}) and the model "
                          "has no unk_id; give the model an unk token (byte_fallback also needs one)")

    def _ids(self, word: str, path: list[tuple[int, int, int]]) -> list[int]:
        """Token ids of a path [(start, end, id)]: consecutive unknown nodes are fused, and a fused token is looked
        up again, then spelled as byte tokens (byte_fallback) or mapped to unk_id -- as `tokenizers` does."""
        out: list[int] = []
        k = 0
        while k < len(path):
            s, e, i = path[k]
            if i != self.unk_id:
                out.append(i)
                k += 1
                continue
            while k + 1 < len(path) and path[k + 1][2] == self.unk_id:
                k += 1
                e = path[k][1]
            k += 1
            piece = word[s:e]
            if piece in self.vocab:
                out.append(self.vocab[piece])
            elif self.byte_fallback:
                out.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
            else:
                out.append(self.unk_id)
        return out

    def tokenize(self, word: str) -> list[int]:
        """Viterbi best segmentation of one pre-token (normalized, with its "▁" markers) as token ids."""
        cached = self._cache.get(word)
        if cached is None:
            back = self._viterbi(word)
            path, e = [], len(word)
            while e > 0:
                s, i = back[e]
                path.append((s, e, i))
                e = s
            cached = self._ids(word, path[::-1])
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = cached
        return list(cached)

    def _viterbi(self, word: str) -> list[tuple[int, int]]:
        """back[e] = (start, id) of the last piece of the best segmentation of word[:e]. The lattice of _lattice,
        relaxed start by start: the edges into each end then arrive in increasing start order, as tokenize's
        "earliest start wins a tie" needs. Substrings are extended only while they are a prefix of some piece,
        so a position costs a few dict look-ups instead of max_len."""
        prefixes = self._prefixes
        if prefixes is None:
            prefixes = {}
            for tok, i in self.vocab.items():
                for k in range(1, len(tok)):
                    prefixes.setdefault(tok[:k], -1)  # -1: a prefix of a piece, not itself a piece
            for tok, i in self.vocab.items():
                prefixes[tok] = i
            self._prefixes = prefixes
        get, scores, unk_id, unk_score = prefixes.get, self._scores, self.unk_id, self.unk_score
        n = len(word)
        best = [0.0] + [-math.inf] * n
        back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
        for s in range(n):
            base, e = best[s], s + 1
            i = get(word[s])
            if i is None or i < 0:  # no single-character piece: the unknown node
                if base + unk_score > best[e]:
                    if unk_id is None:
                        raise self._missing_unk(word)
                    best[e], back[e] = base + unk_score, (s, unk_id)
                if i is None:
                    continue
            while True:
                if i >= 0 and base + scores[i] > best[e]:  # strict ">": on a tie the earliest start wins
                    best[e], back[e] = base + scores[i], (s, i)
                if e == n:
                    break
                e += 1
                i = get(word[s:e])
                if i is None:
                    break
        return back

    def nbest(self, word: str, n: int) -> list[tuple[list[int], float]]:
        """The n best segmentations (ids, total score), best first: a Viterbi that keeps n paths per node."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"nbest needs n >= 1, got {n!r}")
        ends = self._lattice(word, skip_missing_unk=True)
        top: list[list[tuple[float, tuple]]] = [[(0.0, ())]] + [[] for _ in word]
        for e in range(1, len(word) + 1):
            cands = [(sc + score, path + ((s, e, i),)) for s, i, score in ends[e] for sc, path in top[s]]
            cands.sort(key=lambda c: -c[0])  # stable: equal scores keep lattice order
            top[e] = cands[:n]
        if not top[len(word)]:
            raise self._missing_unk(word)
        return [(self._ids(word, list(path)), score) for score, path in top[len(word)]]

    def sample(self, word: str, alpha: float, nbest_size: int = -1, rng: random.Random | None = None) -> list[int]:
        """Subword regularization: sample a segmentation x with P(x) ∝ exp(alpha * score(x)).

        nbest_size < 0 samples among all segmentations (forward-filtering / backward-sampling, paper §2.2);
        nbest_size > 1 samples among the nbest_size best; 0 or 1 returns the Viterbi segmentation."""
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        rng = rng if rng is not None else random.Random()
        if nbest_size in (0, 1) or not word:
            return self.tokenize(word)
        if nbest_size > 1:
            best = self.nbest(word, nbest_size)
            top = max(s for _, s in best)
            return rng.choices([ids for ids, _ in best], [math.exp(alpha * (s - top)) for _, s in best])[0]
        ends = self._lattice(word, skip_missing_unk=True)
        # forward filtering: fwd[e] = log sum over segmentations of word[:e] of exp(alpha * score)
        fwd = [0.0] + [-math.inf] * len(word)
        for e in range(1, len(word) + 1):
            vals = [fwd[s] + alpha * score for s, _, score in ends[e]]
            m = max(vals, default=-math.inf)
            if m > -math.inf:
                fwd[e] = m + math.log(sum(math.exp(v - m) for v in vals))
        if fwd[-1] == -math.inf:
            raise self._missing_unk(word)
        # backward sampling: the last piece ending at e is word[s:e] with probability exp(fwd[s] + alpha*score - fwd[e])
        path, e = [], len(word)
        while e > 0:
            s, i, _ = rng.choices(ends[e], [math.exp(fwd[s] + alpha * sc - fwd[e]) for s, _, sc in ends[e]])[0]
            path.append((s, e, i))
            e = s
        return self._ids(word, path[::-1])

    # --- Hugging Face tokenizer.json "model" ------------------------------------------------------------
    def to_hf_model(self) -> dict:
        return {"type": "Unigram", "unk_id": self.unk_id, "vocab": [[t, s] for t, s in self.pieces],
                "byte_fallback": self.byte_fallback}

    @classmethod
    def from_hf_model(cls, data: dict) -> Unigram:
        if not isinstance(data, dict):
            raise ValueError(f"a Unigram model must be a dict (tokenizer.json's 'model'), got {type(data).__name__}")
        if data.get("type", "Unigram") != "Unigram":
            raise ValueError(f"model 'type' is {data['type']!r}, expected 'Unigram'")
        if "vocab" not in data:
            raise ValueError("Unigram model has no 'vocab' key (a list of [piece, score] pairs)")
        vocab = data["vocab"]
        if not isinstance(vocab, list):
            raise ValueError(f"Unigram model 'vocab' must be a list of [piece, score]s, not {type(vocab).__name__}")
        for i, entry in enumerate(vocab):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise ValueError(f"Unigram model 'vocab'[{i}] must be a [piece, score] pair, got {entry!r}")
        unk_id = data.get("unk_id")
        if unk_id is not None and (isinstance(unk_id, bool) or not isinstance(unk_id, int)):
            raise ValueError(f"Unigram model 'unk_id' must be an int or null, got {unk_id!r}")
        byte_fallback = data.get("byte_fallback", False)
        if not isinstance(byte_fallback, bool):
            raise ValueError(f"Unigram model 'byte_fallback' must be true or false, got {byte_fallback!r}")
        try:
            return cls([tuple(e) for e in vocab], unk_id=unk_id, byte_fallback=byte_fallback)
        except ValueError as err:
            msg = str(err).replace("pieces[", "'vocab'[")
            key = "unk_id" if msg.startswith("unk_id") else "byte_fallback" if msg.startswith("byte") else "vocab"
            raise ValueError(f"Unigram model {key!r} is invalid: {msg}") from None


# --- training ---------------------------------------------------------------------------------------------

def _digamma(x: np.ndarray) -> np.ndarray:
    """ψ(x) for x > 0: shift up with ψ(x) = ψ(x+1) - 1/x, then the asymptotic series
    ψ(x) ≈ ln x - 1/(2x) - 1/(12x²) + 1/(120x⁴) - 1/(252x⁶)."""
    x = np.array(x, dtype=np.float64)
    out = np.zeros_like(x)
    small = x < 6.0
    while small.any():
        out[small] -= 1.0 / x[small]
        x[small] += 1.0
        small = x < 6.0
    inv2 = 1.0 / (x * x)
    return out + np.log(x) - 0.5 / x - inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 / 252))


class _Sweep:
    """Edges ordered for one dynamic-programming sweep over many lattices at once: value[to] = reduce over the
    edges into `to` of value[frm] + log p(piece), one level (position in the lattice) at a time -- an edge's
    `frm` node is always on a lower level than its `to` node. Edges are sorted by (level, to): each level is a
    slice, cut into groups (one per target node) for ufunc.reduceat. Sweeps are stored sorted, not as a
    permutation, because random gathers over millions of edges cost more than the arithmetic."""

    def __init__(self, frm, piece, targets, target_lat, counts, bounds, gb):
        self.frm, self.piece = frm, piece
        self.targets, self.target_lat, self.counts = targets, target_lat, counts  # per group: node, lattice, edges
        self.group = np.cumsum(counts) - counts  # first edge of each group
        self.bounds, self.gb = bounds, gb  # first edge / first group of each level (and the ends)
        self._plan = None  # run()'s per-level slices, made on first use
        self.last_scores = (None, None)

    @classmethod
    def sort(cls, frm, to, level, piece, lat, to_sorted=False):
        """Sort by (level, to): a stable sort by `to` (skipped when already sorted), then a stable sort by level --
        a radix sort, as levels are small ints."""
        o = np.arange(len(to)) if to_sorted else np.argsort(to, kind="stable")
        small = np.int16 if len(level) == 0 or level.max() < 2**15 else np.int32
        o = o[np.argsort(level[o].astype(small), kind="stable")]
        to, level = to[o], level[o]
        n = len(o)
        group = np.flatnonzero(np.r_[True, to[1:] != to[:-1]])
        bounds = np.r_[0, np.flatnonzero(level[1:] != level[:-1]) + 1, n]
        return cls(frm[o], piece[o], to[group], lat[o[group]], np.diff(np.r_[group, n]), bounds,
                   np.searchsorted(group, bounds))

    def keep(self, alive: np.ndarray) -> _Sweep:
        """Drop the edges of dead pieces. Every node keeps its single-character edge (characters never die), so
        no group empties: only the edge counts and level bounds change."""
        m = alive[self.piece]
        before = np.r_[0, np.cumsum(m)]  # kept edges before each position
        return _Sweep(self.frm[m], self.piece[m], self.targets, self.target_lat,
                      np.diff(before[np.r_[self.group, len(m)]]), before[self.bounds], self.gb)

    def _prepare(self, n_nodes: int, init: np.ndarray):
        """The per-level plan of run(), computed once per sweep (a sweep runs several times: forward in both
        E-steps and in pruning's Viterbi). Values live in a "sweep-ordered" array: the init nodes, then each
        group's target node in edge order, then one -inf slot for nodes no edge reaches. A level's targets are
        then one contiguous slice (written in place, no scatter) and its sources a few nearby slices."""
        k, g = len(init), len(self.targets)
        pos = np.full(n_nodes, k + g, dtype=np.int32)
        pos[init] = np.arange(k, dtype=np.int32)
        pos[self.targets] = np.arange(k, k + g, dtype=np.int32)
        src = pos[self.frm]
        b, gb = self.bounds.tolist(), self.gb.tolist()
        levels = []
        for j in range(len(b) - 1):
            lo, hi, g0, g1 = b[j], b[j + 1], gb[j], gb[j + 1]
            single = g1 - g0 == hi - lo  # one edge per target node: nothing to reduce
            levels.append((lo, hi, k + g0, k + g1, src[lo:hi], None if single else self.group[g0:g1] - lo,
                           None if single else self.counts[g0:g1]))
        self._plan = (n_nodes, init, k, g, levels)

    def run(self, log_p: np.ndarray, n_nodes: int, init: np.ndarray, viterbi: bool = False):
        """val[n] = log Σ_paths init→n exp(Σ log p) (max instead of log-sum-exp when viterbi, then also the best
        edge into each node)."""
        if self._plan is None or self._plan[0] != n_nodes or self._plan[1] is not init:
            self._prepare(n_nodes, init)
        _, _, k, g, levels = self._plan
        w = np.empty(k + g + 1)  # sweep-ordered values (see _prepare)
        w[:k], w[k + g] = 0.0, -np.inf
        best_w = np.empty(g, dtype=np.int64) if viterbi else None
        sc = log_p[self.piece]
        self.last_scores = (log_p, sc)  # log p of each edge's piece, for _e_step to reuse
        take, logaddexp = w.take, np.logaddexp
        for lo, hi, a, b, src, starts, cnt in levels:
            v = take(src)
            v += sc[lo:hi]
            if starts is None:
                w[a:b] = v
                if viterbi:
                    best_w[a - k:b - k] = np.arange(lo, hi)
            elif viterbi:  # the first edge reaching the maximum
                m = np.maximum.reduceat(v, starts)
                w[a:b] = m
                hit = np.where(v == np.repeat(m, cnt), np.arange(lo, hi), hi)
                best_w[a - k:b - k] = np.minimum.reduceat(hit, starts)
            else:  # log(exp(a) + exp(b)) folded over each group: stable, and as fast as shifting by the max
                logaddexp.reduceat(v, starts, out=w[a:b])
        val = np.full(n_nodes, -np.inf)
        val[init] = 0.0
        val[self.targets] = w[k:k + g]
        if not viterbi:
            return val, None
        best = np.full(n_nodes, -1, dtype=np.int64)
        best[self.targets] = best_w
        return val, best


class _Lattices:
    """The lattices of many strings as one edge list. Lattice b owns the consecutive nodes first[b]..last[b]; an
    edge src -> dst is an occurrence of a piece. The edges are kept three times: sorted for the forward sweep,
    for the backward sweep (words only), and by src (words only, to cut out the lattice of a span)."""

    def __init__(self, first, last, fwd: _Sweep, bwd: _Sweep | None, by_src: tuple | None):
        self.first, self.last, self.fwd, self.bwd, self.by_src = first, last, fwd, bwd, by_src
        self.n_nodes = int(last[-1]) + 1

    @classmethod
    def build(cls, src, dst, piece, lat, first, last, full: bool = True) -> _Lattices:
        """full: also the backward sweep and the by-src copy (src must then be sorted)."""
        fwd = _Sweep.sort(src, dst, dst - first[lat], piece, lat)
        bwd = _Sweep.sort(dst, src, last[lat] - src, piece, lat, to_sorted=True) if full else None
        return cls(first, last, fwd, bwd, (src, dst, piece) if full else None)

    @property
    def n_edges(self) -> int:
        return len(self.fwd.piece)

    def keep(self, alive: np.ndarray, min_drop: float = 0.0) -> _Lattices:
        """Only the edges of pieces with alive[piece]; filtering keeps every order, so nothing is sorted again.
        Below min_drop (a fraction of the edges) the lattices are kept whole: dead pieces have log p = -inf, so
        their edges count for nothing, and filtering would cost more than it saves."""
        if min_drop and alive[self.fwd.piece].mean() > 1.0 - min_drop:
            return self
        return _Lattices(self.first, self.last, self.fwd.keep(alive), self.bwd and self.bwd.keep(alive), self.by_src)

    def forward(self, log_p, viterbi=False):
        return self.fwd.run(log_p, self.n_nodes, self.first, viterbi)

    def backward(self, log_p):
        return self.bwd.run(log_p, self.n_nodes, self.last)[0]

    def backtrack(self, best: np.ndarray):
        """(lattice, piece) of every edge on each lattice's best path (from forward(viterbi=True))."""
        cur, ids = self.last.copy(), np.arange(len(self.last))
        lats, pieces = [], []
        while cur.size:
            e = best[cur]
            lats.append(ids)
            pieces.append(self.fwd.piece[e])
            cur = self.fwd.frm[e]
            more = cur != self.first[ids]
            cur, ids = cur[more], ids[more]
        return np.concatenate(lats), np.concatenate(pieces)

    def spans(self, a: np.ndarray, k: np.ndarray, alive: np.ndarray) -> _Lattices:
        """The lattice of each span of nodes a[i]..a[i]+k[i] (the edges of alive pieces inside it) without the edge
        covering it whole: the segmentations of a piece that do not use the piece itself."""
        m = alive[self.by_src[2]]
        src, dst, piece = self.by_src = tuple(x[m] for x in self.by_src)
        b = a + k
        ptr = np.r_[0, np.cumsum(np.bincount(src, minlength=self.n_nodes))]  # edges leaving node i: ptr[i]:ptr[i+1]
        lo = ptr[a]
        n = ptr[b] - lo
        owner = np.repeat(np.arange(len(a)), n)
        idx = np.arange(int(n.sum())) + np.repeat(lo - (np.cumsum(n) - n), n)
        s, d, bo = src[idx], dst[idx], b[owner]
        ok = (d <= bo) & ((s != a[owner]) | (d != bo))
        idx, owner = idx[ok], owner[ok]
        first = np.cumsum(k + 1) - (k + 1)
        shift = (first - a)[owner]
        return _Lattices.build(src[idx] + shift, dst[idx] + shift, piece[idx], owner, first, first + k, full=False)


def _seed(words: list[str], counts: np.ndarray, max_len: int, seed_size: int):
    """Seed vocabulary and the lattices of all words.

    Every character, plus the most frequent substrings by frequency × length (sentencepiece's seed score): those
    occurring at least twice, at most max_len long, with "▁" only as their first character, and right-maximal
    (followed by two different characters, or ending a word: the internal nodes of sentencepiece's suffix tree).
    Substrings are enumerated exactly, one length at a time: a length-k substring's id is the unique pair (id of
    its first k-1 characters, its last character), which numpy computes for all positions at once."""
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    wstart = np.cumsum(lengths) - lengths
    joined = "".join(words)
    alphabet, code = np.unique(np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32), return_inverse=True)
    code = code.astype(np.int64)
    n_chars = len(alphabet)
    space = int(np.searchsorted(alphabet, ord(SPACE)))
    space = space if space < n_chars and alphabet[space] == ord(SPACE) else -1
    word_of = np.repeat(np.arange(len(words)), lengths)
    end_of = (wstart + lengths)[word_of]
    weight = counts[word_of]
    end_sym = n_chars  # "word ends here (or a new ▁ word starts)": one continuation symbol

    pos, rank = np.arange(len(code)), code  # occurrences of the length-k substrings
    freq = np.bincount(code, weights=weight, minlength=n_chars)
    levels = [(pos, rank, freq)]
    cand = []  # (k, rank, seed score) of the multi-character candidates
    for k in range(1, max_len + 1):
        pos, rank, freq = levels[-1]
        live = freq[rank] >= 2  # a longer substring is never more frequent than its prefix
        pos, rank = pos[live], rank[live]
        nxt = np.full(len(pos), end_sym)
        inside = pos + k < end_of[pos]
        nxt[inside] = code[pos[inside] + k]
        nxt[nxt == space] = end_sym
        keys, inv = np.unique(rank * (n_chars + 1) + nxt, return_inverse=True)
        ext = (keys % (n_chars + 1)) != end_sym  # extended keys become the length-(k+1) substrings
        if k >= 2:  # right-maximal: two different next characters, or a word end (followed by anything)
            ends = 1 if _SPM_SEED_RULE else 2
            branches = np.bincount(keys // (n_chars + 1), weights=np.where(ext, 1, ends), minlength=len(freq))
            ok = np.flatnonzero((freq >= 2) & (branches >= 2))
            cand.append((np.full(len(ok), k), ok, freq[ok] * k))
        if k == max_len:
            break
        new_id = np.cumsum(ext) - 1
        take = ext[inv]
        pos, rank = pos[take], new_id[inv[take]]
        levels.append((pos, rank, np.bincount(rank, weights=weight[pos], minlength=int(ext.sum()))))

    ck, cr, cs = (np.concatenate(c) for c in zip(*cand)) if cand else (np.zeros(0, np.int64),) * 3
    top = np.lexsort((cr, -ck, -cs))[:max(0, seed_size - n_chars)]
    ck, cr, cs = ck[top], cr[top], cs[top]
    # piece table: characters first (ids 0..n_chars-1), then the chosen substrings
    piece_len = np.r_[np.ones(n_chars, np.int64), ck]
    seed_freq = np.r_[levels[0][2], cs]
    occurrence = np.zeros(len(piece_len), np.int64)  # a position where each piece occurs
    src, dst, piece, lat = [], [], [], []
    for k in range(1, len(levels) + 1):
        pos, rank, level_freq = levels[k - 1]
        sel = np.full(len(level_freq), -1)
        if k == 1:
            sel[:] = np.arange(n_chars)
        else:
            j = np.flatnonzero(ck == k)
            sel[cr[j]] = n_chars + j
        hit = sel[rank] >= 0
        p, r = pos[hit], sel[rank[hit]]
        occurrence[r] = p  # any occurrence will do
        src.append(p + word_of[p])  # node of char position i in word w: i + w (each word has one extra node)
        dst.append(p + word_of[p] + k)
        piece.append(r)
        lat.append(word_of[p])
    # int32 halves the memory traffic of the sweeps (node and piece counts stay far below 2**31)
    src, dst, piece, lat = (np.concatenate(x).astype(np.int32) for x in (src, dst, piece, lat))
    order = np.argsort(src, kind="stable")  # sorted runs (one per length): timsort merges them, (src, dst) order
    src, dst, piece, lat = src[order], dst[order], piece[order], lat[order]
    first = wstart + np.arange(len(words))
    lattices = _Lattices.build(src, dst, piece, lat, first, first + lengths)
    strings = [chr(c) for c in alphabet] + [joined[p:p + k] for p, k in zip(occurrence[n_chars:], ck)]
    # seed log-probabilities: score / Σ score
    log_p = np.log(seed_freq) - np.log(seed_freq.sum())
    return strings, log_p, lattices, occurrence + word_of[occurrence], piece_len, n_chars


def _e_step(lat: _Lattices, log_p: np.ndarray, counts: np.ndarray):
    """Expected piece counts: Σ_words count(w) Σ_edges P(edge | w), with P(edge s→e | w) =
    exp(α(s) + log p(x) + β(e) - log Z(w)) (forward α, backward β, Z(w) = Σ_segmentations p(x))."""
    alpha, _ = lat.forward(log_p)
    beta = lat.backward(log_p)
    log_z = alpha[lat.last]
    f = lat.fwd
    # count(w) · P(edge | w) = exp(α(s) + log p(x) + [β(e) - log Z(w) + log count(w)]), the bracket per end node
    per_end = beta[f.targets] - log_z[f.target_lat] + np.log(counts)[f.target_lat]
    w = alpha[f.frm]  # in place from here: the same sums in the same order, fewer edge-sized temporaries
    w += f.last_scores[1] if f.last_scores[0] is log_p else log_p[f.piece]
    w += np.repeat(per_end, f.counts)
    expected = np.bincount(f.piece, weights=np.exp(w, out=w), minlength=len(log_p))
    return expected, float(-(counts * log_z).sum() / counts.sum())


def _m_step(expected: np.ndarray, alive: np.ndarray, n_chars: int):
    """Bayesian (variational, Dirichlet-process-like) M-step that sentencepiece uses instead of plain
    p(x) = c(x) / Σc: log p(x) = ψ(c(x)) - ψ(Σc), which discounts rare pieces (a sparse prior). Pieces expected
    fewer than 0.5 times are dropped; characters are kept, their count floored at 0.5."""
    c = expected.copy()
    c[:n_chars] = np.maximum(c[:n_chars], EXPECTED_COUNT_THRESHOLD)
    alive = alive & (c >= EXPECTED_COUNT_THRESHOLD)
    log_p = np.full(len(c), -np.inf)
    log_p[alive] = _digamma(c[alive]) - _digamma(c[alive].sum())
    return log_p, alive


def _prune(lat: _Lattices, log_p, alive, counts, occurrence, piece_len, n_chars, target: int, floor: int):
    """Keep the characters and the `target` - n_chars pieces whose removal would cost the most likelihood.

    For piece x with Viterbi frequency f(x) (of N piece occurrences over V words) and alternative segmentation
    y_1..y_m (the best one of x without x): removing x moves its f(x) occurrences to the y's, so
        loss(x) = f(x)/V · [ log(f(x)/N) - Σ_j log((f(y_j) + f(x)) / (N + (m-1) f(x))) ]   (paper §3.2 step 4).
    A piece that never appears on a Viterbi path, or whose best segmentation is not itself, goes regardless (as in
    sentencepiece) -- unless that would leave fewer than `floor` pieces: then the best-scoring of them stay."""
    _, best = lat.forward(log_p, viterbi=True)
    wl, wp = lat.backtrack(best)
    freq = np.bincount(wp, weights=counts[wl], minlength=len(log_p))
    total = freq.sum()
    cand = np.flatnonzero(alive[n_chars:]) + n_chars  # characters always stay
    new_alive = np.zeros_like(alive)
    new_alive[:n_chars] = True
    loss = np.full(len(cand), -np.inf)  # -inf: removable (unused, or not its own best segmentation)
    used = np.flatnonzero(freq[cand] > 0)
    if used.size:
        x = cand[used]
        sub = lat.spans(occurrence[x], piece_len[x], alive)
        alt_val, alt_best = sub.forward(log_p, viterbi=True)
        sl, sp = sub.backtrack(alt_best)
        f = freq[x]
        m = np.bincount(sl, minlength=len(x))
        log_alt = np.bincount(sl, weights=np.log(freq[sp] + f[sl]), minlength=len(x))
        log_alt -= m * np.log(total + f * (m - 1))
        own = log_p[x] >= alt_val[sub.last]
        loss[used[own]] = (f / counts.sum() * (np.log(f) - math.log(total) - log_alt))[own]
    n_keep = min(target, max(int(np.isfinite(loss).sum()) + n_chars, floor)) - n_chars
    new_alive[cand[np.lexsort((-log_p[cand], -loss))[:max(0, n_keep)]]] = True
    return new_alive


def train_unigram(word_counts: dict[str, int], vocab_size: int, *, special_tokens: Sequence[str] = (),
                  unk_token: str = "<unk>", byte_fallback: bool = False, max_piece_length: int = 16,
                  shrinking_factor: float = 0.75, n_sub_iterations: int = 2, seed_size: int = 1_000_000,
                  progress: bool = False) -> Unigram:
    """Train a Unigram model on pre-token counts ("▁"-prefixed, normalized words -> corpus counts).

    Ids: special tokens (score 0), unk_token unless it is a special token (score 0), the 256 byte tokens if
    byte_fallback (score 0), then the learned pieces by descending score (all characters are among them)."""
    for w, c in word_counts.items():
        if not isinstance(w, str) or not w:
            raise ValueError(f"word_counts keys must be non-empty strings, got {w!r}")
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"word_counts[{w!r}] must be a count (an int >= 0), got {c!r}")
    words = [w for w, c in word_counts.items() if c > 0]
    if not words:
        raise ValueError("word_counts is empty (or all counts are 0): there is nothing to train on")
    for name, v, lo in (("vocab_size", vocab_size, 1), ("max_piece_length", max_piece_length, 1),
                        ("n_sub_iterations", n_sub_iterations, 1), ("seed_size", seed_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0.0 < shrinking_factor < 1.0:
        raise ValueError(f"shrinking_factor must be in (0, 1), got {shrinking_factor!r}")
    if not isinstance(unk_token, str) or not unk_token:
        raise ValueError(f"unk_token must be a non-empty string, got {unk_token!r}")
    specials = list(special_tokens)
    if len(set(specials)) != len(specials) or not all(isinstance(t, str) and t for t in specials):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {specials!r}")
    fixed = specials + ([] if unk_token in specials else [unk_token]) + (list(BYTE_TOKENS) if byte_fallback else [])
    if len(set(fixed)) != len(fixed):
        raise ValueError("special_tokens/unk_token must not be byte tokens <0xXX> when byte_fallback is on")
    chars = set("".join(words))
    if vocab_size < len(fixed) + len(chars):
        raise ValueError(f"vocab_size={vocab_size} is too small: the {len(chars)} distinct characters of the corpus "
                         f"plus {len(fixed)} special/unk/byte tokens need at least {len(fixed) + len(chars)}")
    n_learn = vocab_size - len(fixed)

    counts = np.fromiter((word_counts[w] for w in words), dtype=np.float64, count=len(words))
    strings, log_p, lat, occurrence, piece_len, n_chars = _seed(words, counts, max_piece_length, seed_size)
    alive = np.ones(len(strings), dtype=bool)
    desired = int(n_learn * 1.1)  # sentencepiece prunes to 1.1 × the target, then keeps the best-scoring pieces
    bar, shown = Bar(max(0, len(strings) - desired), "Unigram pruning", progress), len(strings)
    while True:
        for _ in range(n_sub_iterations):
            expected, _ = _e_step(lat, log_p, counts)
            log_p, alive = _m_step(expected, alive, n_chars)
            lat = lat.keep(alive, min_drop=0.1)
        size = int(alive.sum())
        bar.update(shown - size)
        shown = size
        if size <= desired:
            break
        new_alive = _prune(lat, log_p, alive, counts, occurrence, piece_len, n_chars,
                           max(desired, int(shrinking_factor * size)), floor=desired)
        if new_alive.sum() >= size:  # nothing can be removed (every piece is needed)
            break
        alive = new_alive
        lat = lat.keep(alive)
    bar.close()

    # Finalize: all characters, then the best-scoring pieces; learned pieces equal to a fixed token are skipped.
    taken = set(fixed)
    learned = [(strings[i], float(log_p[i])) for i in range(n_chars) if strings[i] not in taken]
    others = [i for i in np.flatnonzero(alive[n_chars:]) + n_chars if strings[i] not in taken]
    others.sort(key=lambda i: (-log_p[i], strings[i]))
    learned += [(strings[i], float(log_p[i])) for i in others[:max(0, n_learn - len(learned))]]
    learned.sort(key=lambda p: (-p[1], p[0]))
    pieces = [(t, 0.0) for t in fixed] + learned
    return Unigram(pieces, unk_id=fixed.index(unk_token), byte_fallback=byte_fallback)
