"""The engine end to end on a tiny random model: greedy equals a no-cache reference loop; a request gets the
same tokens alone and inside a continuous batch (staggered arrivals, chunked prefill, preemption when the
pool runs dry); n samples fork with copy on write; prefix caching reuses blocks; logprobs; stop strings
across token boundaries never leak into streamed text; bad input gets clear errors."""

import random

import pytest
import torch

from llmlab.infer import LLM, Engine, SamplingParams
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", max_seq_len=96)).eval()


@pytest.fixture(scope="module")
def tok():
    return train([TEXT], kind="bpe", vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def greedy_reference(model, ids: list[int], n: int, vocab: int | None = None) -> list[int]:
    """Full forward every step, no cache; only the first `vocab` ids may be chosen."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1, :vocab].argmax())
            out.append(t)
            ids.append(t)
    return out


def prompts(k: int, seed: int = 0, lo: int = 2, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(k)]


def run_alone(model, prompt, params, **engine) -> list[int]:
    return LLM(model, **engine).generate([prompt], params)[0].token_ids


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_greedy_batch_equals_reference(model, layout):
    ps = prompts(4)
    outs = LLM(model, block_size=4, kv_layout=layout).generate(ps, SamplingParams(max_tokens=32, temperature=0))
    for p, o in zip(ps, outs):
        assert o.token_ids == greedy_reference(model, p, 32)
        assert o.finish_reason == "length" and len(o.outputs) == 1


def test_continuous_batching_with_chunked_prefill_and_preemption(model):
    """Staggered arrivals, 8-token prefill chunks and a pool of 14 blocks of 4 tokens (7 sequences that all
    want ~50 tokens cannot fit): every request still gets exactly its solo output, greedy or seeded."""
    ps = prompts(7, seed=3, lo=10, hi=30)
    params = [SamplingParams(max_tokens=24, temperature=0) if i % 2 else
              SamplingParams(max_tokens=24, temperature=0.9, top_k=40, seed=100 + i) for i in range(7)]
    solo = [run_alone(model, p, sp, block_size=4) for p, sp in zip(ps, params)]
    engine = Engine(model, block_size=4, num_blocks=14, max_num_batched_tokens=8, max_num_seqs=5)
    done, pending, steps = {}, list(range(7)), 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:  # a new request every third step
            i = pending.pop(0)
            engine.add_request(str(i), ps[i], params[i])
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.token_ids
        steps += 1
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to run out"
    assert [done[i] for i in range(7)] == solo
    assert engine.cache.blocks.in_use() == 0 and all(r == 0 for r in engine.cache.blocks.ref)


def test_contiguous_layout_keeps_rows_compact(model):
    """Requests of different lengths finish at different times; the contiguous layout moves survivors into
    the freed rows, so the running sequences always hold rows 0..n-1 (decode keys are then a view), and
    every output still equals its solo run. Three rows for six requests: the rest wait their turn."""
    ps = prompts(6, seed=11, lo=3, hi=20)
    params = [SamplingParams(max_tokens=4 + 5 * i, temperature=0) for i in range(6)]
    engine = Engine(model, kv_layout="contiguous", max_num_seqs=3)
    assert engine.cache.blocks.num_blocks == 3 and engine.cache.block_size == 96
    for i in (5, 0, 3, 1, 4, 2):
        engine.add_request(str(i), ps[i], params[i])
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.token_ids
        assert sorted(s.block_table[0] for s in engine.scheduler.running) == list(range(len(engine.scheduler.running)))
    for i in range(6):
        assert done[i] == greedy_reference(model, ps[i], 4 + 5 * i)
    assert engine.cache.blocks.in_use() == 0


def test_contiguous_rows_default_to_the_kv_budget_not_64_full_contexts():
    """With nothing asked, the contiguous layout holds as many max_seq_len rows as DEFAULT_KV_MEMORY does (at
    least one): 64 rows of SmolLM2's 8k context would reserve 24 GB. An explicit max_num_seqs is obeyed."""
    from llmlab.infer.engine import DEFAULT_KV_MEMORY
    from llmlab.model.cost import kv_cache_bytes_per_token

    cfg = ModelConfig.preset("nano", max_seq_len=32768)
    long_model = Transformer(cfg).eval()
    per_row = kv_cache_bytes_per_token(cfg, 4) * cfg.max_seq_len
    engine = Engine(long_model, kv_layout="contiguous")
    assert engine.cache.blocks.num_blocks == engine.scheduler.max_num_seqs == max(1, DEFAULT_KV_MEMORY // per_row) < 64
    assert engine.cache.blocks.num_blocks * per_row <= max(DEFAULT_KV_MEMORY, per_row)
    assert Engine(long_model, kv_layout="contiguous", max_num_seqs=5).cache.blocks.num_blocks == 5
    assert Engine(long_model, kv_layout="contiguous", kv_memory=3 * per_row).cache.blocks.num_blocks == 3
    assert Engine(long_model).scheduler.max_num_seqs == 64


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_n_samples_fork_with_copy_on_write(model, layout):
    """Sample i of a request with seed s draws from seed s + i: it must equal a lone request with that seed.
    The 10-token prompt leaves its last block shared and half full, so every sample copies it before
    writing."""
    p = prompts(1, seed=5, lo=10, hi=11)[0]
    llm = LLM(model, block_size=4, kv_layout=layout)
    out = llm.generate([p], SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert o.token_ids == run_alone(model, p, SamplingParams(max_tokens=16, temperature=1.0, seed=7 + o.index),
                                        block_size=4)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert llm.engine.cache.blocks.in_use() == 0


def test_prefix_caching_reuses_blocks_with_identical_output(model):
    p = prompts(1, seed=6, lo=25, hi=26)[0]
    llm = LLM(model, block_size=4)
    params = SamplingParams(max_tokens=8, temperature=0)
    first = llm.generate([p], params)[0].token_ids
    assert llm.engine.scheduler.prefix_cached_tokens == 0
    second = llm.generate([p + [3]], params)[0].token_ids  # same 24 leading tokens: 6 full blocks
    assert llm.engine.scheduler.prefix_cached_tokens == 24
    assert first == greedy_reference(model, p, 8) and second == greedy_reference(model, p + [3], 8)


def test_logprobs_and_prompt_logprobs_equal_the_model(model):
    p = prompts(1, seed=8, lo=12, hi=13)[0]
    out = LLM(model, block_size=4, max_num_batched_tokens=5).generate(
        [p], SamplingParams(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2))[0]
    full = p + out.token_ids
    with torch.no_grad():
        ref = model(torch.tensor([full])).logits[0].log_softmax(-1)
    for t, lp in enumerate(out.logprobs):
        pos = len(p) - 1 + t
        assert lp.token_id == out.token_ids[t]
        assert lp.logprob == pytest.approx(float(ref[pos, lp.token_id]), abs=1e-4)
        top = ref[pos].topk(3)
        assert list(lp.top) == top.indices.tolist()
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(p)
    for t in range(1, len(p)):  # chunked prefill (5 tokens a step) must still cover every prompt token
        assert plp[t].token_id == p[t]
        assert plp[t].logprob == pytest.approx(float(ref[t - 1, p[t]]), abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs), abs=1e-4)


def test_stop_strings_across_token_boundaries_never_leak(model, tok):
    llm = LLM(model, tok, block_size=4)
    prompt = "the cat sat on"
    # steer the random model to multi-letter word pieces so the text is readable and tokens are long
    words = {i: 10.0 for i in range(len(tok)) if len(tok.decode([i]).strip()) >= 2 and tok.decode([i]).strip().isalpha()}
    free = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, logit_bias=words))[0]
    pieces = [tok.decode([i]) for i in free.token_ids]
    assert "".join(pieces) == free.text and all(len(p) >= 2 for p in pieces)
    # a stop string that starts inside token k and ends inside token k + 1
    k = 3
    stop = pieces[k][1:] + pieces[k + 1][:1]
    expected = free.text[:free.text.find(stop)]
    assert len(expected) >= len("".join(pieces[:k])) + 1
    params = SamplingParams(max_tokens=30, temperature=0, logit_bias=words, stop=[stop, "never appears"])
    out = llm.generate([prompt], params)[0]
    assert out.text == expected and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    streamed = list(llm.stream(prompt, params))
    assert "".join(streamed) == expected and len(streamed) > 1
    # with min_tokens past the first occurrence, that occurrence is part of the answer
    late = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, logit_bias=words, stop=[stop],
                                                 min_tokens=k + 3))[0]
    assert late.text.startswith(expected + stop) and len(late.text) > len(expected) + len(stop)
    assert llm.engine.cache.blocks.in_use() == 0


def test_eos_and_stop_token_ids_and_min_tokens(model):
    p = prompts(1, seed=9)[0]
    ref = greedy_reference(model, p, 20)
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    llm = LLM(model, eos_token_ids=[stop_tok])
    out = llm.generate([p], SamplingParams(max_tokens=20, temperature=0))[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_tok
    assert llm.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids == ref
    out = LLM(model).generate([p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == ref[:first + 1]
    out = llm.generate([p], SamplingParams(max_tokens=20, temperature=0, min_tokens=first + 1))[0]
    assert stop_tok not in out.token_ids[:first + 1]


def test_chat_uses_the_template(model, tok):
    llm = LLM(model, tok)
    messages = [{"role": "user", "content": "the cat"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0), chat_template="chatml")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, chat_template="chatml")
    # the model's 512 ids exceed the tokenizer's 300: ids without text are never sampled
    assert out.prompt_token_ids == ids and out.token_ids == greedy_reference(model, ids, 4, vocab=len(tok))


def test_context_window(model):
    llm = LLM(model)
    long = list(range(1, 101))  # the window is 96
    with pytest.raises(ValueError, match="100 tokens but the context window is 96"):
        llm.generate([long])
    out = llm.generate([long], SamplingParams(max_tokens=8, temperature=0), truncate=True)[0]
    assert out.prompt_token_ids == long[-95:] and len(out.token_ids) == 1 and out.finish_reason == "length"
    assert llm.engine.cache.blocks.in_use() == 0 and not llm.engine.requests


@pytest.mark.parametrize("bad, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(n=0), "n="), (dict(stop=["x"] * 17), "at most 16"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2), "min_p"), (dict(frequency_penalty=3), "frequency_penalty"), (dict(logprobs=-1), "logprobs"),
])
def test_invalid_parameters(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_bad_requests(model):
    llm = LLM(model)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.generate(["text"])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match=r"lie in \[0, 512\)"):
        llm.generate([[1, 600]])
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[1]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="kv_layout must be"):
        LLM(model, kv_layout="ragged")
    with pytest.raises(ValueError, match="pool has 2"):
        LLM(model, block_size=4, num_blocks=2).generate([[1] * 5], SamplingParams(max_tokens=8))
    assert not llm.engine.requests and llm.engine.cache.blocks.in_use() == 0


def test_guided_json_output_follows_the_schema(model, tok):
    """Constrained decoding through the engine: every sample (n=3, forked from one prompt) is valid JSON
    under the schema, although the random model alone never writes JSON."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                        "maxItems": 3}},
              "required": ["name", "age"]}
    llm = LLM(model, tok, eos_token_ids=[tok.token_to_id("<|endoftext|>")])
    out = llm.generate(["the cat"], SamplingParams(max_tokens=80, temperature=1.0, seed=3, n=3, guided_json=schema))[0]
    for o in out.outputs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
    free = llm.generate(["the cat"], SamplingParams(max_tokens=40, temperature=1.0, seed=3))[0].text
    with pytest.raises(ValueError):
        json.loads(free)
    assert llm.engine.cache.blocks.in_use() == 0


def test_prompt_chunks_go_packed_into_one_forward_without_padding(model, monkeypatch):
    """Prompts of very different lengths: one [1, sum of lengths] forward for all of them, same outputs."""
    ps = [prompts(1, seed=5, lo=2, hi=3)[0], prompts(1, seed=6, lo=40, hi=41)[0], prompts(1, seed=7, lo=9, hi=10)[0]]
    shapes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: shapes.append(tuple(ids.shape)) or forward(ids, **kw))
    outs = LLM(model, block_size=4).generate(ps, SamplingParams(max_tokens=6, temperature=0))
    assert shapes[0] == (1, sum(map(len, ps)))
    for p, o in zip(ps, outs):
        assert o.token_ids == greedy_reference(model, p, 6)
