"""Perplexity / bits per byte against transformers: a tiny random LlamaForCausalLM, its weights converted into
our Transformer (llmlab.io.hf), and the Hugging Face sliding-window protocol computed by hand with the HF
model on the same token ids (labels = -100 outside each window's new tokens, model(..., labels=...).loss)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llmlab.eval.perplexity import perplexity, sequence_nll, sliding_windows  # noqa: E402
from llmlab.io import config_from_hf, state_dict_from_hf  # noqa: E402
from llmlab.model import Transformer  # noqa: E402
from llmlab.tokenizer import train  # noqa: E402

transformers.logging.set_verbosity_error()

TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
        "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
        "watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. ")
NON_ASCII = "Ce café naïve — 東京で寿司を食べた。Ünïcödé ☕ text, ok. " * 2


@pytest.fixture(scope="module")
def tok():
    t = train([TEXT * 3, NON_ASCII], vocab_size=320, special_tokens=["<|endoftext|>", "<s>"])
    t.bos_token = "<s>"
    return t


@pytest.fixture(scope="module")
def models(tok):
    """(ours, transformers') with the same random weights; every parameter re-drawn so no tensor is inert."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.15 * noise if p.dim() >= 2 else 1.0 + 0.2 * noise)
    d = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cfg = config_from_hf(d)
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, d), strict=True)
    return ours.eval(), hf


@torch.no_grad()
def hf_protocol(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The HF recipe's loop. Tokens counted exactly: the labels after the model's internal shift (the recipe
    subtracts one per window, which is one too many once a window's first label is already -100)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        n = int((target_ids[:, 1:] != -100).sum())
        if n:
            nll += float(hf(input_ids, labels=target_ids).loss) * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


# ---------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n,max_length,stride", [(10, 4, 4), (10, 4, 2), (11, 4, 3), (7, 8, 8), (9, 4, 1),
                                                 (8, 4, 4), (5, 4, 4), (2, 2, 1)])
def test_windows_score_what_the_hf_recipe_labels(n, max_length, stride):
    ours, prev_end = set(), 0
    for w in sliding_windows(n, max_length, stride):
        assert w.end - w.begin <= max_length
        ours |= {(w.begin, t) for t in range(w.score_from, w.end)}
    theirs = set()
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        labels = list(range(begin, end))[-(end - prev_end):]
        theirs |= {(begin, t) for t in labels if t > begin}  # the shift drops each window's first position
        prev_end = end
        if end == n:
            break
    assert ours == theirs
    scored = sorted(t for _, t in ours)
    assert len(scored) == len(set(scored))  # never twice
    if stride < max_length:  # overlapping windows give every token but the very first a context
        assert scored == list(range(1, n))
    else:  # disjoint windows: each window's first token has none
        assert scored == [t for t in range(n) if t % max_length]


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 8), (24, 17), (64, 64)],
                         ids=["disjoint", "stride8", "stride17", "one_window"])
def test_matches_transformers_sliding_window(models, tok, max_length, stride):
    ours, hf = models
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > max_length or stride == 64
    ref_nll, ref_count = hf_protocol(hf, ids[:64] if stride == 64 else ids, max_length, stride)
    text = tok.decode(ids[:64]) if stride == 64 else TEXT
    r = perplexity(ours, tok, text, max_length=max_length, stride=stride, batch_size=3, progress=False)
    assert r.tokens == ref_count
    assert r.nll == pytest.approx(ref_nll, rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-4)
    assert r.bits_per_byte == pytest.approx(ref_nll / (math.log(2) * len(text.encode())), rel=1e-4)
    assert r.windows == len([w for w in sliding_windows(len(ids), max_length, stride) if w.n_scored]) \
        or stride == 64


def test_batching_does_not_change_the_result(models, tok):
    ours, _ = models
    ids = tok.encode(TEXT, add_special_tokens=False)
    one = sequence_nll(ours, ids, max_length=20, stride=7, batch_size=1, progress=False)
    many = sequence_nll(ours, ids, max_length=20, stride=7, batch_size=16, progress=False)
    assert one[1:] == many[1:]
    assert one[0] == pytest.approx(many[0], rel=1e-5)


def test_bits_per_byte_counts_utf8_bytes(models, tok):
    ours, hf = models
    n_bytes = len(NON_ASCII.encode("utf-8"))
    assert n_bytes > len(NON_ASCII) + 20  # the text really is multi-byte
    r = perplexity(ours, tok, NON_ASCII, max_length=32, stride=16, progress=False)
    ref_nll, ref_count = hf_protocol(hf, tok.encode(NON_ASCII, add_special_tokens=False), 32, 16)
    assert (r.bytes, r.tokens) == (n_bytes, ref_count)
    assert r.bits_per_byte == pytest.approx(ref_nll / (math.log(2) * n_bytes), rel=1e-4)
    assert r.bits_per_byte == pytest.approx(r.nll_per_token * r.tokens / n_bytes / math.log(2), rel=1e-12)


def test_bos_scores_the_first_token(models, tok):
    ours, hf = models
    ids = tok.encode(TEXT, add_special_tokens=False)
    bos = tok.token_to_id("<s>")
    r = perplexity(ours, tok, TEXT, max_length=32, stride=8, bos=True, progress=False)
    ref_nll, ref_count = hf_protocol(hf, [bos] + ids, 32, 8)
    assert (r.n_tokens, r.tokens, ref_count) == (len(ids) + 1, len(ids), len(ids))
    assert r.nll == pytest.approx(ref_nll, rel=1e-4)
    assert perplexity(ours, tok, TEXT, max_length=32, stride=8, bos=bos, progress=False).nll == r.nll


def test_training_mode_is_restored(models, tok):
    ours, _ = models
    ours.train()
    try:
        perplexity(ours, tok, TEXT[:80], max_length=16, progress=False)
        assert ours.training
    finally:
        ours.eval()


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(models, tok):
    ours, _ = models
    with pytest.raises(ValueError, match=r"stride \(16\) > max_length \(8\)"):
        perplexity(ours, tok, TEXT, max_length=8, stride=16)
    with pytest.raises(ValueError, match="text is empty"):
        perplexity(ours, tok, "")
    with pytest.raises(ValueError, match="must be a str"):
        perplexity(ours, tok, ["a", "b"])
    with pytest.raises(ValueError, match="at least 2"):
        sequence_nll(ours, [5], max_length=8)
    with pytest.raises(ValueError, match="max_length must be an int ≥ 2"):
        perplexity(ours, tok, TEXT, max_length=1)
    with pytest.raises(ValueError, match="stride must be an int ≥ 1"):
        perplexity(ours, tok, TEXT, max_length=8, stride=0)
    no_bos = train([TEXT], vocab_size=280)
    with pytest.raises(ValueError, match="no bos_token"):
        perplexity(ours, no_bos, TEXT, bos=True)
