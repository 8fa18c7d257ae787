"""Metrics for generated text: BLEU, chrF/chrF++, ROUGE and SQuAD exact match / token F1.

BLEU and chrF reproduce sacrebleu 2.x bit for bit (tests compare against it), ROUGE reproduces Google's
rouge-score package (``mode="rouge_score"``) or scores any script (``mode="unicode"``). Our own code:
the reference libraries are only test oracles.

References are given per item: ``references[i]`` is a string or a list of strings for ``hypotheses[i]``
(sacrebleu takes the transpose, one stream per reference).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import regex

__all__ = [
    "BLEUScore", "CHRFScore", "RougeScore", "bleu", "sentence_bleu", "chrf", "tokenize_bleu", "rouge",
    "rouge_tokenize", "exact_match", "qa_f1", "squad", "normalize_answer",
]


def _per_item_refs(hypotheses: Sequence[str], references: Sequence) -> list[list[str]]:
    if isinstance(hypotheses, str):
        raise ValueError("hypotheses must be a list of strings (for one sentence use sentence_bleu or [hyp])")
    if len(hypotheses) == 0:
        raise ValueError("hypotheses is empty: pass at least one hypothesis")
    if isinstance(references, str) or len(references) != len(hypotheses):
        raise ValueError(f"references must be a list with one entry per hypothesis ({len(hypotheses)}), "
                         "each a string or a list of strings")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, (h, rs) in enumerate(zip(hypotheses, refs)):
        if not isinstance(h, str) or not rs or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"item {i}: the hypothesis must be a string and its references a non-empty "
                             "list of strings")
    return refs


# ---------------------------------------------------------------- BLEU tokenizers (mteval-v13a, zh, intl)
# mteval-v13a.pl: split off ASCII symbols except ' - . , ; split . and , unless between digits; split a
# dash after a digit.
_MTEVAL_RULES = [
    (re.compile("([" + re.escape("".join(sorted(set(string.punctuation) - set("'-.,")))) + " ])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
# The characters sacrebleu's "zh" tokenizer isolates. Its table meant U+20000.. and U+2F800.. but those
# literals are two-character strings in Python, so the effective set is U+2001-2A6D and none above U+FFFF;
# we match the effective set (scores must agree), listed here merged.
_ZH_CHARS = re.compile("([\u2001-\u2a6d\u2e80-\u2fdf\u2ff0-\u303f\u3100-\u312f\u31a0-\u31ef"
                       "\u3200-\u4db5\u4e00-\u9fbb\uf900-\ufa2d\ufa30-\ufa6a\ufa70-\ufad9\ufe10-\ufe1f"
                       "\ufe30-\ufe4f\uff00-\uffef])")
# mteval-v14 "international": split Unicode punctuation unless between digits, and every symbol.
_INTL_RULES = [
    (regex.compile(r"(\P{N})(\p{P})"), r"\1 \2 "),
    (regex.compile(r"(\p{P})(\P{N})"), r" \1 \2"),
    (regex.compile(r"(\p{S})"), r" \1 "),
]


def _apply(rules, line: str) -> str:
    for pattern, repl in rules:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def tokenize_bleu(line: str, tokenize: str = "13a") -> str:
    """The line as BLEU sees it: tokens joined by single spaces ("13a", "zh", "intl" or "none")."""
    if tokenize == "13a":
        line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            line = line.replace(entity, char)
        return _apply(_MTEVAL_RULES, f" {line} ")
    if tokenize == "zh":
        return _apply(_MTEVAL_RULES, _ZH_CHARS.sub(r" \1 ", line.strip()))
    if tokenize == "intl":
        return _apply(_INTL_RULES, line)
    if tokenize == "none":
        return line
    raise ValueError(f"unknown tokenize={tokenize!r}: use '13a', 'zh', 'intl' or 'none'")


# ---------------------------------------------------------------------------------------------- BLEU
_SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}


@dataclass(frozen=True)
class BLEUScore:
    """BLEU on a 0-100 scale; precisions in percent; counts/totals: matched/hypothesis n-grams per order."""

    score: float
    precisions: tuple[float, ...]
    bp: float
    sys_len: int
    ref_len: int
    counts: tuple[int, ...]
    totals: tuple[int, ...]


def _ngrams(tokens: list, n_min: int, n_max: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(n_min, n_max + 1) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence, *, tokenize: str = "13a", smooth: str = "exp",
         smooth_value: float | None = None, lowercase: bool = False, effective_order: bool = False,
         max_order: int = 4) -> BLEUScore:
    """Corpus BLEU (Papineni et al. 2002) as sacrebleu.corpus_bleu computes it.

    Clipped n-gram counts are summed over the corpus (clip = max count over an item's references); the
    reference length of an item is the one closest to the hypothesis (the shorter on ties).
    ``smooth`` is one of Chen & Cherry (2014)'s methods: "exp" (NIST, method 3), "floor" (method 1,
    default 0.1), "add-k" (method 2, default 1) or "none". ``effective_order`` averages only the orders
    the hypotheses have n-grams for (sentence BLEU turns it on).
    """
    if smooth not in _SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth={smooth!r}: use one of {sorted(_SMOOTH_DEFAULTS)}")
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    refs = _per_item_refs(hypotheses, references)

    def prep(s: str) -> list[str]:
        return tokenize_bleu((s.lower() if lowercase else s).rstrip(), tokenize).split()

    sys_len = ref_len = 0
    correct, total = [0] * max_order, [0] * max_order
    for hyp, item_refs in zip(hypotheses, refs):
        ref_toks = [prep(ref) for ref in item_refs]
        lens, ref_counts = [len(t) for t in ref_toks], Counter()
        for toks in ref_toks:
            ref_counts |= _ngrams(toks, 1, max_order)   # | keeps the max count per n-gram
        hyp_toks = prep(hyp)
        sys_len += len(hyp_toks)
        ref_len += min(lens, key=lambda r: (abs(r - len(hyp_toks)), r))
        for gram, count in _ngrams(hyp_toks, 1, max_order).items():
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, ref_counts[gram])
    return _bleu_from_stats(correct, total, sys_len, ref_len, smooth, smooth_value, effective_order)


def _bleu_from_stats(correct, total, sys_len, ref_len, smooth, smooth_value, effective_order) -> BLEUScore:
    order = len(correct)
    counts, totals = tuple(correct), tuple(total)
    k = _SMOOTH_DEFAULTS[smooth] if smooth_value is None else smooth_value
    # BP = exp(1 - r/c) when c < r (c = 0 gives 0).
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * order
    if not any(correct):
        return BLEUScore(0.0, tuple(precisions), bp, sys_len, ref_len, counts, totals)
    correct, total = list(correct), list(total)
    exp_denominator, eff_order = 1.0, order
    for n in range(order):
        if smooth == "add-k" and n > 0:                    # p_n = (m_n + k) / (l_n + k) for n >= 2
            correct[n] += k
            total[n] += k
        if total[n] == 0:
            break
        if effective_order:
            eff_order = n + 1
        if correct[n] == 0:
            if smooth == "exp":                            # p_n = 1 / (2^j l_n) for the j-th zero order
                exp_denominator *= 2
                precisions[n] = 100.0 / (exp_denominator * total[n])
            elif smooth == "floor":                        # p_n = eps / l_n
                precisions[n] = 100.0 * k / total[n]
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    # BLEU = BP * exp(mean log p_n); a zero precision counts as log = -9999999999 (score 0), as sacrebleu.
    log_sum = sum(math.log(p) if p != 0.0 else -9999999999 for p in precisions[:eff_order])
    return BLEUScore(bp * math.exp(log_sum / eff_order), tuple(precisions), bp, sys_len, ref_len, counts,
                     totals)


def sentence_bleu(hypothesis: str, references: str | Sequence[str], **kwargs) -> BLEUScore:
    """BLEU of one sentence (sacrebleu.sentence_bleu: effective order on unless told otherwise)."""
    kwargs.setdefault("effective_order", True)
    return bleu([hypothesis], [references], **kwargs)


# ---------------------------------------------------------------------------------------------- chrF
@dataclass(frozen=True)
class CHRFScore:
    """chrF (word_order 0) or chrF++ (word_order 2) on a 0-100 scale."""

    score: float
    char_order: int
    word_order: int
    beta: float


def _chrf_words(sentence: str) -> list[str]:
    # Popović's chrF++ word split: one leading or trailing ASCII punctuation mark becomes its own word.
    words = []
    for w in sentence.split():
        if len(w) > 1 and w[-1] in string.punctuation:
            words += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in string.punctuation:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def _chrf_ngrams(sentence: str, char_order: int, word_order: int, whitespace: bool) -> list[Counter]:
    chars = sentence if whitespace else "".join(sentence.split())
    grams = [Counter(chars[i:i + n] for i in range(len(chars) - n + 1)) for n in range(1, char_order + 1)]
    words = _chrf_words(sentence) if word_order else []
    grams += [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
              for n in range(1, word_order + 1)]
    return grams


def _chrf_f(stats: list[tuple[int, int, int]], beta: float, eps_smoothing: bool) -> float:
    """F_beta from per-order (hyp, ref, match) counts, averaged as sacrebleu does."""
    b2, eps, f_sum, avg_p, avg_r, n_eff = beta ** 2, 1e-16, 0.0, 0.0, 0.0, 0
    for n_hyp, n_ref, n_match in stats:
        p = n_match / n_hyp if n_hyp > 0 else eps
        r = n_match / n_ref if n_ref > 0 else eps
        denom = b2 * p + r
        f_sum += (1 + b2) * p * r / denom if denom > 0 else eps
        if n_hyp > 0 and n_ref > 0:
            avg_p, avg_r, n_eff = avg_p + p, avg_r + r, n_eff + 1
    if eps_smoothing:           # chrF++.py/NLTK/Moses: the mean of per-order F scores
        return 100 * f_sum / len(stats)
    if n_eff == 0 or avg_p + avg_r == 0:   # default: F_beta of P and R averaged over effective orders
        return 0.0
    avg_p, avg_r = avg_p / n_eff, avg_r / n_eff
    return 100 * ((1 + b2) * avg_p * avg_r / (b2 * avg_p + avg_r))


def chrf(hypotheses: Sequence[str], references: Sequence, *, char_order: int = 6, word_order: int = 0,
         beta: float = 2, lowercase: bool = False, whitespace: bool = False,
         eps_smoothing: bool = False) -> CHRFScore:
    """Corpus chrF (Popović 2015) / chrF++ (word_order=2, Popović 2017) as sacrebleu.corpus_chrf.

    Character n-grams ignore whitespace unless ``whitespace``; per item the reference with the best
    sentence F counts; (hyp, ref, match) counts are summed over the corpus before the F_beta.
    """
    if char_order < 1 or word_order < 0:
        raise ValueError(f"need char_order >= 1 and word_order >= 0, got {char_order}, {word_order}")
    refs = _per_item_refs(hypotheses, references)
    totals = [[0, 0, 0] for _ in range(char_order + word_order)]
    for hyp, item_refs in zip(hypotheses, refs):
        hyp_grams = _chrf_ngrams(hyp.lower() if lowercase else hyp, char_order, word_order, whitespace)
        best, best_f = None, -1.0
        for ref in item_refs:
            ref_grams = _chrf_ngrams(ref.lower() if lowercase else ref, char_order, word_order, whitespace)
            stats = [(sum(h.values()) if r else 0, sum(r.values()), sum((h & r).values()))
                     for h, r in zip(hyp_grams, ref_grams)]
            f = _chrf_f(stats, beta, eps_smoothing)
            if f > best_f:
                best, best_f = stats, f
        totals = [[t + b for t, b in zip(acc, s)] for acc, s in zip(totals, best)]
    return CHRFScore(_chrf_f(totals, beta, eps_smoothing), char_order, word_order, beta)


# --------------------------------------------------------------------------------------------- ROUGE
@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_UNICODE_TOKEN = regex.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def rouge_tokenize(text: str, mode: str = "rouge_score", stemmer: Callable[[str], str] | None = None):
    """Tokens ROUGE compares.

    "rouge_score": rouge-score's default tokenizer (lowercase, anything but [a-z0-9] is a separator, so
    non-ASCII text vanishes). "unicode": lowercase, runs of letters/digits in any script, and every Han,
    Hiragana or Katakana character a token of its own. ``stemmer`` (e.g. a Porter stemmer's ``stem``)
    applies to tokens longer than 3 characters, as in rouge-score.
    """
    text = text.lower()
    if mode == "rouge_score":
        tokens = _NON_ALNUM.sub(" ", text).split()
    elif mode == "unicode":
        tokens = _UNICODE_TOKEN.findall(text)
    else:
        raise ValueError(f"unknown mode={mode!r}: use 'rouge_score' or 'unicode'")
    if stemmer is not None:
        tokens = [stemmer(t) if len(t) > 3 else t for t in tokens]
        if mode == "rouge_score":   # rouge-score drops what the stemmer turns into non-[a-z0-9] tokens
            tokens = [t for t in tokens if re.fullmatch("[a-z0-9]+", t)]
    return tokens


def _prf(hits: int, n_pred: int, n_ref: int) -> RougeScore:
    p, r = hits / max(n_pred, 1), hits / max(n_ref, 1)
    return RougeScore(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def _lcs_table(a: list, b: list) -> list[list[int]]:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        row, prev = t[i], t[i - 1]
        for j, y in enumerate(b, 1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    return t


def _lcs_positions(ref: list, cand: list) -> set[int]:
    """Positions in ref of one LCS, traced back the way rouge-score does (ties move up in ref)."""
    t, i, j, out = _lcs_table(ref, cand), len(ref), len(cand), set()
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            out.add(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out


def _rouge_lsum(ref_sents: list[list[str]], pred_sents: list[list[str]]) -> RougeScore:
    # Lin (2004) §3.2: summary-level LCS; each reference sentence's union LCS with all predicted
    # sentences, every token counted at most as often as it occurs in either summary.
    m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if not ref_sents or not pred_sents or not m or not n:
        return RougeScore(0.0, 0.0, 0.0)
    left_r, left_p = Counter(t for s in ref_sents for t in s), Counter(t for s in pred_sents for t in s)
    hits = 0
    for ref in ref_sents:
        for i in sorted(set().union(*(_lcs_positions(ref, c) for c in pred_sents))):
            tok = ref[i]
            if left_p[tok] > 0 and left_r[tok] > 0:
                hits += 1
                left_p[tok] -= 1
                left_r[tok] -= 1
    return _prf(hits, n, m)


def _rouge_pair(pred: str, ref: str, types: Sequence[str], tok: Callable[[str], list]) -> dict:
    p_toks, r_toks = tok(pred), tok(ref)
    out = {}
    for name in types:
        if name == "rougeL":            # F of LCS(ref, pred)/|pred| and LCS/|ref|
            lcs = _lcs_table(r_toks, p_toks)[-1][-1] if p_toks and r_toks else 0
            out[name] = _prf(lcs, len(p_toks), len(r_toks))
        elif name == "rougeLsum":       # sentences are the newline-separated lines
            def sents(text):
                return [tok(s) for s in text.split("\n") if s]
            out[name] = _rouge_lsum(sents(ref), sents(pred))
        else:                           # ROUGE-N: clipped n-gram overlap
            n = int(name[5:])
            pg, rg = _ngrams(p_toks, n, n), _ngrams(r_toks, n, n)
            out[name] = _prf(sum((pg & rg).values()), sum(pg.values()), sum(rg.values()))
    return out


def rouge(prediction: str, references: str | Sequence[str], *,
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"), mode: str = "rouge_score",
          stemmer: Callable[[str], str] | None = None) -> dict[str, RougeScore]:
    """ROUGE-N, ROUGE-L and ROUGE-Lsum (Lin 2004) of one prediction, as rouge-score's RougeScorer.

    With several references each type keeps the reference with the highest F (the first on ties), as
    ``RougeScorer.score_multi``. No stemmer is built in: pass one (nltk's ``PorterStemmer().stem``
    reproduces rouge-score's ``use_stemmer=True``).
    """
    for name in types:
        if name not in ("rougeL", "rougeLsum") and not re.fullmatch(r"rouge[1-9]", name):
            raise ValueError(f"unknown ROUGE type {name!r}: use rouge1..rouge9, rougeL or rougeLsum")
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references is empty: pass at least one reference")
    tok = partial(rouge_tokenize, mode=mode, stemmer=stemmer)
    per_ref = [_rouge_pair(prediction, ref, types, tok) for ref in refs]
    return {name: max((s[name] for s in per_ref), key=lambda x: x.fmeasure) for name in types}


# ------------------------------------------------------------------------------- SQuAD EM and token F1
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization (Rajpurkar et al. 2016): lowercase, drop punctuation, drop a/an/the, squeeze."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answers(answers: str | Sequence[str]) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("answers is empty: pass at least one gold answer")
    return golds


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _answers(answers)))


def qa_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Max over gold answers of the bag-of-tokens F1; an empty side scores 1 only if both are empty
    (SQuAD 2.0's rule for unanswerable questions)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in map(lambda a: normalize_answer(a).split(), _answers(answers)):
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def squad(predictions: Sequence[str], answers: Sequence) -> dict[str, float]:
    """Corpus exact match and F1 in percent, as the official SQuAD evaluation script reports them."""
    if isinstance(predictions, str) or len(predictions) == 0 or len(predictions) != len(answers):
        raise ValueError(f"need equally long, non-empty lists: {len(predictions)} predictions, "
                         f"{len(answers)} answer lists")
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers))
    f1 = sum(qa_f1(p, a) for p, a in zip(predictions, answers))
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}
