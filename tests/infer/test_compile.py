"""compile=True: decode steps go through torch.compile and give the eager engine's tokens and logprobs, one row or a
continuous batch, with a bounded number of graphs (the key length is dynamic)."""

import pytest
import torch

from llmlab.infer import LLM, SamplingParams
from llmlab.model import ModelConfig, Transformer, linear

PROMPTS = [[5, 9, 2, 7, 1], [3, 3, 8], list(range(10, 40)), [4]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", max_seq_len=96)).eval()


def _run(llm, prompts, n=12):
    params = [SamplingParams(max_tokens=n + 3 * i, temperature=0, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs]


@pytest.mark.parametrize("products", ["measured", "rearranged"])
def test_compiled_decode_steps_give_the_eager_tokens(model, products, monkeypatch):
    """A counting backend (the graph runs as traced, no code generation) shows the graphs are captured, run and
    few; the outputs show that nothing of a step (positions, key lengths, slots) was frozen into them. Four
    requests of different lengths on three rows: the batch runs 3, 2 and 1 rows as requests join and finish.
    "rearranged": every few-row product takes the way some CPUs measure fastest ((W·xᵀ)ᵀ for several rows, one
    row as two columns), which the traced graph must also get right for a symbolic row count."""
    max_num_seqs = 3
    torch._dynamo.reset()
    monkeypatch.setattr(linear, "PRODUCT_CHOICE", {})
    if products == "rearranged":
        monkeypatch.setattr(linear.Linear, "_fastest_way", lambda self, x, rows: "twice" if rows == 1 else "transposed")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = LLM(model, max_num_seqs=max_num_seqs, kv_layout="contiguous")
    compiled = LLM(model, max_num_seqs=max_num_seqs, kv_layout="contiguous", compile=backend)
    calls = []
    forward = compiled.engine._compiled
    compiled.engine._compiled = lambda *a, **k: calls.append(1) or forward(*a, **k)
    want_ids, want_lp = _run(eager, PROMPTS)
    got_ids, got_lp = _run(compiled, PROMPTS)
    assert got_ids == want_ids
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    steps = sum(len(t) for t in want_ids) - len(PROMPTS)  # every token after each request's first is a decode
    assert graphs and steps // max_num_seqs - 1 <= len(calls) < steps
    assert len(graphs) <= 3  # one row; the first batch size, then any: not one per step or key length
    torch._dynamo.reset()


def test_compile_asks_for_the_contiguous_layout(model):
    with pytest.raises(ValueError, match="compile=True needs kv_layout='contiguous'"):
        LLM(model, kv_layout="paged", compile=True)


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager():
    """The real thing: inductor's generated C++ for every decode step of a lone sequence (one layer: compiling
    takes time in proportion to the graph)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", max_seq_len=96, n_layers=1)).eval()
    torch._dynamo.reset()
    eager = LLM(model, max_num_seqs=1, kv_layout="contiguous")
    compiled = LLM(model, max_num_seqs=1, kv_layout="contiguous", compile=True)
    want_ids, want_lp = _run(eager, PROMPTS[:2])
    got_ids, got_lp = _run(compiled, PROMPTS[:2])
    assert got_ids == want_ids
    for a, b in zip(got_lp, want_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    torch._dynamo.reset()
