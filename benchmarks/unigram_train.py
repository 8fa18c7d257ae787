"""Unigram training: llmlab (pure Python + numpy) vs sentencepiece (C++), same English text, same run.

Corpus: State of the Union + Moby Dick (llmlab.data.sources; --lang zh: People's Daily, --lang mix: both, about
17.5 MB), split into lines; every 20th line is held out.
Both trainers see the same words (whitespace split, "▁" prefix; sentencepiece with the identity normalizer and
character_coverage=1.0, so neither drops characters). Quality is measured on the held-out words with one
encoder (llmlab's Viterbi) over each vocabulary: pieces per word and Viterbi log-likelihood per word.
sentencepiece is run twice: with its defaults (pieces may not mix Unicode scripts or digits with letters) and
with split_by_unicode_script/split_by_number off, which is the rule llmlab's trainer uses.

    python benchmarks/unigram_train.py [--mb 4] [--vocab 8000] [--lang en|zh|mix] [--progress]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

from llmlab.data import sources
from llmlab.tokenizer.unigram import SPACE, Unigram, train_unigram


def corpus(mb: float, lang: str = "en") -> tuple[list[str], list[str]]:
    text = {"en": sources.english_text, "zh": sources.chinese_text,
            "mix": lambda: sources.english_text() + "\n" + sources.chinese_text()}[lang]()
    lines = [line for line in text.split("\n") if line.strip()]
    train_lines, held, size = [], [], 0
    for i, line in enumerate(lines):
        if i % 20 == 0:
            held.append(line)
        elif size < mb * 1e6:
            train_lines.append(line)
            size += len(line.encode())
    return train_lines, held


def words_of(lines: list[str]) -> Counter:
    counts: Counter = Counter()
    for line in lines:
        counts.update(SPACE + w for w in line.split())
    return counts


def train_spm(lines: list[str], vocab: int, script_split: bool) -> tuple[Unigram, float]:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=os.path.join(tmp, "m"), model_type="unigram",
            vocab_size=vocab, character_coverage=1.0, normalization_rule_name="identity", minloglevel=2,
            max_sentence_length=1 << 20, num_threads=os.cpu_count() or 1,
            split_by_unicode_script=script_split, split_by_number=script_split)
        seconds = time.perf_counter() - t
        sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, "m.model"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return Unigram(pieces, unk_id=sp.unk_id()), seconds


def quality(model: Unigram, held: Counter) -> dict:
    n_words = sum(held.values())
    n_tokens = loglik = 0.0
    for w, c in held.items():
        ids = model.tokenize(w)
        n_tokens += c * len(ids)
        loglik += c * sum(model.pieces[i][1] for i in ids)
    return {"tokens_per_word": round(n_tokens / n_words, 4), "loglik_per_word": round(loglik / n_words, 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--lang", choices=["en", "zh", "mix"], default="en")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    lines, held_lines = corpus(args.mb, args.lang)
    held = words_of(held_lines)

    t = time.perf_counter()
    counts = words_of(lines)
    count_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = train_unigram(counts, args.vocab, special_tokens=("<unk>", "<s>", "</s>"), progress=args.progress)
    train_s = time.perf_counter() - t
    spm_default, spm_default_s = train_spm(lines, args.vocab, script_split=True)
    spm_same, spm_same_s = train_spm(lines, args.vocab, script_split=False)

    def overlap(a: Unigram, b: Unigram) -> float:
        return round(len(set(a.vocab) & set(b.vocab)) / len(b.vocab), 4)

    out = {
        "lang": args.lang, "train_mb": round(sum(len(s.encode()) for s in lines) / 1e6, 2),
        "distinct_words": len(counts), "held_out_words": sum(held.values()), "vocab_size": args.vocab,
        "cpus": os.cpu_count(),
        "seconds": {"llmlab_count_words": round(count_s, 2), "llmlab_train": round(train_s, 2),
                    "spm_default": round(spm_default_s, 2), "spm_no_script_split": round(spm_same_s, 2)},
        "speed_ratio_llmlab_total_over_spm_default": round((count_s + train_s) / spm_default_s, 3),
        "vocab_overlap": {"with_spm_default": overlap(ours, spm_default),
                          "with_spm_no_script_split": overlap(ours, spm_same)},
        "held_out": {"llmlab": quality(ours, held), "spm_default": quality(spm_default, held),
                     "spm_no_script_split": quality(spm_same, held)},
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
