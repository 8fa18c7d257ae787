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
words at once, a few numpy calls per position in the word (so the Python loop is as long as the longest word); the
log-sum-exp over a node's incoming edges is max-shifted exp/sum/log on whole slices (see _Sweep._prepare), and the
E-step's expected counts come out of the backward sweep.

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
# Training filters its lattices (and lays their sweeps out again, ~3 sweeps' work) only once this fraction of the
# edges belongs to dead pieces; until then those edges cost a little in each sweep and count for nothing.
REBUILD_DEAD_FRACTION = 0.25
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
    """One dynamic-programming sweep over many lattices at once: value[to] = reduce over the edges into `to` of
    value[frm] + log p(piece), one level (distance from the sweep's start node) at a time -- an edge's `frm` node is
    always on a lower level than its `to` node. The edges stay in the lattices' order; run() works on its own
    layout of them (see _prepare), made on first use."""

    def __init__(self, frm, to, level, piece):
        self.frm, self.to, self.level, self.piece = frm, to, level, piece
        self._plan = None

    def _prepare(self, n_nodes: int, init: np.ndarray):
        """The per-level plan of run(), computed once per sweep (a sweep runs several times: forward in both
        E-steps and in pruning's Viterbi).

        Values live in a "sweep-ordered" array: the init nodes, then each level's target nodes, then one -inf slot
        for nodes no edge reaches, so a level's targets are one contiguous slice (written in place, no scatter).
        Within a level the targets are ordered by in-degree, highest first, and the level's edges by slot: slot j
        holds the j-th edge of every target that has more than j, so it is a prefix of the level's targets. The
        log-sum-exp over each target's edges is then a few whole-slice ufunc calls per slot, where reduceat pays
        per group and np.logaddexp costs ~50 ns an element (scalar exp + log1p)."""
        i32, n_edges = np.int32, len(self.frm)
        o = np.argsort(self.to, kind="stable")  # the edges grouped by target node, in their order within a group
        to = self.to[o]
        group = np.flatnonzero(np.r_[True, to[1:] != to[:-1]]) if n_edges else np.zeros(0, np.int64)
        cnt = np.diff(np.r_[group, n_edges]).astype(i32)  # per group: its target node's in-degree
        k, g = len(init), len(group)
        glevel = self.level[o[group]].astype(i32)
        n_levels, width = int(glevel.max(initial=0)) + 1, int(cnt.max(initial=1)) + 1
        # targets by level, then by in-degree descending: two stable (radix) sorts on small keys
        small = np.uint8 if width <= 256 else i32
        gorder = np.argsort((width - 1 - cnt).astype(small), kind="stable")
        gorder = gorder[np.argsort(glevel[gorder].astype(np.uint16 if n_levels <= 2**16 else i32), kind="stable")]
        # n_at_least[l, j]: targets of level l with more than j edges; slot j of level l starts at row_off[l, j]
        hist = np.bincount(glevel * width + cnt, minlength=n_levels * width).reshape(n_levels, width)
        n_at_least = hist[:, ::-1].cumsum(1)[:, ::-1][:, 1:]
        row_off = np.cumsum(n_at_least, 1) - n_at_least
        gb = np.r_[0, np.cumsum(n_at_least[:, 0])]  # first target of each level
        bounds = np.r_[0, np.cumsum(n_at_least.sum(1))]  # first edge of each level
        gpos = np.empty(g, dtype=i32)  # a target's place in sweep order
        gpos[gorder] = np.arange(g, dtype=i32)
        rank = gpos - gb.astype(i32)[glevel]  # its place among its level's targets
        # edge (target t, slot j) goes to bounds[level] + row_off[level, j] + rank[t]
        level_slot = np.repeat(glevel * (width - 1), cnt)
        level_slot += np.arange(n_edges, dtype=i32)
        level_slot -= np.repeat(group.astype(i32), cnt)
        dest = (row_off + bounds[:-1, None]).astype(i32).ravel()[level_slot]
        dest += np.repeat(rank, cnt)
        target_nodes = to[group]
        targets = np.empty(g, dtype=i32)
        targets[gpos] = target_nodes
        pos = np.full(n_nodes, k + g, dtype=i32)
        pos[init] = np.arange(k, dtype=i32)
        pos[target_nodes] = gpos + k
        # moving the edges to their places is a random permutation (~35 ns an edge): the dearest part of the plan
        src, piece, perm = (np.empty(n_edges, dtype=i32) for _ in range(3))
        src[dest] = pos[self.frm[o]]
        piece[dest] = self.piece[o]
        perm[dest] = o  # perm[slot-ordered position] = edge, for the best edges of a Viterbi run
        b, gb, rows, offs = bounds.tolist(), gb.tolist(), n_at_least.tolist(), row_off.tolist()
        levels = []
        for j in range(n_levels):
            n0 = gb[j + 1] - gb[j]
            if n0:
                slots = [(off, off + n, n) for off, n in zip(offs[j][1:], rows[j][1:]) if n]
                levels.append((b[j], b[j + 1], k + gb[j], k + gb[j + 1], n0, src[b[j]:b[j + 1]], slots))
        self._plan = (n_nodes, init, k, g, levels, perm, piece, targets)

    def run(self, log_p: np.ndarray, n_nodes: int, init: np.ndarray, viterbi: bool = False,
            through: np.ndarray | None = None):
        """val[n] = log Σ_paths init→n exp(Σ log p) (max instead of log-sum-exp when viterbi, then also the best
        edge into each node). With `through` (a log-weight per node), the second result is instead, per piece,
        Σ over its edges of exp(val[frm] + log p + through[to]): run backward with through = α - log Z + log count,
        that is each piece's expected count (see _e_step)."""
        if self._plan is None or self._plan[0] != n_nodes or self._plan[1] is not init:
            self._prepare(n_nodes, init)
        _, _, k, g, levels, perm, piece, targets = self._plan
        w = np.empty(k + g + 1)  # sweep-ordered values (see _prepare)
        w[:k], w[k + g] = 0.0, -np.inf
        best_w = np.empty(g, dtype=np.int64) if viterbi else None
        sc = log_p[piece]
        if through is not None:
            through, edge_w = through[targets], np.empty(len(piece))
        take, maximum, exp, log = w.take, np.maximum, np.exp, np.log
        for lo, hi, a, b, n0, src, slots in levels:
            v = take(src)
            v += sc[lo:hi]
            if through is not None:  # an edge's log-weight: v + through at its target, slot by slot
                t = through[a - k:b - k]
                np.add(v[:n0], t, out=edge_w[lo:lo + n0])
                for s, e, n in slots:
                    np.add(v[s:e], t[:n], out=edge_w[lo + s:lo + e])
            if not slots:  # one edge per target node: nothing to reduce
                w[a:b] = v
                if viterbi:
                    best_w[a - k:b - k] = perm[lo:hi]
                continue
            m = v[:n0].copy()  # max over each target's edges, slot by slot
            for s, e, n in slots:
                maximum(m[:n], v[s:e], out=m[:n])
            if viterbi:  # the first edge reaching the maximum: lower slots overwrite higher ones
                w[a:b] = m
                bw = best_w[a - k:b - k]
                for s, e, n in reversed(slots):
                    np.copyto(bw[:n], perm[lo + s:lo + e], where=v[s:e] == m[:n])
                np.copyto(bw, perm[lo:lo + n0], where=v[:n0] == m)
                continue
            # log Σ exp(v) = m + log Σ exp(v - m), m the max: stable, and no term overflows
            v[:n0] -= m
            for s, e, n in slots:
                v[s:e] -= m[:n]
            exp(v, out=v)
            total = v[:n0]
            for s, e, n in slots:
                total[:n] += v[s:e]
            log(total, out=total)
            total += m
            w[a:b] = total
        val = np.full(n_nodes, -np.inf)
        val[init] = 0.0
        val[targets] = w[k:k + g]
        if through is not None:
            return val, np.bincount(piece, weights=exp(edge_w, out=edge_w), minlength=len(log_p))
        if not viterbi:
            return val, None
        best = np.full(n_nodes, -1, dtype=np.int64)
        best[targets] = best_w
        return val, best


class _Lattices:
    """The lattices of many strings as one edge list. Lattice b owns the consecutive nodes first[b]..last[b]; an
    edge src -> dst (src sorted) is an occurrence of a piece in lattice lat."""

    def __init__(self, src, dst, piece, lat, first, last):
        self.src, self.dst, self.piece, self.lat, self.first, self.last = src, dst, piece, lat, first, last
        self.n_nodes = int(last[-1]) + 1
        self._fwd = self._bwd = self._out_ptr = self._piece_edges = self._node_lat = None  # made on first use

    @property
    def n_edges(self) -> int:
        return len(self.piece)

    @property
    def node_lat(self) -> np.ndarray:
        """The lattice of every node."""
        if self._node_lat is None:
            self._node_lat = np.repeat(np.arange(len(self.first)), self.last - self.first + 1)
        return self._node_lat

    @property
    def fwd(self) -> _Sweep:
        if self._fwd is None:
            self._fwd = _Sweep(self.src, self.dst, self.dst - self.first[self.lat], self.piece)
        return self._fwd

    @property
    def bwd(self) -> _Sweep:
        if self._bwd is None:
            self._bwd = _Sweep(self.dst, self.src, self.last[self.lat] - self.src, self.piece)
        return self._bwd

    def keep(self, alive: np.ndarray, min_drop: float = 0.0) -> _Lattices:
        """Only the edges of pieces with alive[piece]. Below min_drop (a fraction of the edges) the lattices are
        kept whole: dead pieces have log p = -inf, so their edges count for nothing, and filtering (then laying
        out the sweeps again) would cost more than it saves."""
        if min_drop:
            if self._piece_edges is None:  # edges per piece: the dead fraction without a pass over the edges
                self._piece_edges = np.bincount(self.piece, minlength=len(alive))
            if self._piece_edges[~alive].sum() < min_drop * self.n_edges:
                return self
        m = alive[self.piece]
        return _Lattices(self.src[m], self.dst[m], self.piece[m], self.lat[m], self.first, self.last)

    def forward(self, log_p, viterbi=False):
        return self.fwd.run(log_p, self.n_nodes, self.first, viterbi)

    def backward(self, log_p, through=None):
        return self.bwd.run(log_p, self.n_nodes, self.last, through=through)

    def backtrack(self, best: np.ndarray):
        """(lattice, piece) of every edge on each lattice's best path (from forward(viterbi=True))."""
        cur, ids = self.last.copy(), np.arange(len(self.last))
        lats, pieces = [], []
        while cur.size:
            e = best[cur]
            lats.append(ids)
            pieces.append(self.piece[e])
            cur = self.src[e]
            more = cur != self.first[ids]
            cur, ids = cur[more], ids[more]
        return np.concatenate(lats), np.concatenate(pieces)

    def spans(self, a: np.ndarray, k: np.ndarray, alive: np.ndarray) -> _Lattices:
        """The lattice of each span of nodes a[i]..a[i]+k[i] (the edges of alive pieces inside it) without the edge
        covering it whole: the segmentations of a piece that do not use the piece itself."""
        if self._out_ptr is None:  # edges leaving node i: _out_ptr[i]:_out_ptr[i+1]
            self._out_ptr = np.r_[0, np.cumsum(np.bincount(self.src, minlength=self.n_nodes))]
        src, dst, piece = self.src, self.dst, self.piece
        b = a + k
        lo = self._out_ptr[a]
        n = self._out_ptr[b] - lo
        owner = np.repeat(np.arange(len(a)), n)
        idx = np.arange(int(n.sum())) + np.repeat(lo - (np.cumsum(n) - n), n)
        s, d, bo = src[idx], dst[idx], b[owner]
        ok = (d <= bo) & ((s != a[owner]) | (d != bo)) & alive[piece[idx]]
        idx, owner = idx[ok], owner[ok]
        first = np.cumsum(k + 1) - (k + 1)
        shift = (first - a)[owner]
        return _Lattices(src[idx] + shift, dst[idx] + shift, piece[idx], owner, first, first + k)


class _Substrings(Sequence):
    """The seed pieces' strings, each cut from the corpus when asked for: training needs only the survivors'."""

    def __init__(self, text: str, starts: np.ndarray, lengths: np.ndarray):
        self.text, self.starts, self.ends = text, starts, starts + lengths

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.text[self.starts[i]:self.ends[i]]


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
    code_points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    seen = np.bincount(code_points) > 0  # a table over code points: no sort
    alphabet = np.flatnonzero(seen)
    code = (np.cumsum(seen) - 1)[code_points]
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
    lattices = _Lattices(src, dst, piece, lat, first, first + lengths)
    strings = _Substrings(joined, occurrence, piece_len)
    # seed log-probabilities: score / Σ score
    log_p = np.log(seed_freq) - np.log(seed_freq.sum())
    return strings, log_p, lattices, occurrence + word_of[occurrence], piece_len, n_chars


def _e_step(lat: _Lattices, log_p: np.ndarray, counts: np.ndarray):
    """Expected piece counts: Σ_words count(w) Σ_edges P(edge | w), with P(edge s→e | w) =
    exp(α(s) + log p(x) + β(e) - log Z(w)) (forward α, backward β, Z(w) = Σ_segmentations p(x))."""
    alpha, _ = lat.forward(log_p)
    log_z = alpha[lat.last]
    # count(w) · P(edge | w) = exp(β(e) + log p(x) + [α(s) - log Z(w) + log count(w)]): the backward sweep has
    # β(e) + log p(x) at hand for every edge, the bracket is per start node
    _, expected = lat.backward(log_p, through=alpha + (np.log(counts) - log_z)[lat.node_lat])
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
    if not words:  # train([], kind="unigram") lands here: name the corpus, as the BPE and WordPiece trainers do
        raise ValueError("cannot train a tokenizer on an empty corpus (word_counts is empty or all its counts are 0)")
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
            lat = lat.keep(alive, min_drop=REBUILD_DEAD_FRACTION)
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
        lat = lat.keep(alive, min_drop=REBUILD_DEAD_FRACTION)
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
