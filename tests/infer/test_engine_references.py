"""The engine end to end against independent references: the model's own full forward without any cache (every
step's logits, prompt logprobs, under chunked prefill and preemption), transformers' logits processors, the
OpenAI penalty formula, a brute-force token-by-token stop-string search, and a chi-square test against exactly
computed probabilities. Also the scheduler's budget, the paged pool's size and the parameter checks."""

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from llmlab.infer import LLM, Engine, SamplingParams
from llmlab.infer.params import MAX_STOP_STRINGS
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20
WINDOW = 96


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", max_seq_len=WINDOW)).eval()


@pytest.fixture(scope="module")
def mla_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", max_seq_len=WINDOW, attention="mla", kv_lora_rank=16,
                                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)).eval()


@pytest.fixture(scope="module")
def tok():
    return train([TEXT], kind="bpe", vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def prompts(k: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(k)]


@torch.no_grad()
def full_log_softmax(model, ids: list[int]) -> torch.Tensor:
    """No cache at all: one forward over the whole sequence, log-softmax of every position [T, V]."""
    return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@torch.no_grad()
def reference_loop(model, prompt: list[int], n: int, transform=None, eos: tuple[int, ...] = (),
                   min_tokens: int = 0, vocab: int | None = None) -> list[int]:
    """Greedy decoding with a full forward per step (no cache); transform(prompt, out, logits) -> logits; EOS
    masked while fewer than min_tokens tokens are out, generation ends on (and keeps) the first EOS after."""
    out: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([prompt + out])).logits[0, -1].float().clone()
        if vocab is not None:
            logits[vocab:] = -math.inf
        if transform is not None:
            logits = transform(prompt, out, logits)
        if len(out) < min_tokens:
            logits[list(eos)] = -math.inf
        t = int(logits.argmax())
        out.append(t)
        if t in eos:
            break
    return out


def run_engine(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]], arrive_every: int = 1):
    """Feed the requests one every `arrive_every` steps; return finished outputs by id and the step log."""
    pending, done, step = list(requests), {}, 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            rid = pending.pop(0)
            engine.add_request(rid, *requests[rid])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


# ------------------------------------------------------------------------------ cache equivalence, end to end
@pytest.mark.parametrize("layout, block_size, num_blocks", [
    ("paged", 1, 40), ("paged", 4, 10), ("paged", 16, 3), ("contiguous", None, None)])
def test_engine_logits_of_every_step_equal_no_cache(model, layout, block_size, num_blocks):
    """Through the whole engine (packed prefill chunks, padded decode batches, staggered arrivals, a pool far too
    small for everyone, so preemption and recompute happen, block tables scattered over the pool): the full
    log-softmax of every generated position equals the model's no-cache forward over prompt + output."""
    ps = prompts(5, seed=21, lo=10, hi=26)
    vocab = model.cfg.vocab_size
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=vocab)
    if layout == "paged":
        engine = Engine(model, block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=7)
        order = list(range(num_blocks))
        random.Random(block_size).shuffle(order)
        engine.cache.blocks.free_ids = order  # blocks come out of the pool in a scrambled order
    else:
        engine = Engine(model, kv_layout="contiguous", max_num_seqs=3, max_num_batched_tokens=7)
    tables = []
    step_orig = engine.step

    def step():
        tables.extend(list(s.block_table) for s in engine.scheduler.running)
        return step_orig()

    engine.step = step
    done = run_engine(engine, {str(i): (p, params) for i, p in enumerate(ps)}, arrive_every=2)
    for i, p in enumerate(ps):
        out = done[str(i)]
        assert len(out.token_ids) == 12 and len(out.logprobs) == 12
        ref = full_log_softmax(model, p + out.token_ids)
        for t, lp in enumerate(out.logprobs):
            row = ref[len(p) - 1 + t]
            assert lp.token_id == out.token_ids[t] == int(row.argmax())
            got = torch.full((vocab,), math.nan)
            got[list(lp.top)] = torch.tensor(list(lp.top.values()))
            torch.testing.assert_close(got, row, atol=1e-4, rtol=0)
    if layout == "paged":
        assert engine.scheduler.num_preemptions > 0, "the pool was meant to run out"
        if block_size < 16:
            assert any(t != list(range(t[0], t[0] + len(t))) for t in tables if len(t) > 1), "tables not scattered"
    assert engine.cache.blocks.in_use() == 0 and all(r == 0 for r in engine.cache.blocks.ref)


def test_mla_engine_greedy_equals_no_cache_and_pool_holds_the_latent(mla_model):
    ps = prompts(3, seed=4, lo=5, hi=20)
    llm = LLM(mla_model, block_size=4, max_num_batched_tokens=9)
    outs = llm.generate(ps, SamplingParams(max_tokens=16, temperature=0))
    for p, o in zip(ps, outs):
        assert o.token_ids == reference_loop(mla_model, p, 16)
    cfg = mla_model.cfg
    per_token = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32 latent + rotary key
    blocks = llm.engine.cache.blocks
    assert llm.engine.cache.nbytes() == blocks.num_blocks * blocks.block_size * per_token


# ------------------------------------------------------------------------------ prompt logprobs
def test_prompt_logprobs_of_packed_prompts_equal_the_model(model):
    """Several prompts prefilled together (packed into one row, cut into chunks by a small budget): every prompt
    token's logprob and its top-3 alternatives, values included, equal the no-cache forward."""
    ps = prompts(3, seed=30, lo=6, hi=30)
    outs = LLM(model, block_size=4, max_num_batched_tokens=11).generate(
        ps, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    for p, o in zip(ps, outs):
        ref = full_log_softmax(model, p)
        assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
        for t in range(1, len(p)):
            lp = o.prompt_logprobs[t]
            assert lp.token_id == p[t]
            assert lp.logprob == pytest.approx(float(ref[t - 1, p[t]]), abs=1e-4)
            top = ref[t - 1].topk(3)
            assert list(lp.top) == top.indices.tolist()
            assert list(lp.top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_dynamic_ntk_prompts_packed_together_each_get_their_own_stretch():
    """Dynamic NTK stretches RoPE by the length of the sequence. Prompts prefilled together in one packed row each
    get the logits of their own no-cache forward, not the stretch of their longest neighbour."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("nano", max_seq_len=WINDOW, rope_scaling="dynamic_ntk", rope_factor=4.0,
                                       rope_original_max_seq_len=8)).eval()
    rng = random.Random(5)
    ps = [[rng.randrange(1, 512) for _ in range(n)] for n in (12, 37, 6, 20)]  # the 6 is below the original 8
    llm = LLM(m, block_size=4, max_num_batched_tokens=128)
    outs = llm.generate(ps, SamplingParams(max_tokens=1, temperature=0, logprobs=3, prompt_logprobs=1))
    assert llm.engine.scheduler.num_preemptions == 0
    for p, o in zip(ps, outs):
        ref = full_log_softmax(m, p)
        got = [lp.logprob for lp in o.prompt_logprobs[1:]] + [o.logprobs[0].logprob]
        want = [float(ref[t - 1, p[t]]) for t in range(1, len(p))] + [float(ref[-1].max())]
        assert got == pytest.approx(want, abs=1e-4)
        assert o.token_ids == [int(ref[-1].argmax())]


def test_prompt_logprobs_survive_preemption_in_the_middle_of_prefill(model):
    rng = random.Random(1)
    early = [rng.randrange(1, 512) for _ in range(10)]
    late = [rng.randrange(1, 512) for _ in range(40)]
    engine = Engine(model, block_size=4, num_blocks=12, max_num_batched_tokens=8)
    engine.add_request("early", early, SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    engine.add_request("late", late, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    late_seq = engine.requests["late"].samples[0].seq
    preempted_mid_prefill, done = False, {}
    while engine.has_unfinished():
        before = late_seq.num_computed
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if late_seq.preemptions and not preempted_mid_prefill:
            preempted_mid_prefill = 0 < before < len(late)
    assert preempted_mid_prefill and engine.scheduler.num_preemptions > 0
    ref = full_log_softmax(model, late)
    plp = done["late"].prompt_logprobs
    assert len(plp) == len(late)
    for t in range(1, len(late)):
        assert plp[t].token_id == late[t]
        assert plp[t].logprob == pytest.approx(float(ref[t - 1, late[t]]), abs=1e-4)


# ------------------------------------------------------------------------------ scheduler
def test_scheduler_budget_chunking_joining_and_leaving(model):
    """Every step stays within max_num_batched_tokens; a long prompt is prefilled in chunks while another request
    keeps decoding in the same steps; a request added between steps runs in the very next step; a finished
    request's blocks are back in the pool in the step it finishes. Outputs still equal the no-cache reference."""
    budget = 6
    engine = Engine(model, block_size=4, max_num_batched_tokens=budget)
    short, long = prompts(1, seed=40, lo=3, hi=4)[0], prompts(1, seed=41, lo=30, hi=31)[0]
    engine.add_request("short", short, SamplingParams(max_tokens=20, temperature=0))
    engine.step()  # the short prompt's prefill
    engine.add_request("long", long, SamplingParams(max_tokens=3, temperature=0))
    seqs = {"short": engine.requests["short"].samples[0].seq, "long": engine.requests["long"].samples[0].seq}
    batches, mixed, done = [], 0, {}
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        batches.append({s.seq_id: n for s, n in zip(batch.seqs, batch.num_new)})
        return batch

    engine.scheduler.schedule = spy
    first = True
    while engine.has_unfinished():
        outs = engine.step()
        b = batches[-1]
        assert sum(b.values()) <= budget
        if first:  # joined at once, next to the running decode
            assert seqs["long"].seq_id in b and b.get(seqs["short"].seq_id) == 1
            first = False
        if b.get(seqs["long"].seq_id, 0) > 1 and b.get(seqs["short"].seq_id) == 1:
            mixed += 1
        for out in outs:
            if out.finished:
                done[out.request_id] = out
                seq = seqs[out.request_id]
                assert seq.block_table == [] and seq not in engine.scheduler.running
        assert engine.cache.blocks.in_use() == sum(len(s.block_table) for s in engine.scheduler.running)
    assert mixed >= 4  # 30 prompt tokens at <= 5 a step beside a decode
    assert done["short"].token_ids == reference_loop(model, short, 20)
    assert done["long"].token_ids == reference_loop(model, long, 3)
    assert engine.cache.blocks.in_use() == 0


def test_paged_pool_is_sized_from_the_memory_budget(model):
    """num_blocks = budget // (bytes per token · block_size), bytes per token from the shapes: K and V, every
    layer, n_kv_heads · head_dim fp32 values each. The pool actually allocated is exactly that many blocks."""
    cfg = model.cfg
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.dim // cfg.n_heads) * 4
    budget = 100_000
    llm = LLM(model, block_size=4, kv_memory=budget)
    assert llm.engine.cache.blocks.num_blocks == budget // (per_token * 4)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))
    assert llm.engine.cache.nbytes() == llm.engine.cache.blocks.num_blocks * 4 * per_token <= budget


# ------------------------------------------------------------------------------ logits processors, end to end
def _freq_presence(f: float, p: float, count_prompt: bool = False):
    def transform(prompt, out, logits):
        seen = (prompt if count_prompt else []) + out
        for j in set(seen):
            c = seen.count(j)
            logits[j] -= c * f + p
        return logits
    return transform


def _hf(processor):
    def transform(prompt, out, logits):
        return processor(torch.tensor([prompt + out]), logits[None])[0]
    return transform


def _bias(bias):
    def transform(prompt, out, logits):
        for j, b in bias.items():
            logits[j] += b
        return logits
    return transform


@pytest.mark.parametrize("name", ["repetition", "no_repeat_ngram", "frequency_presence", "logit_bias"])
def test_engine_penalties_equal_reference_decoding(model, name):
    """Each processor through the engine (batched, paged) against a no-cache greedy loop that applies
    transformers' processor or the OpenAI formula; a wrong variant (over the wrong tokens) must differ."""
    ps = prompts(3, seed=50, lo=4, hi=12)
    # a prompt that already holds the tokens the model goes on to emit: which tokens a penalty counts (prompt and
    # output, or output only) then changes the result
    ps.append(ps[0] + reference_loop(model, ps[0], 12))
    bias = {t: 4.0 for t in range(0, 512, 7)}
    kw, transform = {
        "repetition": (dict(repetition_penalty=1.8), _hf(RepetitionPenaltyLogitsProcessor(1.8))),
        "no_repeat_ngram": (dict(no_repeat_ngram_size=2), _hf(NoRepeatNGramLogitsProcessor(2))),
        "frequency_presence": (dict(frequency_penalty=1.5, presence_penalty=0.7), _freq_presence(1.5, 0.7)),
        "logit_bias": (dict(logit_bias=bias), _bias(bias)),
    }[name]
    n = 24
    outs = LLM(model, block_size=4).generate(ps, SamplingParams(max_tokens=n, temperature=0, **kw))
    changed = 0
    for p, o in zip(ps, outs):
        want = reference_loop(model, p, n, transform)
        assert o.token_ids == want
        changed += want != reference_loop(model, p, n)
    assert changed >= 1, "the processor never changed the greedy output: the test would not see a bug"
    if name == "frequency_presence":  # counting prompt tokens too (the repetition penalty's set) differs
        assert any(o.token_ids != reference_loop(model, p, n, _freq_presence(1.5, 0.7, True))
                   for p, o in zip(ps, outs))
    if name == "repetition":  # counting output tokens only (the OpenAI penalties' set) differs
        def output_only(prompt, out, logits):
            return RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([out]), logits[None])[0] if out else logits
        assert any(o.token_ids != reference_loop(model, p, n, output_only) for p, o in zip(ps, outs))
    if name == "no_repeat_ngram":
        for o, p in zip(outs, ps):
            seq = p + o.token_ids
            for i in range(len(p) - 1, len(seq) - 1):  # no generated token completes a bigram seen before
                assert tuple(seq[i:i + 2]) not in {tuple(seq[j:j + 2]) for j in range(i)}


def test_min_tokens_against_reference_decoding(model):
    """EOS (a token the model emits early) is masked until min_tokens tokens are out; generation then ends on
    the first EOS, which is kept in token_ids. The reference is a no-cache loop with the mask applied by hand."""
    p = prompts(1, seed=9, lo=2, hi=30)[0]
    free = reference_loop(model, p, 40)
    eos = free[2]
    for min_tokens in (0, 3, 8, 15):
        want = reference_loop(model, p, 40, eos=(eos,), min_tokens=min_tokens)
        out = LLM(model, eos_token_ids=[eos]).generate([p], SamplingParams(max_tokens=40, temperature=0,
                                                                             min_tokens=min_tokens))[0]
        assert out.token_ids == want
        assert eos not in out.token_ids[:min_tokens]
        assert out.finish_reason == ("stop" if want[-1] == eos else "length")
        # as a stop token id instead of EOS: the same
        out = LLM(model).generate([p], SamplingParams(max_tokens=40, temperature=0, min_tokens=min_tokens,
                                                      stop_token_ids=[eos]))[0]
        assert out.token_ids == want
    assert len(reference_loop(model, p, 40, eos=(eos,), min_tokens=8)) > 8 > len(reference_loop(model, p, 40,
                                                                                                  eos=(eos,)))


# ------------------------------------------------------------------------------ stop strings
def test_stop_strings_brute_force(model, tok):
    """For many stop strings and sets of them taken from the free text: the engine's text equals a brute-force
    token-by-token search (decode out[:t] for t = 1, 2, ...; at the first t where any stop string occurs, cut at
    its earliest occurrence), streamed pieces concatenate to exactly that text (nothing leaked and taken back),
    and finish_reason/stop_reason say which string stopped it."""
    llm = LLM(model, tok, block_size=4)
    prompt = "the cat sat on"
    words = {i: 10.0 for i in range(len(tok))
             if len(tok.decode([i]).strip()) >= 2 and tok.decode([i]).strip().isalpha()}
    base = dict(max_tokens=30, temperature=0, logit_bias=words)
    free = llm.generate([prompt], SamplingParams(**base))[0]
    ids, text = free.token_ids, free.text
    assert len(text) > 40

    def brute(stops):
        for t in range(1, len(ids) + 1):
            s_text = tok.decode(ids[:t])
            hits = [(s_text.find(s), s) for s in stops if s in s_text]
            if hits:
                at, s = min(hits)
                return s_text[:at], s
        return text, None

    rng = random.Random(0)
    cases = []
    for _ in range(12):
        a = rng.randrange(len(text) - 8)
        cases.append([text[a:a + rng.randrange(1, 9)]])
    for _ in range(6):
        cases.append([text[a:a + rng.randrange(2, 7)] for a in rng.sample(range(len(text) - 8), 3)])
    cases += [[text[:3]], [text[-4:]], ["zzz never"], [" ", "t"], [text[5:30]]]
    spanning_three = 0
    for stops in cases:
        want, reason = brute(stops)
        params = SamplingParams(**base, stop=stops)
        out = llm.generate([prompt], params)[0]
        assert out.text == want, stops
        assert out.finish_reason == ("stop" if reason else "length") and out.outputs[0].stop_reason == reason
        streamed = list(llm.stream(prompt, params))
        assert "".join(streamed) == want, stops
        if reason and len(reason) > 1:
            start = len(want)
            # how many tokens the stop string covers
            ends = [len(tok.decode(ids[:t])) for t in range(len(ids) + 1)]
            first = max(t for t in range(len(ids) + 1) if ends[t] <= start)
            last = min(t for t in range(len(ids) + 1) if ends[t] >= start + len(reason))
            spanning_three += last - first >= 3
    assert spanning_three >= 1  # some stop string spans three tokens
    assert llm.engine.cache.blocks.in_use() == 0


def test_stop_string_in_the_prompt_does_not_stop(model, tok):
    """Stop strings are searched in the generated text only: one that occurs in the prompt (and not in the
    output) changes nothing."""
    llm = LLM(model, tok)
    base = dict(max_tokens=10, temperature=0)
    prompt = "the cat sat on"
    free = llm.generate([prompt], SamplingParams(**base))[0]
    stop = next(s for s in ("cat sat", "the cat", "sat on", "at s") if s not in free.text)
    out = llm.generate([prompt], SamplingParams(**base, stop=[stop]))[0]
    assert out.text == free.text and out.token_ids == free.token_ids and out.finish_reason == "length"


# ------------------------------------------------------------------------------ sampling, seeds, n > 1
def test_engine_samples_follow_the_model_distribution(model):
    """1500 first tokens of one request (n=1500, forked from one prefill) against the exact distribution: the
    no-cache logits through transformers' temperature, top-k and min-p warpers, softmax. Chi-square at 0.999;
    the same counts reject the distribution without min-p and at another temperature (the test has power)."""
    p = prompts(1, seed=65, lo=8, hi=9)[0]
    T, k, min_p, n = 0.1, 6, 0.2, 1500  # the random model's logits are flat (std 0.16): a low temperature
    torch.manual_seed(123)
    out = LLM(model).generate([p], SamplingParams(max_tokens=1, temperature=T, top_k=k, min_p=min_p, n=n))[0]
    assert len(out.outputs) == n
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in out.outputs]), minlength=512).double()
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[0, -1:].double()

    def dist(t, mp):
        x = TopKLogitsWarper(k)(None, TemperatureLogitsWarper(t)(None, logits.clone()))
        if mp:
            x = MinPLogitsWarper(mp)(None, x)
        return x[0].softmax(-1)

    crit = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}  # chi2 0.999 quantiles

    def stat(q):
        e = q[q > 0] * n
        return float(((counts[q > 0] - e) ** 2 / e).sum()), int((q > 0).sum()) - 1

    want = dist(T, min_p)
    assert counts[want == 0].sum() == 0, "a token outside top-k / min-p was drawn"
    s, df = stat(want)
    assert df == 2 and s < crit[df], (s, df)  # min-p left 3 of the top 6
    for wrong in (dist(T, 0.0), dist(0.15, min_p)):
        s_wrong, df_wrong = stat(wrong)
        assert s_wrong > crit[df_wrong], (s_wrong, df_wrong)


def test_seed_reproduces_across_engines_layouts_and_neighbours(model):
    p = prompts(1, seed=61, lo=7, hi=8)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    alone = LLM(model).generate([p], sp)[0].token_ids
    noise = [SamplingParams(max_tokens=16, temperature=1.0), SamplingParams(max_tokens=5, temperature=0.5, seed=1)]
    for engine_kw in (dict(block_size=1), dict(kv_layout="contiguous", max_num_seqs=4), dict(block_size=16)):
        outs = LLM(model, **engine_kw).generate([prompts(1, seed=62, lo=3, hi=9)[0], p, p],
                                                [noise[0], sp, noise[1]])
        assert outs[1].token_ids == alone
    assert LLM(model).generate([p], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=43))[0].token_ids \
        != alone


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_n_samples_under_preemption_equal_their_solo_runs(model, layout):
    """n=3 samples forked from one prefill into a pool that cannot hold all of them (copy on write of the shared
    tail block, then preemption and recompute of a sample): each sample equals a lone request with its seed,
    and no block stays referenced."""
    p = prompts(1, seed=63, lo=10, hi=11)[0]
    sp = SamplingParams(max_tokens=20, temperature=1.0, n=3, seed=7)
    if layout == "paged":
        llm = LLM(model, block_size=4, num_blocks=9)
    else:
        llm = LLM(model, kv_layout="contiguous", max_num_seqs=2)
    out = llm.generate([p], sp)[0]
    for o in out.outputs:
        solo = LLM(model, block_size=4).generate([p], SamplingParams(max_tokens=20, temperature=1.0,
                                                                     seed=7 + o.index))[0]
        assert o.token_ids == solo.token_ids
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.cache.blocks.in_use() == 0 and all(r == 0 for r in llm.engine.cache.blocks.ref)


# ------------------------------------------------------------------------------ bad input
def test_context_window_boundaries(model, tok):
    llm = LLM(model, tok)
    ok = list(range(1, WINDOW))  # 95 tokens: one left to generate
    out = llm.generate([ok], SamplingParams(max_tokens=8, temperature=0))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    assert out.token_ids == reference_loop(model, ok, 1, vocab=len(tok))
    with pytest.raises(ValueError, match=f"{WINDOW} tokens but the context window is {WINDOW}"):
        llm.generate([list(range(1, WINDOW + 1))])
    # a text prompt: the error names both lengths too; truncate keeps the last tokens
    long = "the cat sat on the mat " * 40
    n = len(tok.encode(long))
    assert n > WINDOW
    with pytest.raises(ValueError, match=f"{n} tokens but the context window is {WINDOW}"):
        llm.generate(long)
    out = llm.generate(long, SamplingParams(max_tokens=4, temperature=0), truncate=True)[0]
    assert out.prompt_token_ids == tok.encode(long)[-(WINDOW - 1):]
    # prompt + max_tokens past the window: generation stops at the window with "length"
    p = list(range(1, 90))
    out = llm.generate([p], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(p) + len(out.token_ids) == WINDOW and out.finish_reason == "length"
    assert not llm.engine.requests and llm.engine.cache.blocks.in_use() == 0


@pytest.mark.parametrize("bad, field", [
    (dict(top_p=-0.1), "top_p"), (dict(top_p=1.0000001), "top_p"), (dict(temperature=-1e-9), "temperature"),
    (dict(n=-1), "n"), (dict(n=2.0), "n"), (dict(stop=["s"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (dict(stop=[""]), "stop"), (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(prompt_logprobs=-2), "prompt_logprobs"),
])
def test_invalid_parameters_name_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid"):
        SamplingParams(**bad)


def test_valid_boundary_parameters_are_accepted():
    SamplingParams(top_p=1.0)
    SamplingParams(top_p=1e-9)
    SamplingParams(temperature=0.0)
    SamplingParams(n=1)
    assert SamplingParams(stop=["s"] * MAX_STOP_STRINGS).stop == ["s"] * MAX_STOP_STRINGS
    assert SamplingParams(stop="abc").stop == ["abc"]  # one string, not three characters
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_nan_parameters_are_refused(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: float("nan")})
