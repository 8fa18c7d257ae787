"""Generation metrics against their reference implementations: BLEU and chrF against sacrebleu, ROUGE
against Google's rouge-score, SQuAD EM/F1 against hand cases of the official script's definition."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmlab.eval import (
    bleu, chrf, exact_match, normalize_answer, qa_f1, rouge, rouge_tokenize, sentence_bleu, squad,
    tokenize_bleu,
)

EN_HYPS = [
    "The cat sat on the mat.",
    "It is a guide to action that ensures the military always obeys the commands of the party.",
    "He said: \"We'll pay $3,000.50 by 2021-05-03 (or earlier)!\"",
    "Hello , world .",
    "",
    "zzz qqq",
    "a",
]
EN_REFS = [
    ["The cat is on the mat.", "There is a cat on the mat!"],
    ["It is a guide to action which ensures that the military always obeys the commands of the party.",
     "It is the guiding principle which guarantees the military forces always being under the command of "
     "the Party.", "It is the practical guide for the army always to heed the directions of the party."],
    ["He said, \"We will pay $3,000.50 by 2021-05-03 &amp; not later.\""],
    ["Hello, world.", "Hello world!"],
    ["Something was here."],
    ["no overlap whatsoever", "none"],
    ["a b"],
]
ZH_HYPS = ["我们明天去北京参观故宫。", "他说：“今天天气很好”，我们去公园吧！", "2021年GDP增长了8.1%", "猫"]
ZH_REFS = [["我们明天要去北京参观故宫。", "明天我们去北京看故宫。"], ["他说今天天气很好，我们去公园吧。"],
           ["2021年GDP增长8.1%。"], ["狗"]]
SMOOTHS = ["exp", "floor", "add-k", "none"]


def streams(refs):
    """Our per-item references -> sacrebleu's reference streams (None where an item has fewer)."""
    return [list(s) for s in itertools.zip_longest(*refs)]


def assert_same_bleu(ours, theirs):
    assert ours.score == pytest.approx(theirs.score, rel=0, abs=1e-9)
    assert list(ours.precisions) == pytest.approx(theirs.precisions, rel=0, abs=1e-9)
    assert (ours.bp, ours.sys_len, ours.ref_len) == (theirs.bp, theirs.sys_len, theirs.ref_len)


# ---------------------------------------------------------------------------------------------- BLEU
@pytest.mark.parametrize("smooth", SMOOTHS)
@pytest.mark.parametrize("effective_order", [False, True])
def test_corpus_bleu_matches_sacrebleu(smooth, effective_order):
    for hyps, refs, tok in ((EN_HYPS, EN_REFS, "13a"), (ZH_HYPS, ZH_REFS, "zh"), (EN_HYPS, EN_REFS, "intl"),
                            (EN_HYPS, EN_REFS, "none")):
        ours = bleu(hyps, refs, tokenize=tok, smooth=smooth, effective_order=effective_order)
        theirs = sacrebleu.corpus_bleu(hyps, streams(refs), tokenize=tok, smooth_method=smooth,
                                       use_effective_order=effective_order)
        assert_same_bleu(ours, theirs)
        assert ours.score == theirs.score   # in fact bit for bit: the same arithmetic in the same order
        if smooth != "add-k":   # sacrebleu's add-k adds k into the counts it reports; ours stay raw
            assert list(ours.counts) == theirs.counts and list(ours.totals) == theirs.totals


@pytest.mark.parametrize("smooth", SMOOTHS)
def test_sentence_bleu_matches_sacrebleu(smooth):
    for hyps, refs, tok in ((EN_HYPS, EN_REFS, "13a"), (ZH_HYPS, ZH_REFS, "zh")):
        for hyp, ref in zip(hyps, refs):
            assert_same_bleu(sentence_bleu(hyp, ref, tokenize=tok, smooth=smooth),
                             sacrebleu.sentence_bleu(hyp, ref, tokenize=tok, smooth_method=smooth))


def test_bleu_options_match_sacrebleu():
    hyps = ["THE Cat sat on the MAT today", "a b c d e f"]
    refs = [["the cat sat on the mat"], ["a b c d e f g h"]]
    for kw, skw in (({"lowercase": True}, {"lowercase": True}),
                    ({"smooth": "floor", "smooth_value": 0.5}, {"smooth_method": "floor", "smooth_value": 0.5}),
                    ({"smooth": "add-k", "smooth_value": 3}, {"smooth_method": "add-k", "smooth_value": 3})):
        assert_same_bleu(bleu(hyps, refs, **kw), sacrebleu.corpus_bleu(hyps, streams(refs), **skw))


def test_bleu_edge_cases():
    empty = bleu([""], [["the reference"]])
    assert (empty.score, empty.bp, empty.sys_len, empty.ref_len) == (0.0, 0.0, 0, 2)
    none = bleu(["xx yy zz"], ["aa bb cc"])
    assert none.score == 0.0 and none.precisions == (0.0,) * 4 and none.bp == 1.0
    perfect = bleu(["the same sentence here"], ["the same sentence here"])
    assert perfect.score == pytest.approx(100.0) and perfect.bp == 1.0
    # The closest reference length wins, the shorter one on ties (4 tokens: refs of 3 and 5 -> 3).
    assert bleu(["a b c d"], [["a b c", "a b c d e"]]).ref_len == 3
    # A single string per item is a single reference.
    assert bleu(["a b c d"], ["a b c d"]).score == bleu(["a b c d"], [["a b c d"]]).score


def test_bleu_tokenizers_match_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
    lines = EN_HYPS + [r for refs in EN_REFS for r in refs] + ZH_HYPS + [
        "x-y 3-4 a.b 1.5 1,000 end.", "&quot;quoted&quot; &lt;tag&gt; <skipped> line-\nbreak",
        "é, ü… — “curly” ½ ™ € ①", "東京は大阪より大きい。서울은 크다.", "tabs\tand  spaces \u3000 wide"]
    for line in lines:
        assert tokenize_bleu(line, "13a") == Tokenizer13a()(line)
        assert tokenize_bleu(line, "intl") == TokenizerV14International()(line)
        assert tokenize_bleu(line, "zh") == TokenizerZh()(line)


def test_zh_character_set_matches_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    from llmlab.eval.generation import _ZH_CHARS
    # The whole BMP, and a sample of the supplementary ideographs sacrebleu's table meant to include.
    code_points = [*range(0x10000), *range(0x10000, 0x30000, 97)]
    ours = {cp for cp in code_points if _ZH_CHARS.fullmatch(chr(cp))}
    theirs = {cp for cp in code_points if TokenizerZh._is_chinese_char(chr(cp))}
    assert ours == theirs


def test_bleu_input_errors():
    with pytest.raises(ValueError, match="one entry per hypothesis"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        bleu([], [])
    with pytest.raises(ValueError, match="list of strings"):
        bleu("a b", ["a b"])
    with pytest.raises(ValueError, match="unknown smooth"):
        bleu(["a"], ["a"], smooth="laplace")
    with pytest.raises(ValueError, match="unknown tokenize"):
        bleu(["a"], ["a"], tokenize="moses")
    with pytest.raises(ValueError, match="item 0"):
        bleu(["a"], [[]])


# ---------------------------------------------------------------------------------------------- chrF
@pytest.mark.parametrize("word_order", [0, 2])
@pytest.mark.parametrize("whitespace", [False, True])
@pytest.mark.parametrize("eps_smoothing", [False, True])
def test_chrf_matches_sacrebleu(word_order, whitespace, eps_smoothing):
    for hyps, refs in ((EN_HYPS, EN_REFS), (ZH_HYPS, ZH_REFS)):
        ours = chrf(hyps, refs, word_order=word_order, whitespace=whitespace, eps_smoothing=eps_smoothing)
        theirs = sacrebleu.corpus_chrf(hyps, streams(refs), word_order=word_order,
                                       remove_whitespace=not whitespace, eps_smoothing=eps_smoothing)
        assert ours.score == pytest.approx(theirs.score, rel=0, abs=1e-9)
        for hyp, ref in zip(hyps, refs):   # sentence level too (edge cases: empty, no overlap)
            ours = chrf([hyp], [ref], word_order=word_order, whitespace=whitespace, eps_smoothing=eps_smoothing)
            theirs = sacrebleu.sentence_chrf(hyp, ref, word_order=word_order, remove_whitespace=not whitespace,
                                             eps_smoothing=eps_smoothing)
            assert ours.score == pytest.approx(theirs.score, rel=0, abs=1e-9)


def test_chrf_options_match_sacrebleu():
    hyps, refs = ["The CAT sat (quietly) on the mat."], [["the cat sat quietly on a mat"]]
    theirs = sacrebleu.metrics.CHRF(char_order=4, word_order=1, beta=1, lowercase=True)
    ours = chrf(hyps, refs, char_order=4, word_order=1, beta=1, lowercase=True)
    assert ours.score == pytest.approx(theirs.corpus_score(hyps, streams(refs)).score, rel=0, abs=1e-9)


# --------------------------------------------------------------------------------------------- ROUGE
ROUGE_PAIRS = [  # (prediction, reference)
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."),
    ("police killed the gunman\nthe gunman was shot", "the gunman police killed\npolice shot the gunman dead"),
    ("a b c d e a b\nc d a\n\nx y", "a c b d\ne a b c\nd d"),
    ("", "an empty prediction"),
    ("Running runners ran quickly; generously generalized.", "The runner runs quick, generally generous."),
    ("It's 3:30 p.m. -- the U.S. markets (NYSE) closed 2.5% higher.", "US markets closed 2.5 percent up at 3:30."),
]
TYPES = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]


def assert_same_rouge(ours, theirs):
    for name in TYPES:
        assert (ours[name].precision, ours[name].recall, ours[name].fmeasure) == tuple(theirs[name]), name


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score(use_stemmer):
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=use_stemmer)
    # We ship no stemmer; nltk's Porter stemmer (what rouge-score uses) plugs in.
    stem = None
    if use_stemmer:
        from nltk.stem.porter import PorterStemmer
        stem = PorterStemmer().stem
    for pred, ref in ROUGE_PAIRS:
        assert_same_rouge(rouge(pred, ref, types=TYPES, stemmer=stem), scorer.score(ref, pred))
        assert_same_rouge(rouge(ref, pred, types=TYPES, stemmer=stem), scorer.score(pred, ref))
    refs = [ref for _, ref in ROUGE_PAIRS]
    for pred, _ in ROUGE_PAIRS:   # several references: the best F per type, like score_multi
        assert_same_rouge(rouge(pred, refs, types=TYPES, stemmer=stem), scorer.score_multi(refs, pred))


def test_rouge_unicode_mode_scores_chinese():
    pred, ref = "我喜欢猫", "我喜欢狗"
    assert all(s.fmeasure == 0.0 for s in rouge_scorer.RougeScorer(TYPES).score(ref, pred).values())
    assert all(s.fmeasure == 0.0 for s in rouge(pred, ref, types=TYPES).values())   # same as rouge-score
    ours = rouge(pred, ref, types=TYPES, mode="unicode")
    # By hand: tokens 我 喜 欢 猫 vs 我 喜 欢 狗. Unigrams 3/4 and 3/4; bigrams (我喜, 喜欢) 2/3; LCS 3.
    assert ours["rouge1"].fmeasure == pytest.approx(0.75)
    assert ours["rouge2"].precision == pytest.approx(2 / 3) and ours["rouge2"].recall == pytest.approx(2 / 3)
    assert ours["rouge3"].fmeasure == pytest.approx(0.5)
    assert ours["rougeL"].fmeasure == pytest.approx(0.75) and ours["rougeLsum"].fmeasure == pytest.approx(0.75)


def test_rouge_unicode_tokenizer():
    assert rouge_tokenize("Café au lait, naïve Ωmega_x 42 ünïcödé", mode="unicode") == [
        "café", "au", "lait", "naïve", "ωmega", "x", "42", "ünïcödé"]
    assert rouge_tokenize("我在東京タワー看ひらがな test123 서울역", mode="unicode") == [
        "我", "在", "東", "京", "タ", "ワ", "ー", "看", "ひ", "ら", "が", "な", "test123", "서울역"]
    assert rouge_tokenize("Café 我", mode="rouge_score") == ["caf"]   # rouge-score drops non-ASCII
    # English text tokenizes the same way in both modes.
    text = ROUGE_PAIRS[0][0]
    assert rouge_tokenize(text, mode="unicode") == rouge_tokenize(text)


def test_rouge_input_errors():
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        rouge("a", "a", types=["rougeW"])
    with pytest.raises(ValueError, match="unknown mode"):
        rouge("a", "a", mode="bytes")
    with pytest.raises(ValueError, match="references is empty"):
        rouge("a", [])


# --------------------------------------------------------------------------------------------- SQuAD
def test_squad_normalization():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("Theory of the a-team") == "theory of ateam"   # "a" inside words survives


def test_exact_match_and_f1_hand_cases():
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "La tour Eiffel"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # pred "eiffel" vs gold "eiffel tower": P = 1, R = 1/2, F1 = 2/3.
    assert qa_f1("Eiffel", "Eiffel Tower") == pytest.approx(2 / 3)
    # Max over golds: "in paris france" vs "paris" -> P = 1/3, R = 1, F1 = 0.5; vs "in paris" -> P = 2/3,
    # R = 1, F1 = 0.8.
    assert qa_f1("in Paris, France", ["Paris", "in Paris"]) == pytest.approx(0.8)
    # Repeated tokens count with multiplicity: pred "a b b" -> "b b" vs "b": P = 1/2, R = 1, F1 = 2/3.
    assert qa_f1("a b b", "b") == pytest.approx(2 / 3)
    assert qa_f1("nothing shared", "completely different") == 0.0
    # SQuAD 2.0: an empty (normalized) side scores 1 only when both are empty.
    assert qa_f1("", "") == 1.0 and qa_f1("The", "") == 1.0 and qa_f1("", "answer") == 0.0
    scores = squad(["Eiffel", "Paris"], [["Eiffel Tower"], ["paris", "Paris, France"]])
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 100 * (2 / 3 + 1) / 2})
    with pytest.raises(ValueError, match="equally long"):
        squad(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="answers is empty"):
        qa_f1("a", [])


def test_reference_libraries_are_only_oracles():
    """The implementation imports none of the libraries it is checked against."""
    import llmlab.eval
    for path in Path(llmlab.eval.__file__).parent.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), flags=re.M)
        banned = {"sacrebleu", "rouge_score", "sklearn", "scipy", "statsmodels", "nltk"}
        assert not banned & {name.split(".")[0] for name in imports}, path.name
