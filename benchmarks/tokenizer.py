"""Tokenizer training and encoding speed: llmlab vs Hugging Face `tokenizers`, same corpus, same run.

Corpus: the English corpora of llmlab.data.sources (State of the Union + Moby Dick, about 12 MB), plus
People's Daily in Chinese, cut to --mb megabytes. Byte-level BPE and WordPiece so far (Unigram joins when it
lands). Encoding is measured on a held-out 1 MB slice, call by call and (for `tokenizers`) batched.

    python benchmarks/tokenizer.py [--mb 20] [--vocab 8192,32768]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from llmlab.data import sources
from llmlab.tokenizer import train


def corpus(mb: float) -> tuple[list[str], list[str]]:
    """Training documents (about mb MB) and a held-out slice of about 1 MB, split into lines."""
    docs = [s["text"] for s in sources.sotu_speeches()] + sources.moby_dick_chapters()
    try:
        docs += sources.peoples_daily()
    except sources.MissingDataError:
        pass
    lines = [line for d in docs for line in d.split("\n") if line.strip()]
    lines = lines[::2] + lines[1::2]  # interleave English and Chinese-era lines less lumpily
    held, train_lines, size = [], [], 0
    for i, line in enumerate(lines):
        (held if i % 20 == 0 else train_lines).append(line)
    out = []
    for line in train_lines:
        if size > mb * 1e6:
            break
        out.append(line)
        size += len(line.encode())
    held_out, size = [], 0
    for line in held:
        if size > 1e6:
            break
        held_out.append(line)
        size += len(line.encode())
    return out, held_out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=20)
    p.add_argument("--vocab", default="8192,32768")
    args = p.parse_args()
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts, held_out = corpus(args.mb)
    train_mb = sum(len(t.encode()) for t in texts) / 1e6
    held_mb = sum(len(t.encode()) for t in held_out) / 1e6
    result = {"benchmark": "tokenizer", "train_mb": round(train_mb, 2), "held_out_mb": round(held_mb, 2),
              "tokenizers_version": tokenizers.__version__, "bpe": {}}
    for vocab in map(int, args.vocab.split(",")):
        t = time.perf_counter()
        ours = train(texts, vocab_size=vocab, special_tokens=["<|endoftext|>"], min_frequency=2)
        ours_s = time.perf_counter() - t

        ref = tokenizers.Tokenizer(models.BPE())
        ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ref.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        t = time.perf_counter()
        ref.train_from_iterator(texts, trainer)
        ref_s = time.perf_counter() - t

        # Encoding: our Python encoder call by call; `tokenizers` on our own merges (so ids are comparable).
        with tempfile.TemporaryDirectory() as d:
            ours_file = tokenizers.Tokenizer.from_file(ours.save(os.path.join(d, "tokenizer.json")))
        t = time.perf_counter()
        ours_ids = [ours.encode(line) for line in held_out]
        enc_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref_ids = [e.ids for e in (ours_file.encode(line) for line in held_out)]
        enc_ref = time.perf_counter() - t
        t = time.perf_counter()
        ours_file.encode_batch(held_out)
        enc_ref_batch = time.perf_counter() - t
        n_tokens = sum(map(len, ours_ids))
        result["bpe"][str(vocab)] = {
            "train_s": {"llmlab": round(ours_s, 2), "tokenizers": round(ref_s, 2)},
            "train_slowdown_vs_tokenizers": round(ours_s / ref_s, 2),
            "encode_mb_per_s": {"llmlab_python": round(held_mb / enc_ours, 2),
                                "tokenizers_call_by_call": round(held_mb / enc_ref, 2),
                                "tokenizers_batched": round(held_mb / enc_ref_batch, 2)},
            "ids_identical_to_tokenizers": ours_ids == ref_ids,
            "bytes_per_token_held_out": round(held_mb * 1e6 / n_tokens, 3),
            "vocab_learned": len(ours),
        }
    result["wordpiece"] = {}
    for vocab in map(int, args.vocab.split(",")):
        t = time.perf_counter()
        ours = train(texts, "wordpiece", vocab_size=vocab, min_frequency=2)
        ours_s = time.perf_counter() - t
        ref = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        ref.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
        ref.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        t = time.perf_counter()
        ref.train_from_iterator(texts, trainer)
        ref_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            ours_file = tokenizers.Tokenizer.from_file(ours.save(os.path.join(d, "tokenizer.json")))
        t = time.perf_counter()
        ours_ids = [ours.encode(line) for line in held_out]
        enc_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref_ids = [ours_file.encode(line).ids for line in held_out]
        enc_ref = time.perf_counter() - t
        result["wordpiece"][str(vocab)] = {
            "train_s": {"llmlab": round(ours_s, 2), "tokenizers": round(ref_s, 2)},
            "train_slowdown_vs_tokenizers": round(ours_s / ref_s, 2),
            "encode_mb_per_s": {"llmlab_python": round(held_mb / enc_ours, 2),
                                "tokenizers_call_by_call": round(held_mb / enc_ref, 2)},
            "ids_identical_to_tokenizers": ours_ids == ref_ids,
            "vocab_learned": len(ours),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
