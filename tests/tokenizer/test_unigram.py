"""Unigram language-model tokenizer (Kudo 2018, sentencepiece's algorithm): Viterbi, n-best and sampling against
brute force; the vectorized trainer (seed enumeration, forward-backward E-step, Viterbi) against brute force; id
parity with Hugging Face `tokenizers` (an oracle only) on vocabularies trained by tokenizers and by us; training
quality against sentencepiece on real text; error messages."""

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.data import sources
from llmlab.tokenizer import unigram
from llmlab.tokenizer.unigram import BYTE_TOKENS, SPACE, Unigram, train_unigram

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

ALPHABET = "ab▁c"


def segmentations(model: Unigram, word: str) -> list[tuple[list[int], float]]:
    """Every segmentation of word into vocab pieces with its total score, by brute force."""
    if not word:
        return [([], 0.0)]
    out = []
    for k in range(1, len(word) + 1):
        i = model.vocab.get(word[:k])
        if i is not None:
            out += [([i] + rest, model.pieces[i][1] + score) for rest, score in segmentations(model, word[k:])]
    return out


@st.composite
def vocab_and_word(draw, max_word: int = 8):
    multi = draw(st.sets(st.text(ALPHABET, min_size=2, max_size=4), max_size=12))
    pieces = sorted(set(ALPHABET) | multi)
    scores = draw(st.lists(st.floats(-12, -0.5), min_size=len(pieces), max_size=len(pieces)))
    return Unigram(list(zip(pieces, scores))), draw(st.text(ALPHABET, max_size=max_word))


# --- decoding against brute force ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(vocab_and_word())
def test_viterbi_is_the_best_segmentation(case):
    model, word = case
    ranked = sorted(segmentations(model, word), key=lambda s: -s[1])
    ids = model.tokenize(word)
    assert "".join(model.id_to_token(i) for i in ids) == word
    assert sum(model.pieces[i][1] for i in ids) == pytest.approx(ranked[0][1], abs=1e-9)
    if len(ranked) == 1 or ranked[1][1] < ranked[0][1] - 1e-9:  # a unique best
        assert ids == ranked[0][0]


@settings(max_examples=200, deadline=None)
@given(vocab_and_word(max_word=7), st.integers(1, 8))
def test_nbest_is_the_brute_force_top_n(case, n):
    model, word = case
    ranked = sorted(segmentations(model, word), key=lambda s: -s[1])
    got = model.nbest(word, n)
    assert len(got) == min(n, len(ranked))
    assert [s for _, s in got] == pytest.approx([s for _, s in ranked[:n]], abs=1e-9)
    assert len({tuple(ids) for ids, _ in got}) == len(got)  # distinct segmentations
    for ids, score in got:
        assert "".join(model.id_to_token(i) for i in ids) == word
        assert sum(model.pieces[i][1] for i in ids) == pytest.approx(score, abs=1e-9)


def _chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    assert set(counts) <= set(probs)
    return sum((counts[k] - n * p) ** 2 / (n * p) for k, p in probs.items()), len(probs) - 1


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sampling_matches_the_exact_distribution(alpha):
    model = Unigram([("a", -2.0), ("b", -2.5), ("c", -1.5), ("ab", -3.0), ("bc", -2.2), ("abc", -4.0),
                     ("ca", -3.3), ("cab", -4.4)])
    word = "abcab"
    segs = segmentations(model, word)
    z = sum(math.exp(alpha * s) for _, s in segs)
    exact = {tuple(ids): math.exp(alpha * s) / z for ids, s in segs}
    rng, n = random.Random(0), 20_000
    drawn = Counter(tuple(model.sample(word, alpha, rng=rng)) for _ in range(n))
    chi2, df = _chi2(drawn, exact, n)
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)  # about a 1e-4 false-alarm rate; the seed is fixed

    top = model.nbest(word, 3)  # nbest_size > 1: only the 3 best, P ∝ exp(alpha * score) among them
    z3 = sum(math.exp(alpha * s) for _, s in top)
    exact3 = {tuple(ids): math.exp(alpha * s) / z3 for ids, s in top}
    drawn3 = Counter(tuple(model.sample(word, alpha, nbest_size=3, rng=rng)) for _ in range(n // 4))
    chi2, df = _chi2(drawn3, exact3, n // 4)
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)
    assert model.sample(word, alpha, nbest_size=1, rng=rng) == model.tokenize(word)


# --- unknown characters and byte fallback: parity with tokenizers on random vocabularies ----------------------

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_unknown_characters_match_tokenizers(data):
    known = data.draw(st.sets(st.sampled_from("ab▁"), min_size=1))
    multi = data.draw(st.sets(st.text("ab▁x", min_size=2, max_size=3), max_size=6))  # "x" only inside pieces
    pieces = sorted(known | multi)
    scores = data.draw(st.lists(st.floats(-12, -0.5), min_size=len(pieces), max_size=len(pieces)))
    vocab = list(zip(pieces, scores))
    byte_fallback = data.draw(st.booleans())
    if byte_fallback:
        byte_score = data.draw(st.sampled_from([0.0, -1.0, -20.0]))  # -20: the byte tokens set min score
        vocab += [(b, byte_score) for b in BYTE_TOKENS]
    unk = data.draw(st.sampled_from(["<unk>", "x", None]))  # "x" as unk: a real piece whose id is unk_id
    if unk is not None and unk not in dict(vocab):
        vocab.insert(data.draw(st.integers(0, len(vocab))), (unk, data.draw(st.sampled_from([0.0, -5.0]))))
    unk_id = None if unk is None else [p for p, _ in vocab].index(unk)
    word = data.draw(st.text("ab▁xé😀", max_size=8))

    ours = Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    hf = Tokenizer(models.Unigram(vocab, unk_id, byte_fallback))
    try:
        want = hf.encode(word).ids
    except Exception as err:  # tokenizers refuses unknown characters without unk_id
        assert "unk" in str(err).lower()
        with pytest.raises(ValueError, match="unk"):
            ours.tokenize(word)
        return
    assert ours.tokenize(word) == want


def test_unknown_handling_examples():
    m = Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -3.0)], unk_id=0)
    assert m.unk_score == -13.0  # min score - 10
    assert m.tokenize("axyb") == [1, 0, 2]  # "xy" fused into one unknown token
    assert m.tokenize("abab") == [3, 3]  # a tie (ab = a + b): the earlier start wins, as in tokenizers
    fb = Unigram([("<unk>", 0.0), ("a", -1.0)] + [(b, 0.0) for b in BYTE_TOKENS], unk_id=0, byte_fallback=True)
    assert [fb.id_to_token(i) for i in fb.tokenize("aé")] == ["a", "<0xC3>", "<0xA9>"]
    with pytest.raises(ValueError, match="no unk_id"):
        Unigram([("a", -1.0)]).tokenize("ab")
    covered = Unigram([("a", -1.0), ("ab", -1.0)])  # "b" is unknown, but "ab" covers it: no unk needed
    assert covered.tokenize("ab") == [1] and covered.nbest("ab", 3) == [([1], -1.0)]
    assert covered.sample("ab", 1.0) == [1]
    with pytest.raises(ValueError, match="no unk_id"):
        covered.nbest("ba", 2)


# --- trainer internals against brute force ---------------------------------------------------------------------

SMALL = Counter({"▁the": 9, "▁then": 3, "▁there": 2, "▁other": 4, "▁a": 5, "▁cat": 2, "▁cats": 1, "▁at": 3,
                 "▁hat": 2, "▁that": 4, "a▁b": 2, "▁the,": 1})


def _brute_force_seed(counts: Counter, max_len: int, spm_rule: bool) -> dict[str, float]:
    """The seed rule, directly: substrings (length 2..max_len, "▁" only first) seen at least twice, followed by two
    different characters or ending a word ("▁" inside a word ends one too); score freq × len. With spm_rule a
    word end is just one more "next character", as in sentencepiece's suffix tree."""
    freq, after = Counter(), {}
    for w, c in counts.items():
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + max_len) + 1):
                s = w[i:j]
                if SPACE in s[1:]:
                    break
                freq[s] += c
                after.setdefault(s, set()).add(w[j] if j < len(w) and w[j] != SPACE else "END")
    return {s: f * len(s) for s, f in freq.items()
            if f >= 2 and (len(after[s]) >= 2 or ("END" in after[s] and not spm_rule))}


@pytest.mark.parametrize("spm_rule", [False, True])
def test_seed_matches_brute_force(spm_rule, monkeypatch):
    monkeypatch.setattr(unigram, "_SPM_SEED_RULE", spm_rule)
    words = list(SMALL)
    counts = np.array([SMALL[w] for w in words], dtype=float)
    strings, log_p, _, _, piece_len, n_chars = unigram._seed(words, counts, 5, 10**6)
    chars = Counter()
    for w, c in SMALL.items():
        for ch in w:
            chars[ch] += c
    want = _brute_force_seed(SMALL, 5, spm_rule)
    assert sorted(strings[:n_chars]) == sorted(chars)
    assert sorted(strings[n_chars:]) == sorted(want)
    score = {**chars, **want}
    total = sum(score.values())
    for s, lp in zip(strings, log_p):
        assert lp == pytest.approx(math.log(score[s] / total))
    assert list(piece_len) == [len(s) for s in strings]
    # seed_size keeps the best-scoring substrings (and every character)
    strings, *_ = unigram._seed(words, counts, 5, n_chars + 3)
    assert sorted(strings[n_chars:]) == sorted(sorted(want, key=lambda s: -want[s])[:3])


def test_e_step_and_viterbi_match_brute_force():
    words = list(SMALL)
    counts = np.array([SMALL[w] for w in words], dtype=float)
    strings, log_p, lat, _, _, _ = unigram._seed(words, counts, 4, 10**6)
    log_p = log_p + np.random.default_rng(0).normal(0, 1.0, len(log_p))  # not the seed's own scores
    model = Unigram(list(zip(strings, log_p.tolist())))
    want, log_lik = np.zeros(len(strings)), 0.0
    for w, c in SMALL.items():
        segs = segmentations(model, w)
        z = sum(math.exp(s) for _, s in segs)
        log_lik += c * math.log(z)
        for ids, s in segs:
            for i in ids:
                want[i] += c * math.exp(s) / z
    got, objective = unigram._e_step(lat, log_p, counts)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert objective == pytest.approx(-log_lik / counts.sum())
    val, best = lat.forward(log_p, viterbi=True)
    lats, pieces = lat.backtrack(best)
    for b, w in enumerate(words):
        path = pieces[lats == b][::-1].tolist()
        assert val[lat.last[b]] == pytest.approx(max(s for _, s in segmentations(model, w)))
        assert "".join(strings[i] for i in path) == w
    # the span lattices: the best segmentation of a piece without the piece itself
    alive = np.ones(len(strings), dtype=bool)
    _, _, _, occurrence, piece_len, _ = unigram._seed(words, counts, 4, 10**6)
    multi = np.flatnonzero(piece_len > 1)
    sub = lat.spans(occurrence[multi], piece_len[multi], alive)
    alt, _ = sub.forward(log_p, viterbi=True)
    for j, p in enumerate(multi):
        others = [s for ids, s in segmentations(model, strings[p]) if ids != [p]]
        assert alt[sub.last[j]] == pytest.approx(max(others))


def test_dead_pieces_left_in_the_lattice_count_for_nothing():
    """Training keeps a lattice whole until a quarter of its edges are dead (log p = -inf): its E-step, Viterbi and
    span lattices then equal those of the filtered lattice, and the Viterbi of a model of the live pieces alone."""
    words = list(SMALL)
    counts = np.array([SMALL[w] for w in words], dtype=float)
    strings, log_p, lat, occurrence, piece_len, n_chars = unigram._seed(words, counts, 4, 10**6)
    rng = np.random.default_rng(2)
    alive = np.r_[np.ones(n_chars, bool), rng.random(len(strings) - n_chars) < 0.6]
    log_p = np.where(alive, log_p + rng.normal(0, 1.0, len(log_p)), -np.inf)
    whole, filtered = lat.keep(alive, min_drop=1.0), lat.keep(alive)
    assert whole is lat and filtered.n_edges < lat.n_edges
    live = Unigram([(s, float(p)) for s, p, a in zip(strings, log_p, alive) if a])
    got = [unigram._e_step(x, log_p, counts)[0] for x in (whole, filtered)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-12, atol=1e-12)
    assert not got[0][~alive].any()
    for x in (whole, filtered):
        _, best = x.forward(log_p, viterbi=True)
        lats, pieces = x.backtrack(best)
        for b, w in enumerate(words):
            assert [strings[i] for i in pieces[lats == b][::-1]] == [live.id_to_token(i) for i in live.tokenize(w)]
    multi = np.flatnonzero(alive & (piece_len > 1))
    subs = [x.spans(occurrence[multi], piece_len[multi], alive) for x in (whole, filtered)]
    alts = [sub.forward(log_p, viterbi=True)[0][sub.last] for sub in subs]
    np.testing.assert_array_equal(alts[0], alts[1])


@pytest.mark.parametrize("target_left", [3, 6])
def test_pruning_matches_the_loss_formula(target_left):
    words = list(SMALL)
    counts = np.array([SMALL[w] for w in words], dtype=float)
    strings, log_p, lat, occurrence, piece_len, n_chars = unigram._seed(words, counts, 4, 10**6)
    log_p = log_p + np.random.default_rng(1).normal(0, 1.0, len(log_p))  # no ties
    model = Unigram(list(zip(strings, log_p.tolist())))
    freq = Counter()
    for w, c in SMALL.items():
        for i in model.tokenize(w):
            freq[i] += c
    total, n_words = sum(freq.values()), sum(SMALL.values())
    loss = {}
    for x in range(n_chars, len(strings)):
        alt_ids, alt = max(((ids, s) for ids, s in segmentations(model, strings[x]) if ids != [x]), key=lambda t: t[1])
        if freq[x] == 0 or alt > log_p[x]:
            continue  # removable
        f, m = freq[x], len(alt_ids)
        log_alt = sum(math.log((freq[y] + f) / (total + (m - 1) * f)) for y in alt_ids)
        loss[x] = f / n_words * (math.log(f / total) - log_alt)
    target = n_chars + target_left
    kept = unigram._prune(lat, log_p, np.ones(len(strings), bool), counts, occurrence, piece_len, n_chars,
                          target, floor=0)
    want = set(range(n_chars)) | set(sorted(loss, key=lambda x: -loss[x])[:target_left])
    assert set(np.flatnonzero(kept)) == want
    # the floor: removable pieces fill up to it, best score first
    kept = unigram._prune(lat, log_p, np.ones(len(strings), bool), counts, occurrence, piece_len, n_chars,
                          len(strings), floor=len(loss) + n_chars + 2)
    rest = sorted(set(range(n_chars, len(strings))) - set(loss), key=lambda x: -log_p[x])[:2]
    assert set(np.flatnonzero(kept)) == set(range(n_chars)) | set(loss) | set(rest)


# --- training ---------------------------------------------------------------------------------------------------

def _metaspace_words(text: str) -> list[str]:
    return [w for w, _ in pre_tokenizers.Metaspace().pre_tokenize_str(text)]


def _count(texts) -> Counter:
    return Counter(w for t in texts for w in _metaspace_words(t))


TOY = ["the quick brown fox jumps over the lazy dog", "the dog sleeps; the fox runs away quickly",
       "tokenization is fun and tokenizers tokenize tokens", "机器学习是人工智能的一个分支", "x = f(y) + 2 * z"]


def test_trained_id_layout_and_round_trip():
    counts = _count(TOY * 3)
    chars = set("".join(counts))
    model = train_unigram(counts, 400, special_tokens=["<s>", "</s>"], byte_fallback=True)
    assert model.vocab_size <= 400
    assert [model.id_to_token(i) for i in range(3)] == ["<s>", "</s>", "<unk>"] and model.unk_id == 2
    assert [model.id_to_token(i) for i in range(3, 259)] == list(BYTE_TOKENS)
    learned = model.pieces[259:]
    assert [s for _, s in learned] == sorted((s for _, s in learned), reverse=True)
    assert chars <= set(model.vocab)
    for w in counts:
        assert "".join(model.id_to_token(i) for i in model.tokenize(w)) == w
    again = train_unigram(counts, 400, special_tokens=["<s>", "</s>"], byte_fallback=True)
    assert again.pieces == model.pieces  # deterministic
    assert Unigram.from_hf_model(json.loads(json.dumps(model.to_hf_model()))).pieces == model.pieces

    m2 = train_unigram(counts, len(chars) + 8, special_tokens=["<pad>", "<unk>"])
    assert m2.vocab_size == len(chars) + 8 and m2.unk_id == 1  # unk among the specials: not added twice


def _english_lines(n_chapters: int, start: int = 0) -> list[str]:
    try:
        chapters = sources.moby_dick_chapters()
    except sources.MissingDataError as err:
        pytest.skip(str(err))
    return [line for c in chapters[start:start + n_chapters] for line in c.split("\n") if line.strip()]


def _chinese_lines(n: int, start: int = 0) -> list[str]:
    try:
        lines = sources.chinese_text().split("\n")
    except sources.MissingDataError:
        return ["机器学习是人工智能的一个分支。", "自然语言处理让计算机理解人类的语言。"]
    return [line for line in lines[start:start + n] if line.strip()]


HELD_OUT_EXTRA = [
    "def train(texts, vocab_size):\n    counts = Counter(texts)  # 计数\n    return {k: v for k, v in counts.items()}",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇯🇵, ½ ² ™ — “quotes” …",
    "Ünïcödé café naïve façade ΣΑΣ İstanbul שלום مرحبا 日本語のテキスト 한국어",
    "   spaced   out\t\ttabs\n\nnewlines <unk> <0x41> ▁▁ ",
]


@pytest.fixture(scope="module")
def texts():
    train_texts = _english_lines(12) + _chinese_lines(120) + HELD_OUT_EXTRA[:1]
    held = _english_lines(2, start=100) + _chinese_lines(40, start=5000) + HELD_OUT_EXTRA
    return train_texts, held


def _encode_ours(model: Unigram, text: str) -> list[int]:
    return [i for w in _metaspace_words(text) for i in model.tokenize(w)]


def _hf_tokenizer(model_json: dict) -> Tokenizer:
    return Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": True},
        "post_processor": None, "decoder": None, "model": model_json}))


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_parity_with_tokenizers_on_a_vocab_trained_by_tokenizers(texts, byte_fallback):
    train_texts, held = texts
    hf = Tokenizer(models.Unigram())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.train_from_iterator(train_texts, trainers.UnigramTrainer(vocab_size=3000, special_tokens=["<unk>"],
                                                                unk_token="<unk>", show_progress=False))
    data = json.loads(hf.to_str())["model"]
    if byte_fallback:  # tokenizers' trainer has no byte fallback: give the trained vocab the 256 byte tokens
        data["vocab"] += [[b, 0.0] for b in BYTE_TOKENS if b not in {p for p, _ in data["vocab"]}]
        data["byte_fallback"] = True
    ours = Unigram.from_hf_model(data)
    hf = _hf_tokenizer(data)
    unknown = 0
    for text in held:
        want = hf.encode(text).ids
        assert _encode_ours(ours, text) == want, text[:60]
        unknown += want.count(ours.unk_id)
    assert unknown > 0 or byte_fallback  # the held-out text does exercise unknown characters


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_parity_with_tokenizers_on_a_vocab_we_trained(texts, byte_fallback):
    train_texts, held = texts
    model = train_unigram(_count(train_texts), 3000, byte_fallback=byte_fallback)
    hf = _hf_tokenizer(model.to_hf_model())  # our tokenizer.json model loads in tokenizers
    for text in train_texts[:50] + held:
        assert _encode_ours(model, text) == hf.encode(text).ids, text[:60]
    if byte_fallback:
        assert model.unk_id not in _encode_ours(model, HELD_OUT_EXTRA[1])


# --- quality against sentencepiece ------------------------------------------------------------------------------

def _quality(model: Unigram, held: Counter) -> tuple[float, float]:
    """Held-out tokens per word and Viterbi log-likelihood per word."""
    n = sum(held.values())
    ids = {w: model.tokenize(w) for w in held}
    return (sum(c * len(ids[w]) for w, c in held.items()) / n,
            sum(c * sum(model.pieces[i][1] for i in ids[w]) for w, c in held.items()) / n)


def test_quality_close_to_sentencepiece(tmp_path, monkeypatch):
    spm = pytest.importorskip("sentencepiece")
    try:
        text = sources.english_text()
    except sources.MissingDataError as err:
        pytest.skip(str(err))
    lines = [line for line in text.split("\n") if line.strip()]
    train_lines, held_lines, size = [], [], 0
    for i, line in enumerate(lines):
        if i % 20 == 0:
            held_lines.append(line)
        elif size < 1_000_000:
            train_lines.append(line)
            size += len(line)
    held_lines = held_lines[:5000]
    words = lambda ls: Counter(SPACE + w for line in ls for w in line.split())  # noqa: E731
    vocab = 2000
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_lines), model_prefix=str(tmp_path / "m"), model_type="unigram",
        vocab_size=vocab, character_coverage=1.0, normalization_rule_name="identity", minloglevel=2,
        num_threads=1, split_by_unicode_script=False, split_by_number=False, max_sentence_length=1 << 20)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    theirs = Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], unk_id=sp.unk_id())
    ours = train_unigram(words(train_lines), vocab, special_tokens=["<unk>", "<s>", "</s>"])
    held = words(held_lines)
    (our_len, our_ll), (sp_len, sp_ll) = _quality(ours, held), _quality(theirs, held)
    overlap = len(set(ours.vocab) & set(theirs.vocab)) / vocab
    print(f"tokens/word ours {our_len:.4f} spm {sp_len:.4f}; loglik/word ours {our_ll:.3f} spm {sp_ll:.3f}; "
          f"vocab overlap {overlap:.3f}")
    assert our_len <= sp_len * 1.03 and our_ll >= sp_ll * 1.03  # (log-likelihoods are negative)
    assert overlap >= 0.7
    # With sentencepiece's own seed rule (see unigram._SPM_SEED_RULE) EM and pruning land on nearly its vocab.
    monkeypatch.setattr(unigram, "_SPM_SEED_RULE", True)
    same_rule = train_unigram(words(train_lines), vocab, special_tokens=["<unk>", "<s>", "</s>"])
    assert len(set(same_rule.vocab) & set(theirs.vocab)) / vocab >= 0.95


# --- errors -----------------------------------------------------------------------------------------------------

def test_training_errors():
    with pytest.raises(ValueError, match="empty"):
        train_unigram({}, 100)
    from llmlab.tokenizer import train

    for texts in ([], ["", ""]):  # the public path: nothing survives pre-tokenization
        with pytest.raises(ValueError, match="cannot train a tokenizer on an empty corpus"):
            train(texts, kind="unigram", vocab_size=100)
    with pytest.raises(ValueError, match="too small.*3 distinct characters"):
        train_unigram({"▁ab": 3}, 3)
    with pytest.raises(ValueError, match="too small"):
        train_unigram({"▁ab": 3}, 200, byte_fallback=True)
    with pytest.raises(ValueError, match="count"):
        train_unigram({"▁ab": -1}, 100)
    with pytest.raises(ValueError, match="non-empty strings"):
        train_unigram({"": 2}, 100)
    with pytest.raises(ValueError, match="shrinking_factor"):
        train_unigram({"▁ab": 2}, 100, shrinking_factor=1.0)
    with pytest.raises(ValueError, match="max_piece_length"):
        train_unigram({"▁ab": 2}, 100, max_piece_length=0)
    with pytest.raises(ValueError, match="special_tokens"):
        train_unigram({"▁ab": 2}, 100, special_tokens=["<s>", "<s>"])


@pytest.mark.parametrize("data, key", [
    ([["a", 0.0]], "dict"),
    ({"type": "BPE", "vocab": [["a", 0.0]]}, "'type'"),
    ({"type": "Unigram"}, "'vocab'"),
    ({"type": "Unigram", "vocab": {"a": 0.0}}, "'vocab'"),
    ({"type": "Unigram", "vocab": [["a", 0.0], ["b"]]}, r"'vocab'\[1\]"),
    ({"type": "Unigram", "vocab": [["a", "x"]]}, "score"),
    ({"type": "Unigram", "vocab": [["a", float("nan")]]}, "finite"),
    ({"type": "Unigram", "vocab": [["a", 0.0], ["a", -1.0]]}, "twice"),
    ({"type": "Unigram", "vocab": []}, "at least one piece"),
    ({"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": "0"}, "'unk_id'"),
    ({"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 3}, "unk_id"),
    ({"type": "Unigram", "vocab": [["a", 0.0]], "byte_fallback": "yes"}, "'byte_fallback'"),
    ({"type": "Unigram", "vocab": [["a", 0.0]], "byte_fallback": True}, "256 byte tokens"),
])
def test_malformed_hf_model(data, key):
    with pytest.raises(ValueError, match=key):
        Unigram.from_hf_model(data)


def test_model_argument_errors():
    m = Unigram([("a", -1.0), ("b", -2.0)])
    with pytest.raises(ValueError, match="n >= 1"):
        m.nbest("ab", 0)
    with pytest.raises(ValueError, match="alpha"):
        m.sample("ab", -1.0)
    with pytest.raises(ValueError, match="non-empty string"):
        Unigram([("", 0.0)])
    assert m.tokenize("") == [] and m.nbest("", 2) == [([], 0.0)] and m.sample("", 0.1) == []
