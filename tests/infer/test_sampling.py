"""The sampler: every processor equals its transformers counterpart (the oracle) or a direct formula, the
draws follow the processed distribution (chi-square), seeds reproduce, logprobs are the raw ones."""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmlab.infer.params import SamplingParams
from llmlab.infer.sampling import (
    SamplerRow,
    apply_frequency_presence,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    prompt_logprobs,
    sample,
)

V = 50
SEEDS = [0, 1, 2]


def random_logits(seed: int, rows: int, vocab: int = V, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties, at the top-k / top-p boundaries too
        return torch.randint(-3, 3, (rows, vocab), generator=g).float()
    return torch.randn(rows, vocab, generator=g) * 3


def row(**kw) -> SamplerRow:
    prompt, output, generator = kw.pop("prompt", [1, 2, 3]), kw.pop("output", []), kw.pop("generator", None)
    return SamplerRow(SamplingParams(max_tokens=64, **kw), prompt, output, generator)


def hf_rows(make, logits: torch.Tensor, input_ids=None) -> torch.Tensor:
    """Row i through the transformers processor make(i) (input_ids: one token list per row, or None)."""
    out = []
    for i in range(logits.shape[0]):
        ids = torch.tensor([input_ids[i] if input_ids else [0]], dtype=torch.long)
        out.append(make(i)(ids, logits[i : i + 1].clone()))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("seed", SEEDS)
def test_temperature_matches_transformers(seed):
    t = torch.tensor([0.1, 0.7, 1.0, 1.5, 3.0])
    logits = random_logits(seed, len(t))
    expected = hf_rows(lambda i: TemperatureLogitsWarper(float(t[i])), logits)
    assert_close(apply_temperature(logits, t), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_transformers(seed, ties):
    k = torch.tensor([1, 2, 5, 17, V - 1, V, V + 7, 0])  # 0: off; k >= V keeps everything
    logits = random_logits(seed, len(k), ties=ties)
    expected = torch.cat([
        TopKLogitsWarper(int(k[i]))(None, logits[i : i + 1].clone()) if k[i] > 0 else logits[i : i + 1]
        for i in range(len(k))
    ])
    got = apply_top_k(logits, k)
    assert_close(got, expected)
    assert torch.equal(got[-1], logits[-1]) and torch.equal(got[-2], logits[-2])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_top_p_matches_transformers(seed, ties):
    p = torch.tensor([1.0, 0.999, 0.9, 0.5, 0.3, 0.1, 0.01, 1e-9], dtype=torch.float64)  # 1 - 1e-9 rounds to 1
    logits = random_logits(seed, len(p), ties=ties)
    logits[0, :3] = float("-inf")  # already-masked tokens stay masked
    expected = hf_rows(lambda i: TopPLogitsWarper(float(p[i])), logits)
    got = apply_top_p(logits, p)
    assert_close(got, expected)
    assert (got[-1] > float("-inf")).sum() >= 1  # min_tokens_to_keep = 1


def test_top_p_tie_boundary():
    # four tokens of 0.25 each and top_p = 0.5: transformers' rule (drop cumulative <= 0.5, ascending) keeps
    # exactly two of the tied tokens, the ones the sort puts last
    logits = torch.zeros(1, 4)
    got = apply_top_p(logits, torch.tensor([0.5], dtype=torch.float64))
    assert_close(got, TopPLogitsWarper(0.5)(None, logits.clone()))
    assert (got > float("-inf")).sum() == 2


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_min_p_matches_transformers(seed, ties):
    p = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.3, 0.9, 1.0])
    logits = random_logits(seed, len(p), ties=ties)
    expected = hf_rows(lambda i: MinPLogitsWarper(float(p[i])), logits)
    got = apply_min_p(logits, p)
    assert_close(got, expected)
    assert torch.equal(got[0], logits[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty_matches_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    penalty = torch.tensor([0.5, 1.0, 1.2, 2.0, 1.3])
    logits = random_logits(seed, len(penalty))
    lists = [torch.randint(0, V, (n,), generator=g).tolist() for n in (12, 5, 30, 1, 8)]
    lists[0] += lists[0][:4]  # repeated tokens are penalized once
    lists[4] += [V + 3]  # an id past the output layer is ignored, as transformers clamps it away
    expected = hf_rows(lambda i: RepetitionPenaltyLogitsProcessor(float(penalty[i])), logits, lists)
    assert_close(apply_repetition_penalty(logits, lists, penalty), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_no_repeat_ngram_matches_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    ns = [1, 2, 3, 4, 2, 5]
    logits = random_logits(seed, len(ns))
    # a small alphabet makes repeated n-grams common
    seqs = [torch.randint(0, 4, (n,), generator=g).tolist() for n in (10, 40, 60, 25, 1, 3)]
    expected = torch.cat([
        NoRepeatNGramLogitsProcessor(n)(torch.tensor([s]), logits[i : i + 1].clone())
        for i, (s, n) in enumerate(zip(seqs, ns))
    ])
    got = apply_no_repeat_ngram(logits, seqs, ns)
    assert_close(got, expected)
    assert torch.isinf(got[:4]).any()  # the test exercises real bans
    assert torch.equal(got[4:], logits[4:])  # sequences shorter than n ban nothing


@pytest.mark.parametrize("seed", SEEDS)
def test_frequency_presence_formula(seed):
    g = torch.Generator().manual_seed(seed)
    freq, pres = torch.tensor([0.0, 0.5, -1.0, 2.0]), torch.tensor([0.3, 0.0, 1.5, -2.0])
    logits = random_logits(seed, len(freq))
    outputs = [torch.randint(0, 8, (n,), generator=g).tolist() for n in (0, 7, 20, 3)]
    expected = logits.clone()
    for i, out in enumerate(outputs):
        for j in range(V):
            c = out.count(j)
            expected[i, j] -= c * float(freq[i]) + (c > 0) * float(pres[i])
    assert_close(apply_frequency_presence(logits, outputs, freq, pres), expected)


# ---------------------------------------------------------------------------------------------- process_logits


@pytest.mark.parametrize("seed", SEEDS)
def test_process_logits_chain_matches_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    prompt, output = torch.randint(0, 5, (12,), generator=g).tolist(), torch.randint(0, 5, (6,), generator=g).tolist()
    kw = dict(temperature=0.8, top_k=20, top_p=0.85, min_p=0.02, repetition_penalty=1.3, no_repeat_ngram_size=3)
    logits = random_logits(seed, 1).to(torch.bfloat16)
    got = process_logits(logits, [row(prompt=prompt, output=output, **kw)])
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(3), TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20), TopPLogitsWarper(0.85), MinPLogitsWarper(0.02),
    ])
    expected = chain(torch.tensor([prompt + output]), logits.float())
    assert got.dtype == torch.float32
    assert_close(got, expected)


def test_mixed_batch_equals_rows_alone():
    logits = random_logits(5, 4)
    rows = [row(temperature=0), row(temperature=0.5, top_k=3), row(top_p=0.7, repetition_penalty=1.5),
            row(min_p=0.2, frequency_penalty=1.0, output=[4, 4, 9])]
    batched = process_logits(logits, rows)
    for i, r in enumerate(rows):
        assert_close(batched[i : i + 1], process_logits(logits[i : i + 1], [r]))
    assert torch.equal(batched[0], logits[0])  # greedy rows skip the warpers


def test_min_tokens_masks_eos_and_stop_ids():
    logits = random_logits(0, 3)
    rows = [row(min_tokens=3, output=[7, 8], stop_token_ids=[11, 12]),  # 2 < 3: masked
            row(min_tokens=3, output=[7, 8, 9], stop_token_ids=[11]),  # reached: free
            row(min_tokens=2, ignore_eos=True)]  # ignore_eos alone masks nothing
    out = process_logits(logits, rows, eos_token_ids=[0, 2])
    masked = [0, 2, 11, 12]
    assert torch.isneginf(out[0, masked]).all()
    keep = [j for j in range(V) if j not in masked]
    assert torch.equal(out[0, keep], logits[0, keep])
    assert torch.equal(out[1], logits[1])
    assert torch.isneginf(out[2, [0, 2]]).all()  # min_tokens still applies with ignore_eos
    assert torch.equal(process_logits(logits[2:], [row(ignore_eos=True)], [0, 2]), logits[2:])


def test_logit_bias_adds():
    logits = random_logits(1, 2)
    out = process_logits(logits, [row(logit_bias={3: 5.0, 10: -100.0}), row()])
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 10] -= 100.0
    assert_close(out, expected)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        process_logits(logits, [row(logit_bias={V: 1.0}), row()])


def test_all_greedy_batch_is_just_an_argmax():
    logits = random_logits(2, 3)
    rows = [row(temperature=0, top_k=3, top_p=0.5, min_p=0.3) for _ in range(3)]
    assert torch.equal(process_logits(logits, rows), logits)
    logits[1, 7] = logits[1, 30] = logits[1].max() + 1  # tie: the lowest id wins
    assert sample(logits, rows).token_ids == [int(logits[0].argmax()), 7, int(logits[2].argmax())]


# ---------------------------------------------------------------------------------------------- sampling

# chi-square 0.999 quantiles by degrees of freedom (tables; scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the support of probs; tokens outside the support must never be drawn."""
    support = probs > 0
    assert counts[~support].sum() == 0
    n = counts.sum()
    e = probs[support] * n
    return float(((counts[support] - e) ** 2 / e).sum()), int(support.sum()) - 1


def test_sampling_follows_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.2, 0.9, 0.5, 0.0, -0.4, -1.0]])
    t, k, p = 0.7, 6, 0.8
    # expected, by hand in float64: softmax(logits / T), the k largest, then the smallest prefix (by
    # descending probability) whose mass reaches p, renormalized
    q = torch.softmax(logits[0].double() / t, 0)
    q[q.argsort(descending=True)[k:]] = 0
    q /= q.sum()
    order = q.argsort(descending=True)
    cut = int((q[order].cumsum(0) < p).sum()) + 1
    q[order[cut:]] = 0
    q /= q.sum()
    n = 20000
    torch.manual_seed(0)
    rows = [row(temperature=t, top_k=k, top_p=p)] * n
    drawn = torch.tensor(sample(logits.expand(n, -1), rows).token_ids)
    counts = torch.bincount(drawn, minlength=8).double()
    stat, df = chi_square(counts, q)
    assert 2 <= df <= 6 and stat < CHI2_999[df], (stat, df)
    # the test can fail: the same counts reject the distribution without top-p, or at temperature 1
    wrong = torch.softmax(logits[0].double() / t, 0)
    wrong[wrong.argsort(descending=True)[k:]] = 0
    for bad in (wrong / wrong.sum(), torch.where(q > 0, torch.softmax(logits[0].double(), 0), 0.0)):
        bad = bad / bad.sum()
        support = bad > 0
        e = bad[support] * n
        bad_stat = float(((counts[support] - e) ** 2 / e).sum())
        assert bad_stat > CHI2_999[int(support.sum()) - 1]


def draws(seed: int, steps: int = 20, with_neighbours: bool = False) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(3 if with_neighbours else 1, V)  # uniform: every draw is fresh randomness
    out = []
    for _ in range(steps):
        rows = [row(seed=seed, generator=g)]
        if with_neighbours:  # unseeded rows on the global RNG around it must not shift its draws
            rows = [row(), *rows, row(temperature=0.5)]
        out.append(sample(logits, rows).token_ids[1 if with_neighbours else 0])
    return out


def test_same_seed_same_samples_different_seed_different():
    a = draws(1234)
    assert a == draws(1234)
    assert a == draws(1234, with_neighbours=True)
    assert a != draws(1235)
    assert len(set(a)) > 1


# ---------------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    logits = random_logits(3, 3)
    rows = [row(temperature=0.3, top_k=2, logprobs=5, repetition_penalty=2.0),
            row(temperature=0, logprobs=0),
            row()]
    out = sample(logits, rows)
    ref = torch.log_softmax(logits, dim=1)
    assert out.logprobs[2] is None
    for i in (0, 1):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(ref[i, lp.token_id]), abs=1e-6)
    top = out.logprobs[0].top
    assert len(top) == 5 and out.logprobs[1].top == {}
    assert sorted(top) == sorted(ref[0].topk(5).indices.tolist())
    for j, v in top.items():
        assert v == pytest.approx(float(ref[0, j]), abs=1e-6)
    assert min(top.values()) >= float(ref[0].sort(descending=True).values[4]) - 1e-6
    assert out.token_ids[1] == int(logits[1].argmax())


def test_prompt_logprobs_alignment():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    out = prompt_logprobs(logits, [2, 1, 0], k=1)
    assert out[0] is None and len(out) == 3
    # token 1 is predicted by row 0, token 0 by row 1 (row 2 predicts what follows the prompt)
    lse0, lse1 = math.log(1 + math.e + math.e**2), math.log(math.e**3 + 2)
    assert out[1].token_id == 1 and out[1].logprob == pytest.approx(1.0 - lse0, abs=1e-6)
    assert out[1].top == pytest.approx({2: 2.0 - lse0}, abs=1e-6)
    assert out[2].token_id == 0 and out[2].logprob == pytest.approx(3.0 - lse1, abs=1e-6)
    assert out[2].top == pytest.approx({0: 3.0 - lse1}, abs=1e-6)
    assert prompt_logprobs(logits[:1], [2], k=3) == [None]


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        sample(torch.zeros(V), [row()])
    with pytest.raises(ValueError, match="2-D"):
        process_logits(torch.zeros(1, 1, V), [row()])
    with pytest.raises(ValueError, match="2 sampler rows for a batch of 3"):
        sample(torch.zeros(3, V), [row(), row()])
    with pytest.raises(ValueError, match="floating point"):
        sample(torch.zeros(1, V, dtype=torch.long), [row()])
    with pytest.raises(ValueError, match="no token left"):
        sample(torch.full((1, V), float("-inf")), [row()])
    with pytest.raises(ValueError, match="3 rows for 2 prompt tokens"):
        prompt_logprobs(torch.zeros(3, V), [1, 2], k=1)
    with pytest.raises(ValueError, match=">= 0"):
        apply_repetition_penalty(torch.zeros(1, V), [[-1]], torch.tensor([1.2]))
