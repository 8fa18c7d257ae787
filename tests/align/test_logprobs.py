"""The shared log-prob utility: equal to full logits -> log_softmax -> gather (ours and transformers' own
Llama), chunked without the [B, T, V] logits, differentiable, the same under left and right padding and
through prompt-tuning wrappers; bad input names the example."""

from __future__ import annotations

import pytest
import torch

from llmlab.align.logprobs import SequenceLogprobs, sequence_logprobs, target_mask, token_logprobs
from llmlab.model import ModelConfig, Transformer
from llmlab.peft.prompt import PrefixTuning, PromptTuning

TOL = dict(atol=1e-5, rtol=1e-5)
PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano")).eval()


def brute(model, ids, mask=None, temperature=1.0):
    """The reference: the full logits of the model, log_softmax, gather the next token."""
    logits = model(ids, mask).logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)[:, :-1]
    return logp.gather(-1, ids[:, 1:, None])[..., 0], logp


def seqs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


def pad_batch(rows, side):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, at], mask[i, at] = torch.tensor(r), 1
    return ids, mask


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_equals_full_log_softmax(model, chunk_size):
    ids = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, full = brute(model, ids)
        lp, ent = token_logprobs(model, ids, return_entropy=True, chunk_size=chunk_size)
    assert lp.shape == ent.shape == (3, 16) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, **TOL)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), **TOL)


def test_temperature_scales_the_logits(model):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for tau in (0.5, 2.0):
            torch.testing.assert_close(token_logprobs(model, ids, temperature=tau), brute(model, ids, None, tau)[0],
                                       **TOL)


def test_head_sees_one_chunk_at_a_time(model):
    """The head is applied to at most chunk_size rows per call, and only to rows that count."""
    seen = []
    hook = model.head.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        ids = torch.randint(0, 512, (4, 20), generator=torch.Generator().manual_seed(4))
        comp = torch.zeros_like(ids)
        comp[:, 12:] = 1
        with torch.no_grad():
            token_logprobs(model, ids, completion_mask=comp, chunk_size=7)
    finally:
        hook.remove()
    assert [s[0] for s in seen] == [7, 7, 7, 7, 4]  # 4 rows × 8 completion tokens = 32 rows
    assert all(len(s) == 2 for s in seen)  # rows, never [B, T, V]


def test_gradients_match_brute_force(model):
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
    weights = torch.randn(2, 11, generator=torch.Generator().manual_seed(6))
    model.zero_grad()
    lp, ent = token_logprobs(model, ids, return_entropy=True, chunk_size=4)
    ((lp * weights).sum() + ent.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref, full = brute(model, ids)
    ((ref * weights).sum() - (full.exp() * full).sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()


# ------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_single_sequence_logprobs(model, side):
    rows = seqs([11, 6, 3])
    ids, mask = pad_batch(rows, side)
    with torch.no_grad():
        lp = token_logprobs(model, ids, mask)
        valid = target_mask(ids, mask)
        for i, r in enumerate(rows):
            alone = token_logprobs(model, torch.tensor([r]))[0]
            torch.testing.assert_close(lp[i][valid[i]], alone, **TOL)
            assert lp[i][~valid[i]].abs().sum() == 0


def test_sequence_logprobs_matches_per_example_reference(model):
    prompts, completions = seqs([4, 1, 7], seed=7), seqs([3, 5, 1], seed=8)
    with torch.no_grad():
        out = sequence_logprobs(model, prompts, completions, pad_id=PAD, return_entropy=True)
        micro = sequence_logprobs(model, prompts, completions, pad_id=PAD, batch_size=2, reduce="mean")
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ref = brute(model, torch.tensor([p + c]))[0][0, len(p) - 1:]
            assert int(out.n_tokens[i]) == len(c) and out.mask[i].tolist() == [j < len(c) for j in range(5)]
            torch.testing.assert_close(out.per_token[i, :len(c)], ref, **TOL)
            torch.testing.assert_close(out.sum[i], ref.sum(), **TOL)
            torch.testing.assert_close(out.mean[i], ref.mean(), **TOL)
    assert isinstance(out, SequenceLogprobs) and out.entropy.shape == (3, 5)
    assert (out.per_token[~out.mask] == 0).all() and (out.entropy[~out.mask] == 0).all()
    torch.testing.assert_close(micro.value, out.mean, **TOL)
    torch.testing.assert_close(micro.per_token, out.per_token, **TOL)
    assert sequence_logprobs(model, prompts, completions, pad_id=PAD, reduce="none").value.shape == (3, 5)


def test_sequence_logprobs_trains(model):
    model.zero_grad()
    out = sequence_logprobs(model, [[1, 2, 3]], [[4, 5]], pad_id=PAD)
    out.sum.sum().backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0
    model.zero_grad()


# ------------------------------------------------------------------------------------- other modules
def test_prompt_tuning_wrapper_lines_up(model):
    wrapped = PromptTuning(model, 4, seed=0)
    rows = seqs([7, 4], seed=9)
    ids, mask = pad_batch(rows, "left")
    with torch.no_grad():
        lp = token_logprobs(wrapped, ids, mask)
        valid = target_mask(ids, mask)
        for i, r in enumerate(rows):
            x = torch.tensor([r])
            ref = torch.log_softmax(wrapped(x).logits.float(), -1)[0, :-1].gather(-1, x[0, 1:, None])[:, 0]
            torch.testing.assert_close(lp[i][valid[i]], ref, **TOL)
    out = sequence_logprobs(wrapped, [[1, 2]], [[3, 4]], pad_id=PAD)
    out.sum.sum().backward()  # the soft prompt is what trains; the model is frozen
    assert wrapped.prompt.grad is not None and wrapped.prompt.grad.abs().sum() > 0
    for p in model.parameters():
        p.requires_grad_(True)  # PromptTuning froze the shared fixture


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_tuning_and_plain_logits_modules(model, side):
    class LogitsOnly(torch.nn.Module):  # no reachable head: the utility reduces the returned logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return self.inner(input_ids, attention_mask)

    rows = seqs([6, 9], seed=10)
    ids, mask = pad_batch(rows, side)
    valid = target_mask(ids, mask)
    prefix = PrefixTuning(model, 3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(LogitsOnly(model), ids, mask, chunk_size=3),
                                   token_logprobs(model, ids, mask), **TOL)
        lp = token_logprobs(prefix, ids, mask)
        for i, r in enumerate(rows):
            x = torch.tensor([r])
            ref = torch.log_softmax(prefix(x).logits.float(), -1)[0, :-1].gather(-1, x[0, 1:, None])[:, 0]
            torch.testing.assert_close(lp[i][valid[i]], ref, **TOL)
    for p in model.parameters():
        p.requires_grad_(True)


def test_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    from llmlab.io import config_from_hf, state_dict_from_hf

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in hf.named_parameters():  # re-randomize norms too, so a dropped tensor shows
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.15 * noise if p.dim() >= 2 else 1.0 + 0.2 * noise)
    config = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    ours_cfg = config_from_hf(config)
    ours = Transformer(ours_cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), ours_cfg, config))
    ours.eval()
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (12, 7)]
    ids, mask = pad_batch(rows, "left")
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        lp = token_logprobs(ours, ids, mask)
    valid = target_mask(ids, mask)
    torch.testing.assert_close(lp[valid], ref[valid], **TOL)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_example(model):
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        sequence_logprobs(model, [[1], [2]], [[3]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"completions\[1\] is empty"):
        sequence_logprobs(model, [[1], [2]], [[3], []], pad_id=PAD)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        sequence_logprobs(model, [[]], [[3]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"completions\[0\] has token id 512 outside \[0, 512\)"):
        sequence_logprobs(model, [[1]], [[512]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a list of int token ids"):
        sequence_logprobs(model, ["hello"], [[1]], pad_id=PAD)
    with pytest.raises(ValueError, match="reduce must be one of"):
        sequence_logprobs(model, [[1]], [[2]], pad_id=PAD, reduce="max")
    ids = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        token_logprobs(model, ids, temperature=0)
    with pytest.raises(ValueError, match="padding between real tokens"):
        token_logprobs(model, ids, torch.tensor([[1, 1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="completion_mask must be a tensor of shape"):
        token_logprobs(model, ids, completion_mask=torch.ones(1, 4))
