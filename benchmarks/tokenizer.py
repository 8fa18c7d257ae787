"""Tokenizer training and encoding speed, and quality: llmlab vs Hugging Face `tokenizers`, sentencepiece and
tiktoken, same corpus, same run.

Corpus: the English corpora of llmlab.data.sources (State of the Union + Moby Dick, about 12 MB) plus People's
Daily in Chinese, cut to --mb megabytes. Encoding is measured on a held-out slice of about 1 MB: our Python
encoder call by call and batched (encode_batch(fast=False)), our fast path (encode_batch: tiktoken for
byte-level BPE, else `tokenizers`), `tokenizers` on our own file call by call and batched. Each encoder also
makes one pass over the whole training text with a fresh tokenizer (`encode_corpus_mb_per_s`): encoding a
corpus, where pieces recur and per-piece caches warm as they would for a user, unlike the 1 MB slice, where most
pieces are new. Quality: bytes per token and vocabulary use on held-out English and Chinese separately.
`smollm2`: the same encoders with SmolLM2-135M-Instruct's own tokenizer, read from its GGUF.

    python benchmarks/tokenizer.py [--mb 20] [--vocab 8192,32768] [--kinds bpe,wordpiece,unigram] [--repeat 1]
                                   [--no-smollm2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from llmlab.data import sources
from llmlab.tokenizer import load, train
from llmlab.tokenizer.evaluate import evaluate


def _cut(lines: list[str], mb: float) -> list[str]:
    out, size = [], 0
    for line in lines:
        if size > mb * 1e6:
            break
        out.append(line)
        size += len(line.encode())
    return out


def corpus(mb: float) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Training lines (about mb MB), a held-out slice of about 1 MB, and that slice by language."""
    english = [line for d in [s["text"] for s in sources.sotu_speeches()] + sources.moby_dick_chapters()
               for line in d.split("\n") if line.strip()]
    try:
        chinese = [line for d in sources.peoples_daily() for line in d.split("\n") if line.strip()]
    except sources.MissingDataError:
        chinese = []
    held = {"english": english[::20], "chinese": chinese[::20]}
    train_lines = [x for i, x in enumerate(english) if i % 20] + [x for i, x in enumerate(chinese) if i % 20]
    random.Random(0).shuffle(train_lines)  # mix the languages within any prefix
    share = {k: _mb(v) / max(1e-9, sum(map(_mb, held.values()))) for k, v in held.items()}  # by bytes
    held = {k: _cut(v, share[k]) for k, v in held.items() if v}
    return _cut(train_lines, mb), [x for v in held.values() for x in v], held


def _mb(lines: list[str]) -> float:
    return sum(len(t.encode()) for t in lines) / 1e6


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _fast_and_tiktoken(tok, texts: list[str], rounds: int = 3):
    """(ids, seconds) of tok's fast path (already built: for tiktoken the merge ranks are checked token by token
    on first use, timed apart) and the seconds of tiktoken itself on the same merges with nothing of ours around
    it (None without tiktoken). Best of a few rounds, taking turns: the two run the same library."""
    from llmlab.tokenizer.fast import tiktoken_encoder

    enc = tiktoken_encoder(tok)
    fast, lib = [], []
    for _ in range(rounds):
        ids, s = _timed(lambda: tok.encode_batch(texts))
        fast.append(s)
        if enc is not None:
            lib.append(_timed(lambda: enc.encode_ordinary_batch(texts))[1])
    return ids, min(fast), min(lib) if lib else None


def reference_tokenizers(kind: str, texts: list[str], vocab: int):
    """The same algorithm trained by `tokenizers`, with the pipeline our train() uses."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        ref = Tokenizer(models.BPE())
        ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ref.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        ref = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        ref.normalizer = normalizers.BertNormalizer(lowercase=True)
        ref.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    else:
        ref = Tokenizer(models.Unigram())
        ref.normalizer = normalizers.NFKC()
        ref.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=["<unk>"], unk_token="<unk>",
                                          show_progress=False)
    _, seconds = _timed(lambda: ref.train_from_iterator(texts, trainer))
    return seconds


def reference_sentencepiece(kind: str, texts: list[str], vocab: int) -> float | None:
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            _, seconds = _timed(lambda: spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_prefix=os.path.join(d, "m"), vocab_size=vocab, model_type=kind,
                character_coverage=0.9995, max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
                minloglevel=2))
        except RuntimeError:  # e.g. a vocab smaller than the characters it must cover (tiny test runs)
            return None
    return seconds


def bench(kind: str, vocab: int, texts: list[str], held_out: list[str], by_language: dict[str, list[str]],
          repeat: int = 1) -> dict:
    import tokenizers

    specials = {"bpe": ["<|endoftext|>"], "wordpiece": [], "unigram": []}[kind]
    times: dict[str, list[float]] = {}
    for _ in range(repeat):  # the trainers take turns, so a slow spell of a shared machine hits all of them
        ours, ours_s = _timed(lambda: train(texts, kind, vocab_size=vocab, special_tokens=specials, min_frequency=2))
        times.setdefault("llmlab", []).append(ours_s)
        times.setdefault("tokenizers", []).append(reference_tokenizers(kind, texts, vocab))
        spm_s = reference_sentencepiece(kind, texts, vocab) if kind in ("bpe", "unigram") else None
        if spm_s is not None:
            times.setdefault("sentencepiece", []).append(spm_s)
    best = {name: min(t) for name, t in times.items()}  # the least disturbed run of each
    row = {"vocab_learned": len(ours), "train_s": {name: round(t, 2) for name, t in best.items()}}
    if repeat > 1:
        row["train_s_each_run"] = {name: [round(x, 2) for x in t] for name, t in times.items()}
    for name in ("tokenizers", "sentencepiece"):
        if name in best:
            row[f"train_ratio_vs_{name}"] = round(best["llmlab"] / best[name], 2)

    held_mb = _mb(held_out)
    with tempfile.TemporaryDirectory() as d:
        path = ours.save(os.path.join(d, "tokenizer.json"))
        lib = tokenizers.Tokenizer.from_file(path)
        ours = load(path)  # a fresh cache, as a user's encoder starts
        fresh = {lang: load(path) for lang in by_language}
        corpus_tok, batch_tok, corpus_batch_tok = load(path), load(path), load(path)
    ours_ids, python_s = _timed(lambda: [ours.encode(t) for t in held_out])
    batched_ids, batched_s = _timed(lambda: batch_tok.encode_batch(held_out, fast=False))
    row["fast_path_build_s"] = round(_timed(lambda: ours.encode_batch([""]))[1], 3)
    fast_ids, fast_s, tiktoken_s = _fast_and_tiktoken(ours, held_out)
    lib_ids, lib_s = _timed(lambda: [lib.encode(t).ids for t in held_out])
    _, lib_batch_s = _timed(lambda: lib.encode_batch(held_out))
    row["fast_path"] = "tiktoken" if tiktoken_s is not None else "tokenizers"
    row["encode_mb_per_s"] = {"llmlab_python": round(held_mb / python_s, 2),
                              "llmlab_python_batched": round(held_mb / batched_s, 2),
                              "llmlab_fast": round(held_mb / fast_s, 2),
                              "tokenizers_call_by_call": round(held_mb / lib_s, 2),
                              "tokenizers_batched": round(held_mb / lib_batch_s, 2)}
    if tiktoken_s is not None:
        row["encode_mb_per_s"]["tiktoken"] = round(held_mb / tiktoken_s, 2)
    row["ids_identical"] = {"tokenizers": ours_ids == lib_ids, "fast_path": ours_ids == fast_ids,
                            "python_batched": ours_ids == batched_ids}
    train_mb = _mb(texts)
    corpus_s = {"llmlab_python": _timed(lambda: [corpus_tok.encode(t) for t in texts])[1],
                "llmlab_python_batched": _timed(lambda: corpus_batch_tok.encode_batch(texts, fast=False))[1],
                "llmlab_fast": _timed(lambda: corpus_tok.encode_batch(texts))[1],
                "tokenizers_call_by_call": _timed(lambda: [lib.encode(t).ids for t in texts])[1],
                "tokenizers_batched": _timed(lambda: lib.encode_batch(texts))[1]}
    row["encode_corpus_mb_per_s"] = {name: round(train_mb / t, 2) for name, t in corpus_s.items()}
    row["encode_mb_per_s_by_language"] = {}
    for lang, lines in by_language.items():
        _, py_s = _timed(lambda: [fresh[lang].encode(t) for t in lines])
        _, lib_s = _timed(lambda: [lib.encode(t) for t in lines])
        row["encode_mb_per_s_by_language"][lang] = {"llmlab_python": round(_mb(lines) / py_s, 2),
                                                    "tokenizers_call_by_call": round(_mb(lines) / lib_s, 2)}
    row["goals"] = goals(kind, row)
    row["quality"] = {}
    for lang, lines in by_language.items():
        q = evaluate(ours, lines)
        row["quality"][lang] = {"bytes_per_token": round(q["bytes_per_token"], 3),
                                "vocab_used": round(q["vocab_used"], 3), "unk_rate": round(q["unk_rate"], 4)}
    return row


def goals(kind: str, row: dict) -> dict:
    """The issue's goals as ratios to the reference tools of the same run. They were set as rates on the issue
    writer's machine, where `tokenizers` encoded 4 MB/s call by call: "the Python encoder at least 2 MB/s" is
    0.5x `tokenizers` call by call; "the fast path at tiktoken's speed" is our fast path against tiktoken
    itself on the same merges (met from 0.9x: both are the same library, and single runs move by 10%)."""
    out = {}

    def check(name, ratio, goal, met):
        out[name] = {"ratio": round(ratio, 2), "goal": goal, "met": bool(met)}

    if kind == "bpe":
        check("train_vs_tokenizers", row["train_ratio_vs_tokenizers"], "<= 8", row["train_ratio_vs_tokenizers"] <= 8)
    if kind == "unigram" and "train_ratio_vs_sentencepiece" in row:
        r = row["train_ratio_vs_sentencepiece"]
        check("train_vs_sentencepiece", r, "<= 1", r <= 1)
    for text, rates in (("held_out", row["encode_mb_per_s"]), ("corpus", row["encode_corpus_mb_per_s"])):
        for mode in ("llmlab_python", "llmlab_python_batched"):
            r = rates[mode] / rates["tokenizers_call_by_call"]
            check(f"{mode}_vs_tokenizers_call_by_call_{text}", r, ">= 0.5", r >= 0.5)
    if "tiktoken" in row["encode_mb_per_s"]:
        r = row["encode_mb_per_s"]["llmlab_fast"] / row["encode_mb_per_s"]["tiktoken"]
        check("fast_vs_tiktoken_held_out", r, ">= 0.9", r >= 0.9)
    return out


def bench_smollm2(held_out: list[str], texts: list[str]) -> dict | str:
    """SmolLM2-135M-Instruct's own tokenizer (49,152 ids, digits split one by one before GPT-2's split), read
    from its GGUF: our encoders against `tokenizers` on the same tokenizer.json, on the held-out slice and one
    pass over the training text."""
    import tokenizers

    from llmlab.io.assets import AssetNotFoundError, asset_path
    from llmlab.io.gguf import read_gguf

    try:
        spec = read_gguf(asset_path("smollm2-135m-instruct")).tokenizer_json
    except AssetNotFoundError as e:
        return f"skipped: {e}"
    row = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        lib = tokenizers.Tokenizer.from_file(path)
        for name, lines in (("held_out", held_out), ("corpus", texts)):
            call, batch, fast = load(path), load(path), load(path)  # fresh caches
            ids, call_s = _timed(lambda: [call.encode(t) for t in lines])
            cached_s = _timed(lambda: [call.encode(t) for t in lines])[1]  # again, every piece now cached
            batched, batch_s = _timed(lambda: batch.encode_batch(lines, fast=False))
            build_s = _timed(lambda: fast.encode_batch([""]))[1]
            fast_ids, fast_s, tiktoken_s = _fast_and_tiktoken(fast, lines, rounds=3 if name == "held_out" else 1)
            lib_ids, lib_s = _timed(lambda: [e.ids for e in map(lib.encode, lines)])
            _, lib_batch_s = _timed(lambda: lib.encode_batch(lines))
            seconds = {"llmlab_python": call_s, "llmlab_python_cached": cached_s, "llmlab_python_batched": batch_s,
                       "llmlab_fast": fast_s, "tokenizers_call_by_call": lib_s, "tokenizers_batched": lib_batch_s}
            if tiktoken_s is not None:
                seconds["tiktoken"] = tiktoken_s
            rates = {k: round(_mb(lines) / t, 2) for k, t in seconds.items()}
            row[name] = {"mb_per_s": rates, "ids_identical": ids == lib_ids == batched == fast_ids,
                         "fast_path_build_s": round(build_s, 3)}
        row["goals"] = goals("smollm2", {"encode_mb_per_s": row["held_out"]["mb_per_s"],
                                         "encode_corpus_mb_per_s": row["corpus"]["mb_per_s"]})
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=20)
    p.add_argument("--vocab", default="8192,32768")
    p.add_argument("--kinds", default="bpe,wordpiece,unigram")
    p.add_argument("--repeat", type=int, default=1, help="train each tokenizer this many times, taking turns; "
                   "the best time of each is reported (use 2+ on a shared, noisy machine)")
    p.add_argument("--no-smollm2", action="store_true", help="leave out SmolLM2's own tokenizer")
    args = p.parse_args()
    import tokenizers

    texts, held_out, by_language = corpus(args.mb)
    result = {"benchmark": "tokenizer", "train_mb": round(_mb(texts), 2), "held_out_mb": round(_mb(held_out), 2),
              "cpus": os.cpu_count(), "tokenizers_version": tokenizers.__version__}
    for kind in args.kinds.split(","):
        result[kind] = {str(v): bench(kind, v, texts, held_out, by_language, args.repeat)
                        for v in map(int, args.vocab.split(","))}
    if not args.no_smollm2:
        result["smollm2"] = bench_smollm2(held_out, texts)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
