"""BPE over many pre-tokens at once, in numpy: the batched Python encoder (Tokenizer.encode_batch(fast=False)).

The one-word merge loop (BPE._merge) pays Python's cost per merge, and a Chinese clause, one pre-token under
GPT-2's split, takes dozens of merges. Here the symbols of every word lie in flat arrays and each round merges,
in every unfinished word, all occurrences of that word's lowest-ranked pair: a few numpy passes per round, for
thousands of merges. This equals one merge at a time when the merge list is in rank order (every merge ranks
after the merges that make its two tokens, true of any trained list): merging a pair then never creates a pair
of lower rank, so a word's next merges are the other occurrences of the same pair, left to right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

NO_PAIR = np.iinfo(np.int64).max  # the rank where a symbol has no mergeable pair with the next one
# Below this many merges a round costs more than merging the remaining (long) words one by one in Python
MIN_ROUND_MERGES = 32
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: multiply by 2^64/φ, keep the top bits


class RankTables:
    """The merge list as arrays (left, right, rank, merged id), whether it is in rank order, and per token the
    lowest rank of a merge with that token on its right / on its left (NO_PAIR: none)."""

    def __init__(self, ranks: dict[tuple[int, int], tuple[int, int]], vocab_size: int):
        m, n = len(ranks), vocab_size
        self.left = np.fromiter((a for a, _ in ranks), dtype=np.int64, count=m)
        self.right = np.fromiter((b for _, b in ranks), dtype=np.int64, count=m)
        self.rank = np.fromiter((r for r, _ in ranks.values()), dtype=np.int64, count=m)
        self.merged = np.fromiter((t for _, t in ranks.values()), dtype=np.int64, count=m)
        made_at = np.full(n, -1, dtype=np.int64)  # the last rank that makes each token (-1: an initial symbol)
        np.maximum.at(made_at, self.merged, self.rank)
        self.rank_ordered = bool(np.all(made_at[self.left] < self.rank) and np.all(made_at[self.right] < self.rank))
        self.lowest_as_right = np.full(n + 1, NO_PAIR)
        self.lowest_as_left = np.full(n + 1, NO_PAIR)
        np.minimum.at(self.lowest_as_right, self.right, self.rank)
        np.minimum.at(self.lowest_as_left, self.left, self.rank)

    def free_pairs(self) -> dict[tuple[int, int], int]:
        """(left, right) -> merged id of every merge no lower-ranked merge can take a symbol from: no merge
        (x, left) and no merge (right, y) ranks below it. In a list in rank order, the one-merge-at-a-time loop
        merges such a pair wherever it stands, at its turn, whatever happens first; and merging it early creates
        no pair of lower rank (those contain the merged token, so rank after it). So it can be merged at any
        time. A pair (x, x) is never free (it is a merge (., x) of its own rank), so free pairs never overlap.
        Empty when the list is not in rank order."""
        if not self.rank_ordered:
            return {}
        free = (self.rank < self.lowest_as_right[self.left]) & (self.rank < self.lowest_as_left[self.right])
        return dict(zip(zip(self.left[free].tolist(), self.right[free].tolist()), self.merged[free].tolist()))


class ManyMerger:
    """The merge list as an open-addressing hash table of pair keys (left·V + right) -> (rank, merged id),
    looked up for whole arrays at once, and the merge rounds over many words."""

    def __init__(self, tables: RankTables, vocab: dict[str, int]):
        self.vocab_size = n = len(vocab)
        m = len(tables.rank)
        left, right, rank, merged = tables.left, tables.right, tables.rank, tables.merged
        self.rank_ordered = tables.rank_ordered
        self.lowest_as_right, self.lowest_as_left = tables.lowest_as_right, tables.lowest_as_left
        # one id per single-character token, by code point, to turn the words' characters into symbols at once
        chars = {ord(t): i for t, i in vocab.items() if len(t) == 1 and ord(t) < 1 << 16}
        self.char_ids = np.full(max(chars, default=-1) + 1, -1, dtype=np.int64)
        self.char_ids[list(chars)] = list(chars.values())
        # the table: 4 slots per pair or more, a power of two; linear probing
        bits = max(4, (4 * m).bit_length())
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        self.keys = np.full(1 << bits, -1, dtype=np.int64)
        self.ranks, self.merged = np.zeros(1 << bits, dtype=np.int64), np.zeros(1 << bits, dtype=np.int64)
        keys, home = left * n + right, self._home(left * n + right)
        pending, probe = np.arange(m), 0
        while len(pending):  # everyone still unplaced tries home + probe; one winner per free slot
            slot = (home[pending] + probe) & self.mask
            free = self.keys[slot] == -1
            taken, first = np.unique(slot[free], return_index=True)
            won = pending[free][first]
            self.keys[taken], self.ranks[taken], self.merged[taken] = keys[won], rank[won], merged[won]
            pending = np.setdiff1d(pending, won, assume_unique=True)
            probe += 1
        self.max_probe = probe - 1

    def _home(self, key: np.ndarray) -> np.ndarray:
        return ((key.astype(np.uint64) * _GOLDEN) >> self.shift).astype(np.int64)

    def lookup(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rank, merged id) of each pair key; rank NO_PAIR where no merge has that pair."""
        home = self._home(key)
        found = self.keys[home]
        hit = found == key
        rank, merged = np.where(hit, self.ranks[home], NO_PAIR), self.merged[home]
        pending = np.flatnonzero(~hit & (found != -1))  # an empty slot ends the search
        for probe in range(1, self.max_probe + 1):
            if not len(pending):
                break
            slot = (home[pending] + probe) & self.mask
            found = self.keys[slot]
            hit = found == key[pending]
            rank[pending[hit]], merged[pending[hit]] = self.ranks[slot[hit]], self.merged[slot[hit]]
            pending = pending[~hit & (found != -1)]
        return rank, merged

    def tokenize(self, symbols: str, lengths: Sequence[int],
                 merge_one: Callable[[list[int]], list[int]]) -> list[list[int]] | None:
        """The ids of the words that symbols holds one after another (lengths in characters); None when a
        character has no single-character token (the caller then goes word by word). merge_one finishes the
        last few long words (BPE._merge)."""
        points = np.frombuffer(symbols.encode("utf-32-le"), dtype=np.uint32)
        if len(points) and points.max() >= len(self.char_ids):
            return None
        ids = self.char_ids[points]
        if len(ids) and ids.min() < 0:
            return None
        lengths = np.asarray(lengths, dtype=np.int64)
        return self.merge(ids, np.repeat(np.arange(len(lengths)), lengths), len(lengths), merge_one)

    def merge(self, ids: np.ndarray, word: np.ndarray, n_words: int,
              merge_one: Callable[[list[int]], list[int]]) -> list[list[int]]:
        """BPE on the symbols ids (word[i]: the word of symbol i, ascending). Within a round, an occurrence
        whose previous symbol was chosen too waits (in a run x x x of the pair (x, x) the 2nd goes with the 1st,
        the 3rd merges next round), as left to right merging does. Symbols link to the next and previous live
        one, so a round is a few passes plus work per merge; finished words leave once they fill half the
        arrays."""
        done_ids, done_word = [], []
        while len(ids):
            n = len(ids)
            starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
            counts = np.diff(np.append(starts, n))
            local = np.repeat(np.arange(len(starts)), counts)  # the word of each place, 0.. in these arrays
            # links along each word; place n is a sentinel: no symbol, never chosen
            nxt, prv = np.arange(1, n + 2), np.arange(-1, n)
            nxt[starts + counts - 1], prv[starts] = n, n
            ids = np.append(ids, 0)
            alive = np.ones(n, dtype=bool)

            def pair_at(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # each place with its next one
                right = nxt[pos]
                rank, merged = self.lookup(ids[pos] * self.vocab_size + ids[right])
                return np.where(right < n, rank, NO_PAIR), merged

            rank, new = np.full(n + 1, NO_PAIR), np.zeros(n + 1, dtype=np.int64)
            rank[:n], new[:n] = pair_at(np.arange(n))
            chosen = np.zeros(n + 1, dtype=bool)
            while True:
                lowest = np.minimum.reduceat(rank[:n], starts)
                finished = lowest == NO_PAIR
                if counts[finished].sum() + n - alive.sum() > n // 2:
                    break  # lay the unfinished words out again, without the finished ones and the merged-away
                chosen[:n] = (rank[:n] == lowest[local]) & ~finished[local]
                chosen[:n] &= ~chosen[prv[:n]]
                # A pair no merge of lower rank can take a symbol from (no merge (·, x) ranks below it, no merge
                # (y, ·)) is merged now: the one-at-a-time loop merges it at its turn whatever happens first.
                r = rank[:n]
                chosen[:n] |= (r < self.lowest_as_right[ids[:n]]) & (r < self.lowest_as_left[ids[nxt[:n]]])
                at = np.flatnonzero(chosen[:n])
                if len(at) < MIN_ROUND_MERGES:
                    for w in np.flatnonzero(~finished).tolist():
                        a, b = starts[w], starts[w] + counts[w]
                        piece = merge_one(ids[a:b][alive[a:b]].tolist())
                        done_ids.append(np.array(piece, dtype=np.int64))
                        done_word.append(np.full(len(piece), word[a]))
                    alive[~finished[local]] = False
                    break
                right = nxt[at]
                ids[at], rank[right], alive[right] = new[at], NO_PAIR, False
                after = nxt[right]
                nxt[at], prv[after] = after, at
                left = prv[at]
                pos = np.concatenate((at, left[left < n]))
                rank[pos], new[pos] = pair_at(pos)
            out = alive & finished[local]
            done_ids.append(ids[:n][out])
            done_word.append(word[out])
            keep = alive & ~finished[local]
            ids, word = ids[:n][keep], word[keep]
        if not done_ids:
            return [[] for _ in range(n_words)]
        all_word = np.concatenate(done_word)
        flat = np.concatenate(done_ids)[np.argsort(all_word, kind="stable")].tolist()
        ends = np.cumsum(np.bincount(all_word, minlength=n_words)).tolist()
        return [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
