"""Beam search parity with Hugging Face transformers: tiny random HF models (Llama, GPT-2, Qwen2) converted into
ours as tests/parity/test_hf_parity.py does; `beam_search` must return the sequences and sequences_scores of
`generate(num_beams=...)` for a left-padded batch of two prompts of different lengths.

The eos tokens are ones these random models like to emit (found by running the search without eos), so
hypotheses really finish early; every eos case asserts that some hypothesis ended in an eos, and
test_settings_change_the_result checks that early_stopping and length_penalty change the outcome on these
models, so agreeing with transformers on them is not vacuous.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmlab.infer import LLM  # noqa: E402
from llmlab.infer.beam import BeamHypothesis, BeamParams, beam_search, reorder_cache  # noqa: E402
from llmlab.infer.cache import PagedKVCache  # noqa: E402
from llmlab.io import config_from_hf, state_dict_from_hf  # noqa: E402
from llmlab.model import KVCache, ModelConfig, Transformer  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 160
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_SHAPE = dict(SHAPE, num_key_value_heads=2, rms_norm_eps=1e-6)
QWEN2_ROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
GPT2_SHAPE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                  eos_token_id=None, layer_norm_epsilon=1e-5)

PROMPTS = [[3, 17, 42, 99, 5, 8], [77, 12, 150]]  # different lengths: transformers left-pads the second
PAD = 0
MAX_TOKENS = 10
# Tokens each random model emits often under beam search (seed 0): as eos they end many hypotheses early.
EOS = {"llama": (144, 142), "gpt2": (117, 114), "qwen2": (154, 13)}


# ---------------------------------------------------------------------------------------------- models
@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """As tests/parity: gains ~ 1 + N(0, 0.2²), other 1-D ~ N(0, 0.1²), matrices ~ N(0, 0.15²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.dim() >= 2:
            p.copy_(0.15 * noise)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    return model.eval()


@functools.lru_cache(maxsize=None)
def models(family: str) -> tuple[torch.nn.Module, Transformer]:
    """(transformers model, ours with the same weights), float32, eval mode."""
    cls, config = {
        "llama": (LlamaForCausalLM, lambda: LlamaConfig(**LLAMA_SHAPE)),
        "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(**GPT2_SHAPE)),
        "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**LLAMA_SHAPE, **QWEN2_ROPE)),
    }[family]
    torch.manual_seed(0)
    hf = randomize_(cls(config()), 0)
    hf_config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    cfg = config_from_hf(hf_config)
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, hf_config), strict=True)
    return hf, ours.eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    return ids, mask


@torch.no_grad()
def hf_beam(hf, prompts, p: BeamParams) -> list[list[tuple[list[int], float]]]:
    """transformers' answer: per prompt, (new tokens, sequences_score) of each returned hypothesis."""
    ids, mask = left_padded(prompts)
    out = hf.generate(ids, attention_mask=mask, num_beams=p.num_beams, num_return_sequences=p.num_return_sequences,
                      do_sample=False, output_scores=True, return_dict_in_generate=True,
                      length_penalty=p.length_penalty, early_stopping=p.early_stopping, max_new_tokens=p.max_tokens,
                      eos_token_id=list(p.eos_token_ids) or None, pad_token_id=PAD)
    # beam_indices is -1 past each hypothesis' end: its count of generated tokens (the padding is not a token)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    L, n = ids.shape[1], p.num_return_sequences
    flat = [(out.sequences[i, L:L + k].tolist(), float(out.sequences_scores[i])) for i, k in enumerate(lengths)]
    return [flat[b * n:(b + 1) * n] for b in range(len(prompts))]


def assert_same(ours: list[list[BeamHypothesis]], ref: list[list[tuple[list[int], float]]]) -> None:
    assert [[h.token_ids for h in hs] for hs in ours] == [[t for t, _ in hs] for hs in ref]
    torch.testing.assert_close(torch.tensor([[h.score for h in hs] for hs in ours]),
                               torch.tensor([[s for _, s in hs] for hs in ref]), atol=1e-4, rtol=0)


def ended_by_eos(result: list[list[BeamHypothesis]], eos: tuple[int, ...]) -> int:
    return sum(len(h.token_ids) < MAX_TOKENS and h.token_ids[-1] in eos for hs in result for h in hs)


def assert_eos_mattered(family: str, params: BeamParams, result: list[list[BeamHypothesis]]) -> None:
    """Some returned hypothesis ended in an eos, or else (a length penalty > 1 favours long hypotheses, which
    then push the short eos-ended ones out of the heap) the answer differs from the search without eos."""
    if ended_by_eos(result, params.eos_token_ids):
        return
    assert params.length_penalty > 1
    without = beam_search(models(family)[1], PROMPTS, replace(params, eos_token_ids=()))
    assert [[h.token_ids for h in hs] for hs in result] != [[h.token_ids for h in hs] for hs in without]


def check(family: str, params: BeamParams, prompts=PROMPTS) -> list[list[BeamHypothesis]]:
    hf, ours = models(family)
    result = beam_search(ours, prompts, params)
    assert [len(hs) for hs in result] == [params.num_return_sequences] * len(prompts)
    assert_same(result, hf_beam(hf, prompts, params))
    return result


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_llama_with_eos(num_beams: int, length_penalty: float, early_stopping) -> None:
    params = BeamParams(num_beams, MAX_TOKENS, length_penalty, early_stopping, num_beams, EOS["llama"])
    assert_eos_mattered("llama", params, check("llama", params))


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.5, 2.0])
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_gpt2_qwen2_with_eos(family: str, length_penalty: float, early_stopping) -> None:
    params = BeamParams(4, MAX_TOKENS, length_penalty, early_stopping, 4, EOS[family])
    assert_eos_mattered(family, params, check(family, params))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("num_beams", [2, 5])
def test_without_eos_runs_to_max_tokens(family: str, num_beams: int) -> None:
    result = check(family, BeamParams(num_beams, MAX_TOKENS, 1.0, False, num_beams))
    assert all(len(h.token_ids) == MAX_TOKENS for hs in result for h in hs)


@pytest.mark.parametrize("eos", [(144,), (144, 142, 111)], ids=["one_eos", "three_eos"])
def test_number_of_eos_tokens(eos: tuple[int, ...]) -> None:
    """transformers keeps max(2, 1 + #eos) * num_beams candidates per step; the count matters."""
    result = check("llama", BeamParams(3, MAX_TOKENS, 1.0, "never", 3, eos))
    assert ended_by_eos(result, eos) > 0


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_fewer_returned_than_beams(num_return_sequences: int) -> None:
    check("llama", BeamParams(4, MAX_TOKENS, 1.0, False, num_return_sequences, EOS["llama"]))


@pytest.mark.parametrize("early_stopping", [False, True])
def test_one_new_token(early_stopping) -> None:
    check("gpt2", BeamParams(3, 1, 1.0, early_stopping, 3, EOS["gpt2"]))


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_prompts_of_equal_length_and_one_prompt(early_stopping) -> None:
    params = BeamParams(3, MAX_TOKENS, 1.0, early_stopping, 2, EOS["llama"])
    check("llama", params, prompts=[[9, 8, 7, 6], [1, 2, 3, 4]])
    check("llama", params, prompts=[[5, 6]])


def test_settings_change_the_result() -> None:
    """Guard against vacuous parity: on these models and prompts, each early_stopping mode and each length
    penalty gives a different answer somewhere, so a wrong stopping rule or penalty would be caught."""
    _, ours = models("llama")
    modes = [False, True, "never"]

    def run(lp, es):
        result = beam_search(ours, PROMPTS, BeamParams(4, MAX_TOKENS, lp, es, 4, EOS["llama"]))
        return [[(h.token_ids, round(h.score, 4)) for h in hs] for hs in result]

    by_mode = [run(1.0, es) for es in modes]
    assert all(by_mode[i] != by_mode[j] for i in range(3) for j in range(i + 1, 3))
    by_penalty = [run(lp, False) for lp in (0.5, 1.0, 2.0)]
    assert all(by_penalty[i] != by_penalty[j] for i in range(3) for j in range(i + 1, 3))


def test_early_stopping_saves_steps() -> None:
    """The search ends as soon as it may: early_stopping=True once the heap is full, False once the current-length
    bound says no running beam can win, "never" only when the max_tokens bound says so (here: never)."""
    _, ours = models("llama")
    calls = []
    hook = ours.register_forward_hook(lambda *_: calls.append(1))
    try:
        steps = {}
        for es in (True, False, "never"):
            calls.clear()
            beam_search(ours, PROMPTS[1:], BeamParams(3, MAX_TOKENS, 1.0, es, 3, EOS["llama"]))
            steps[es] = len(calls)  # prefill + one forward per further token
    finally:
        hook.remove()
    assert steps[True] < steps[False] < steps["never"] == MAX_TOKENS


def test_batch_equals_prompts_alone() -> None:
    _, ours = models("qwen2")
    params = BeamParams(4, MAX_TOKENS, 1.0, False, 4, EOS["qwen2"])
    together = beam_search(ours, PROMPTS, params)
    alone = [beam_search(ours, [p], params)[0] for p in PROMPTS]
    assert [[h.token_ids for h in hs] for hs in together] == [[h.token_ids for h in hs] for hs in alone]
    torch.testing.assert_close(torch.tensor([[h.score for h in hs] for hs in together]),
                               torch.tensor([[h.score for h in hs] for hs in alone]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- one beam
@torch.no_grad()
@pytest.mark.parametrize("eos", [(), EOS["llama"]], ids=["no_eos", "eos"])
def test_one_beam_is_greedy(eos: tuple[int, ...]) -> None:
    """transformers routes num_beams=1 to greedy search (no sequences_scores). With early_stopping=True one
    beam is greedy exactly: same tokens (up to and including the eos), score = sum of the greedy log-probs
    / len^alpha."""
    hf, ours = models("llama")
    alpha = 2.0
    result = beam_search(ours, PROMPTS, BeamParams(1, MAX_TOKENS, alpha, True, 1, eos))
    ids, mask = left_padded(PROMPTS)
    out = hf.generate(ids, attention_mask=mask, num_beams=1, do_sample=False, output_scores=True,
                      return_dict_in_generate=True, max_new_tokens=MAX_TOKENS, eos_token_id=list(eos) or None,
                      pad_token_id=PAD)
    new = out.sequences[:, ids.shape[1]:]
    logp = torch.stack(out.scores, dim=1).log_softmax(dim=-1).gather(2, new[:, :, None])[:, :, 0]
    for b, (hyp,) in enumerate(result):
        tokens = new[b].tolist()
        n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        assert hyp.token_ids == tokens[:n]
        torch.testing.assert_close(hyp.score, float(logp[b, :n].sum()) / n ** alpha, atol=1e-4, rtol=0)
    if eos:
        assert ended_by_eos(result, eos) > 0


# ---------------------------------------------------------------------------------------------- LLM front end
def test_llm_beam_search_ends_at_the_engine_eos_and_equals_transformers() -> None:
    """LLM.beam_search: BeamParams without eos take the engine's end-of-sequence ids, the answer is transformers'
    with those ids as eos_token_id."""
    hf, ours = models("llama")
    llm = LLM(ours, eos_token_ids=EOS["llama"])
    result = llm.beam_search(PROMPTS, BeamParams(4, MAX_TOKENS, 1.0, False, 4))
    params = BeamParams(4, MAX_TOKENS, 1.0, False, 4, EOS["llama"])
    assert_same(result, hf_beam(hf, PROMPTS, params))
    assert ended_by_eos(result, EOS["llama"]) > 0


def test_llm_beam_search_of_text_gives_text_and_checks_the_context_window() -> None:
    from llmlab.tokenizer import train

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", max_seq_len=40)).eval()
    tok = train(["the cat sat on the mat and the dog sat on the log " * 30], kind="bpe", vocab_size=300,
                special_tokens=["<|endoftext|>"])
    llm = LLM(model, tok)
    params = BeamParams(num_beams=3, max_tokens=8, num_return_sequences=2)
    (hyps,) = llm.beam_search("the cat sat", params)
    eos = tuple(llm.engine.eos_token_ids)
    want = beam_search(model, [tok.encode("the cat sat")], replace(params, eos_token_ids=eos), vocab_limit=len(tok))
    assert [h.token_ids for h in hyps] == [h.token_ids for h in want[0]]
    assert all(t < len(tok) for h in hyps for t in h.token_ids) and len(tok) < model.cfg.vocab_size
    assert [h.text for h in hyps] == [tok.decode(h.token_ids, skip_special_tokens=True) for h in hyps]
    assert all(h.text for h in hyps)
    long = list(range(1, 36))  # 35 tokens + 8 new > 40
    with pytest.raises(ValueError, match="the prompt has 35 tokens but the context window is 40"):
        llm.beam_search(long, params)
    (hyps,) = llm.beam_search(long, params, truncate=True)
    want = beam_search(model, [long[-32:]], replace(params, eos_token_ids=eos), vocab_limit=len(tok))
    assert [h.token_ids for h in hyps] == [h.token_ids for h in want[0]]


# ---------------------------------------------------------------------------------------------- KV caches
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_paged_beams_share_blocks_copy_on_write_and_equal_transformers(family: str, block_size: int) -> None:
    """The default cache: beams are block tables over a paged pool. They share their common past (fewer blocks
    in use at peak than every beam owning its own), a beam copies a block before writing into a shared one, the
    result is transformers', and every block returns to the pool."""
    hf, ours = models(family)
    params = BeamParams(4, MAX_TOKENS, 1.0, "never", 4, EOS[family])
    own = sum(-(-(len(p) + MAX_TOKENS) // block_size) for p in PROMPTS) * params.num_beams
    cache = PagedKVCache(own + len(PROMPTS) * params.num_beams, block_size, prefix_caching=False)
    copies = []
    copy_block = cache.copy_block
    cache.copy_block = lambda src, dst: copies.append((src, dst)) or copy_block(src, dst)
    assert_same(beam_search(ours, PROMPTS, params, cache=cache), hf_beam(hf, PROMPTS, params))
    assert cache.blocks.in_use() == 0 and set(cache.blocks.ref) == {0}
    if block_size < 16:  # with 16, each beam's whole past is one block, which it owns after its first token
        assert cache.blocks.peak_in_use < own
    assert bool(copies) == (block_size > 1)  # with 1, every token starts a block of its own: nothing to copy


def test_copied_kv_cache_equals_transformers() -> None:
    """cache=KVCache(): every beam's past in its own rows, reordered by copying: the same answer."""
    hf, ours = models("qwen2")
    params = BeamParams(4, MAX_TOKENS, 2.0, False, 4, EOS["qwen2"])
    assert_same(beam_search(ours, PROMPTS, params, cache=KVCache()), hf_beam(hf, PROMPTS, params))


def test_reorder_cache() -> None:
    cache = KVCache()
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    cache.update(0, k, v)
    cache.key_valid = torch.tensor([[True] * 5, [False] + [True] * 4, [True] * 5])
    cache.key_pos = torch.arange(15).view(3, 5)
    index = torch.tensor([2, 2, 0])
    reorder_cache(cache, index)
    torch.testing.assert_close(cache.layers[0][0], k[index])
    torch.testing.assert_close(cache.layers[0][1], v[index])
    assert cache.key_valid.tolist() == [[True] * 5] * 3
    assert cache.key_pos[:, 0].tolist() == [10, 10, 0]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=-1), "num_beams"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(early_stopping=1), "early_stopping"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(eos_token_ids=(-1,)), "eos_token_ids"),
])
def test_bad_params(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BeamParams(**kwargs)


@pytest.mark.parametrize("prompts, params, match", [
    ([[1, 2], []], BeamParams(), "prompt 1 is empty"),
    ([], BeamParams(), "non-empty list"),
    ([[1, VOCAB]], BeamParams(), "outside"),
    ([[1, 2.0]], BeamParams(), "integer token ids"),
    ("hello", BeamParams(), "non-empty list"),
    ([[1, 2]], BeamParams(eos_token_ids=(VOCAB,)), "eos_token_ids"),
])
def test_bad_input(prompts, params: BeamParams, match: str) -> None:
    _, ours = models("llama")
    with pytest.raises(ValueError, match=match):
        beam_search(ours, prompts, params)


def test_bad_cache() -> None:
    _, ours = models("llama")
    params = BeamParams(num_beams=4, max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match="free blocks of 4 tokens.*may need 40: .*more blocks"):
        beam_search(ours, PROMPTS, params, cache=PagedKVCache(8, 4))
    used = KVCache()
    used.update(0, torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="empty KVCache"):
        beam_search(ours, PROMPTS, params, cache=used)


def test_params_changed_after_construction_are_checked() -> None:
    _, ours = models("llama")
    params = BeamParams(num_beams=2, num_return_sequences=2)
    params.num_beams = 1
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam_search(ours, [[1, 2]], params)
