"""Speculative decoding: greedy output is the target's own greedy output, sampled output is distributed as the
target's (checked against exact enumeration), caches roll back correctly, stops and bad input behave."""

import copy
import math

import pytest
import torch

from llmlab.infer.params import SamplingParams
from llmlab.infer.speculative import SpeculativeStats, _probs, crop_cache, speculative_generate
from llmlab.model import KVCache, ModelConfig, Transformer

TINY = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64)
PROMPT = [1, 2, 3, 4]


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("nano", **{**TINY, "init_std": 0.2, **kw})).float().eval()


def perturbed(model, sigma, seed=1):
    """A draft that mostly agrees with `model`: every weight plus noise of sigma · its own std."""
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn(w.shape, generator=g) * sigma * w.std())
    return draft


@torch.no_grad()
def reference_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):  # full forward every step, no cache
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kind", ["other_seed", "perturbed"])
def test_greedy_equals_target_greedy(kind, k):
    target = build(0)
    draft = build(1) if kind == "other_seed" else perturbed(target, 0.1)
    out, stats = speculative_generate(target, draft, PROMPT, GREEDY, num_draft_tokens=k)
    assert out == reference_greedy(target, PROMPT, 24)
    assert stats.accepted < stats.proposed  # rejections happened, so the caches were rolled back
    assert stats.generated == 24 and stats.target_forwards == 24 - stats.accepted
    if kind == "perturbed":  # partial acceptance: rollbacks to every kind of accepted prefix
        assert stats.accepted > 0


def test_draft_shorter_context_and_target_max_seq_len():
    # The draft (learned positions: overrunning its table raises) stops proposing near its max_seq_len; the
    # target alone finishes, and generation stops at the target's max_seq_len.
    target = build(0, max_seq_len=20)
    draft = build(1, position="learned", max_seq_len=12)
    out, stats = speculative_generate(target, draft, PROMPT, GREEDY, num_draft_tokens=3)
    assert out == reference_greedy(target, PROMPT, 20 - len(PROMPT))


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=24, temperature=0.9, top_k=20, seed=3)])
def test_identical_draft_accepts_everything(params):
    target = build(0)
    out, stats = speculative_generate(target, copy.deepcopy(target), PROMPT, params, num_draft_tokens=4)
    assert len(out) == 24 and stats.acceptance_rate == 1.0
    # 24 tokens = 4 rounds of 4 drafts + 1 bonus, then one draft + 1 bonus (max_tokens leaves room for 1)
    assert stats.target_forwards == 5 and stats.tokens_per_target_forward == 24 / 5
    if params.greedy:
        assert out == reference_greedy(target, PROMPT, 24)


# --------------------------------------------------------------------------- the sampled distribution
V, TEMPERATURE, TOP_K, RUNS = 8, 0.8, 6, 1200


def _target_dist(logits):  # written independently of _probs: softmax(l / T) over the top-k logits
    logits = logits.double() / TEMPERATURE
    kth = logits.topk(TOP_K, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf).softmax(-1)


@torch.no_grad()
def _joint_first_two(model, prompt):
    """P(x1, x2) by enumeration: p(x1 | prompt) · p(x2 | prompt, x1), flattened to V² cells."""
    p1 = _target_dist(model(torch.tensor([prompt])).logits[0, -1])
    p2 = _target_dist(model(torch.tensor([prompt + [v] for v in range(V)])).logits[:, -1])
    return (p1[:, None] * p2).flatten()


def _chi_square(counts, expected):
    """Pearson's statistic, cells with expected count < 5 pooled into one (the usual validity rule)."""
    assert counts[expected == 0].sum() == 0, "a token outside the target's top-k was sampled"
    small = expected < 5
    c = torch.cat((counts[~small], counts[small].sum()[None]))
    e = torch.cat((expected[~small], expected[small].sum()[None]))
    if e[-1] < 5:  # the pooled cell is itself too small: merge it into the last one
        c, e = torch.cat((c[:-2], c[-2:].sum()[None])), torch.cat((e[:-2], e[-2:].sum()[None]))
    return float(((c - e) ** 2 / e).sum()), len(c) - 1


def _chi_square_critical(df, z=3.719):
    # Wilson–Hilferty: χ²_df ≈ df·(1 − 2/(9df) + z·√(2/(9df)))³; z = 3.719 is the normal 1 − 1e-4 quantile,
    # so a correct sampler fails this with probability ~1e-4 (and the seed is fixed anyway).
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# max_tokens=3, two drafts: x1 and x2 come from one round (accept/accept, accept/residual, residual), or x2 from
# the next round after a rejection at x1. max_tokens=2, one draft: x2 is the bonus token after an acceptance.
@pytest.mark.parametrize("max_tokens, k", [(3, 2), (2, 1)])
def test_sampled_tokens_follow_the_target_distribution(max_tokens, k):
    target = build(0, vocab_size=V)
    draft = perturbed(target, 0.8)  # far enough that most drafts are rejected, yet not all
    params = SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, top_k=TOP_K)
    p, q = _joint_first_two(target, PROMPT), _joint_first_two(draft, PROMPT)
    assert 0.5 * (p - q).abs().sum() > 0.75  # total variation: the draft's joint distribution is far off

    g = torch.Generator().manual_seed(0)
    counts, total = torch.zeros(V * V, dtype=torch.float64), SpeculativeStats()
    for _ in range(RUNS):
        out, stats = speculative_generate(target, draft, PROMPT, params, num_draft_tokens=k, generator=g)
        counts[out[0] * V + out[1]] += 1
        total.proposed += stats.proposed
        total.accepted += stats.accepted
    assert 0.1 < total.acceptance_rate < 0.7  # both the acceptance and the residual paths ran many times

    stat, df = _chi_square(counts, RUNS * p)
    assert stat < _chi_square_critical(df), (stat, df)
    # The criterion has power: as many samples from the draft's distribution q are rejected by far.
    from_q = torch.bincount(torch.multinomial(q.float(), RUNS, replacement=True, generator=g), minlength=V * V)
    from_q = from_q.double().masked_fill(p == 0, 0)  # the zero-cell check above would reject q outright
    assert _chi_square(from_q, RUNS * p)[0] > 10 * _chi_square_critical(df)


def test_probs_applies_temperature_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(_probs(logits, SamplingParams()), torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(_probs(logits, SamplingParams(top_k=2)), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(_probs(logits, SamplingParams(top_p=0.7)), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(_probs(logits, SamplingParams(min_p=0.4)), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    t2 = torch.tensor([0.5, 0.25, 0.15, 0.1]).sqrt()
    torch.testing.assert_close(_probs(logits, SamplingParams(temperature=2.0)), t2 / t2.sum())


# --------------------------------------------------------------------------- caches, seeds, stops, errors
@torch.no_grad()
def test_crop_cache_rolls_back_to_a_prefix():
    model, x = build(0), torch.randint(0, 64, (1, 12))
    cache = KVCache()
    model(x[:, :10], cache=cache)
    crop_cache(cache, 7)
    assert cache.length == 7 and cache.key_pos.shape == (1, 7)
    assert all(t.shape[-2] == 7 for ts in cache.layers.values() for t in ts)
    torch.testing.assert_close(model(x[:, 7:12], cache=cache).logits, model(x).logits[:, 7:12], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="length must lie in"):
        crop_cache(cache, 13)


def test_seed_reproduces_the_output():
    target, draft = build(0), build(1)

    def run(**kw):
        params = SamplingParams(max_tokens=16, seed=kw.pop("seed", None))
        return speculative_generate(target, draft, PROMPT, params, num_draft_tokens=3, **kw)[0]

    assert run(seed=5) == run(seed=5) != run(seed=6)
    assert run(generator=torch.Generator().manual_seed(5)) == run(generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    a = run()
    torch.manual_seed(11)
    assert run() == a  # no seed: drawn from torch's global generator


def test_eos_stops_and_is_kept():
    target, draft = build(0), perturbed(build(0), 0.1)
    full = reference_greedy(target, PROMPT, 24)
    eos = full[6]
    cut = full.index(eos) + 1
    out, _ = speculative_generate(target, draft, PROMPT, GREEDY, num_draft_tokens=4, eos_token_ids=[eos])
    assert out == full[:cut]
    ignore = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    assert speculative_generate(target, draft, PROMPT, ignore, eos_token_ids=[eos])[0] == full
    stop_ids = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[eos])
    assert speculative_generate(target, draft, PROMPT, stop_ids)[0] == full[:cut]

    sampled = SamplingParams(max_tokens=64 - len(PROMPT), seed=0)
    eos_ids = list(range(8))  # some of these come up quickly
    out, _ = speculative_generate(target, build(1), PROMPT, sampled, eos_token_ids=eos_ids)
    assert out[-1] in eos_ids and not set(out[:-1]) & set(eos_ids)


def test_bad_input_is_refused():
    target = build(0)
    with pytest.raises(ValueError, match="share the vocabulary.*64.*32"):
        speculative_generate(target, build(1, vocab_size=32), PROMPT, GREEDY)
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 1"):
            speculative_generate(target, build(1), PROMPT, GREEDY, num_draft_tokens=k)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        speculative_generate(target, build(1), [], GREEDY)
    with pytest.raises(ValueError, match="no room left"):
        speculative_generate(target, build(1), [1] * 64, GREEDY)
    with pytest.raises(ValueError, match="does not support repetition_penalty=1.2"):
        speculative_generate(target, build(1), PROMPT, SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="kind='decoder'"):
        speculative_generate(target, build(1, kind="encoder", head="mlm"), PROMPT, GREEDY)
