"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2) on our Transformer: the formulas, training only the
prompt, generation with the prefix in the KV cache, and interop both ways with the real `peft` (the oracle) on
tiny random HF Llama models (GQA), no downloads."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.cache import KVCache  # noqa: E402
from llmlab.peft.prompt import (  # noqa: E402
    PrefixCache,
    PrefixTuning,
    PromptTuning,
    PTuning,
    load_prompt,
    p_tuning_v2,
    save_prompt,
    trainable_count,
)

from test_peft_interop import TOL, VOCAB, hf_model, ids, ours_from  # noqa: E402

N = 3  # virtual tokens
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # transformers/peft deprecations


class ListTokenizer:
    """A stand-in tokenizer: fixed ids per word (with a BOS of 1, as a Llama tokenizer adds)."""

    def encode(self, text):
        return [1] + [5 + 7 * i for i, _ in enumerate(text.split())]


def hf_word_tokenizer(tmp_path):
    """A real Hugging Face tokenizer (word level, BOS 1) that PEFT's TEXT init can load from a directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: 10 + i for i, w in enumerate("classify the sentiment of this review".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path))
    return fast


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


def peft_logits(pm, x, **kw):
    with torch.no_grad():
        return pm(input_ids=x, **kw).logits


# ------------------------------------------------------------------------------------------ the model change
def test_inputs_embeds_equals_the_lookup_and_keeps_errors():
    model = tiny()
    x = ids()
    with torch.no_grad():
        a = model(x).logits
        b = model(None, inputs_embeds=model.tok_emb(x)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        model(x, inputs_embeds=model.tok_emb(x))
    with pytest.raises(ValueError, match=r"\[batch, seq, dim=32\]"):
        model(None, inputs_embeds=torch.zeros(2, 3, 31))
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model(None)


# ------------------------------------------------------------------------------------------ prompt tuning
def test_prompt_from_text_is_the_texts_embeddings_and_only_the_prompt_trains():
    model = tiny()
    pt = PromptTuning(model, 7, init_text="a b c", tokenizer=ListTokenizer())
    text_ids = [1, 5, 12, 19]
    expected = model.tok_emb.weight[torch.tensor((text_ids * 2)[:7])]  # repeated then cut, as PEFT
    torch.testing.assert_close(pt.prompt.detach(), expected, atol=0, rtol=0)
    assert trainable_count(pt) == 7 * 32  # n · dim
    pt.train()
    x = ids()
    out = pt(x, labels=x)
    assert out.logits.shape == (2, x.shape[1], VOCAB)
    out.loss.backward()
    assert pt.prompt.grad is not None and pt.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # a fresh prompt from text = the text typed in front of the input
    with torch.no_grad():
        pt_short = PromptTuning(model, 4, init_text="a b c", tokenizer=ListTokenizer())
        full = model(torch.cat((torch.tensor(text_ids).expand(2, 4), x), dim=1)).logits[:, 4:]
        torch.testing.assert_close(pt_short(x).logits, full, **TOL)


def test_prompt_tuning_loss_and_virtual_logits_follow_peft():
    model = tiny()
    pt = PromptTuning(model, N, init="vocab", seed=1)
    x = ids()
    with torch.no_grad():
        out = pt(x, labels=x, return_virtual=True)
        assert out.logits.shape == (2, N + x.shape[1], VOCAB)
        real = pt(x, labels=x)
        torch.testing.assert_close(real.logits, out.logits[:, N:])
        torch.testing.assert_close(real.loss, out.loss)
        # labels get N leading -100: the last virtual position predicts the first real token
        logp = out.logits[:, N - 1:-1].log_softmax(-1).gather(-1, x[..., None])
        torch.testing.assert_close(out.loss, -logp.mean())


def test_prompt_tuning_padding_and_cached_decode():
    model = tiny()
    pt = PromptTuning(model, N, seed=2)
    x = ids()[:1, :8]
    with torch.no_grad():
        full = pt(x).logits
        padded = pt(torch.cat((torch.zeros(1, 2, dtype=torch.long), x), 1),
                    attention_mask=torch.tensor([[0, 0] + [1] * 8])).logits[:, 2:]
        torch.testing.assert_close(padded, full, **TOL)
        cache = KVCache()
        first = pt(x[:, :5], cache=cache).logits
        steps = [pt(x[:, t:t + 1], cache=cache).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, **TOL)


@pytest.mark.parametrize("init", ["random", "text"])
def test_prompt_tuning_peft_to_ours(tmp_path, init):
    hf = hf_model("llama", seed=1)
    ours = ours_from(hf)
    kw = {}
    if init == "text":
        tok = hf_word_tokenizer(tmp_path / "tok")
        kw = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the sentiment",
                  tokenizer_name_or_path=str(tmp_path / "tok"))
    pm = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, **kw)).eval()
    x = ids(2)
    expected = peft_logits(pm, x)
    assert expected.shape == (2, 5 + x.shape[1], VOCAB)  # PEFT returns the virtual positions too
    if init == "text":  # the same TEXT init from the same tokenizer
        mine = PromptTuning(ours, 5, init_text="classify the sentiment", tokenizer=tok)
        torch.testing.assert_close(mine.prompt.detach(), pm.get_prompt(1)[0].detach(), atol=0, rtol=0)
    pm.save_pretrained(str(tmp_path / "a"))
    pt = load_prompt(ours, tmp_path / "a")
    assert isinstance(pt, PromptTuning) and pt.n_virtual_tokens == 5
    with torch.no_grad():
        torch.testing.assert_close(pt(x).logits, expected[:, 5:], **TOL)
        torch.testing.assert_close(pt(x, return_virtual=True).logits, expected, **TOL)
        labels = x.clone()
        labels[:, :3] = -100
        torch.testing.assert_close(pt(x, labels=labels).loss, pm(input_ids=x, labels=labels).loss, **TOL)


def test_prompt_tuning_ours_to_peft(tmp_path):
    hf = hf_model("llama", seed=2)
    ours = ours_from(hf)
    pt = PromptTuning(ours, N, init="vocab", seed=3)
    with torch.no_grad():
        pt.prompt.add_(0.05 * torch.randn(pt.prompt.shape))
    save_prompt(pt, tmp_path, base_model_name_or_path="tiny-random")
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert c["peft_type"] == "PROMPT_TUNING" and c["num_virtual_tokens"] == N and c["token_dim"] == 32
    assert c["num_layers"] == 2 and c["task_type"] == "CAUSAL_LM"
    assert not set(c) - set(peft.PromptTuningConfig().to_dict()), "a field PEFT does not know"
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {"prompt_embeddings"}
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = ids(3)
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(pm, x, attention_mask=mask)[:, N:], pt(x, mask).logits, **TOL)


# ------------------------------------------------------------------------------------------ P-tuning
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_encoder_formula_counts_and_fold(encoder):
    model = tiny()
    pt = PTuning(model, N, encoder=encoder, encoder_hidden_size=8, seed=0)
    e = pt.prompt
    if encoder == "mlp":
        m = pt.mlp
        h1 = torch.relu(e @ m[0].weight.T + m[0].bias)
        h2 = torch.relu(h1 @ m[2].weight.T + m[2].bias)
        expected = h2 @ m[4].weight.T + m[4].bias
        closed = N * 32 + (32 * 8 + 8) + (8 * 8 + 8) + (8 * 32 + 32)
    else:
        expected = pt.mlp(pt.lstm(e[None])[0])[0]
        lstm = 2 * 2 * 4 * 8 * (8 + 1 + 1) + 2 * 4 * 8 * 32 + 2 * 4 * 8 * 16  # biLSTM, 2 layers, h=8
        closed = N * 32 + lstm + (16 * 16 + 16) + (16 * 32 + 32)
    torch.testing.assert_close(pt.soft_prompt(), expected)
    assert trainable_count(pt) == closed
    x = ids()
    pt(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in pt.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        before = pt(x).logits
        pt.fold()
        torch.testing.assert_close(pt(x).logits, before, atol=0, rtol=0)
    assert trainable_count(pt) == N * 32


def test_p_tuning_interop_both_ways(tmp_path):
    hf = hf_model("llama", seed=4)
    ours = ours_from(hf)
    pm = peft.get_peft_model(hf, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                          encoder_hidden_size=8))
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    x = ids(4)
    expected = peft_logits(pm, x)
    pt = load_prompt(ours, tmp_path / "peft")
    torch.testing.assert_close(pt(x).logits, expected[:, N:], **TOL)

    mine = PTuning(ours_from(hf_model("llama", seed=4)), N, encoder="lstm", encoder_hidden_size=8, seed=5)
    save_prompt(mine, tmp_path / "ours")
    c = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert c["peft_type"] == "P_TUNING" and c["encoder_reparameterization_type"] == "LSTM"
    assert not set(c) - set(peft.PromptEncoderConfig().to_dict()), "a field PEFT does not know"
    pm2 = peft.PeftModel.from_pretrained(hf_model("llama", seed=4), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(pm2, x)[:, N:], mine(x).logits, **TOL)


# ------------------------------------------------------------------------------------------ prefix tuning
def test_prefix_formula_counts_and_gradients():
    model = tiny()
    kv_dim, L = 2 * 8, 2
    plain = p_tuning_v2(model, N, seed=0)
    assert trainable_count(plain) == 2 * L * N * kv_dim
    proj = PrefixTuning(model, N, projection=True, encoder_hidden_size=12, seed=0)
    assert trainable_count(proj) == N * kv_dim + (kv_dim * 12 + 12) + (12 * 2 * L * kv_dim + 2 * L * kv_dim)
    # layout: row t = K_0, V_0, K_1, V_1 of virtual token t, each n_kv_heads × head_dim
    flat = proj.flat_prefix()
    t = proj.transform
    torch.testing.assert_close(flat, t[2](torch.tanh(t[0](proj.embedding))))
    k1, v1 = proj.prefixes()[1]
    torch.testing.assert_close(k1, flat[:, 2 * kv_dim:3 * kv_dim].view(N, 2, 8).transpose(0, 1))
    torch.testing.assert_close(v1, flat[:, 3 * kv_dim:4 * kv_dim].view(N, 2, 8).transpose(0, 1))
    x = ids()
    proj.train()
    proj(x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        proj.eval()
        before = proj(x).logits
        proj.fold()
        torch.testing.assert_close(proj(x).logits, before, atol=0, rtol=0)
    assert trainable_count(proj) == 2 * L * N * kv_dim


def test_prefix_is_attention_over_the_learned_keys():
    """Layer 0's attention with the prefix = softmax over [K_prefix ; K] of the formula (real tokens at
    positions N, N+1, ...)."""
    model = tiny(position="none")  # no rotation: the formula stays short
    pre = PrefixTuning(model, N, seed=1)
    x = ids()[:1, :5]
    got = {}
    model.blocks[0].attn.register_forward_hook(lambda m, a, out: got.update(y=out[0]))
    with torch.no_grad():
        pre(x)
        blk = model.blocks[0]
        h = blk.attn_norm(model.tok_emb(x))
        q, k, v = blk.attn.qkv(h).view(1, 5, 8, 8).transpose(1, 2).split((4, 2, 2), dim=1)
        pk, pv = pre.prefixes()[0]
        K = torch.cat((pk[None], k), 2).repeat_interleave(2, 1)
        V = torch.cat((pv[None], v), 2).repeat_interleave(2, 1)
        s = q @ K.transpose(-1, -2) / 8 ** 0.5
        s = s.masked_fill(torch.ones(5, N + 5, dtype=torch.bool).triu(N + 1), float("-inf"))
        y = blk.attn.out((s.softmax(-1) @ V).transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(got["y"], y, **TOL)


def test_prefix_greedy_decode_with_cache_equals_full_forward():
    model = tiny()
    pre = PrefixTuning(model, N, projection=True, seed=2).eval()
    seq = ids()[:, :4]
    with torch.no_grad():
        out = pre(seq)
        cache = out.cache
        assert isinstance(cache, PrefixCache) and cache.length == N + 4
        for _ in range(6):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), 1)
            out = pre(nxt, cache=cache)
            full = pre(seq).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, **TOL)
        # padding: a left-padded row gets the logits of the row alone
        padded = torch.cat((torch.zeros(2, 2, dtype=torch.long), seq), 1)
        mask = torch.cat((torch.zeros(2, 2, dtype=torch.long), torch.ones_like(seq)), 1)
        torch.testing.assert_close(pre(padded, mask).logits[:, 2:], pre(seq).logits, **TOL)


def test_prefix_peft_to_ours_matches_positions(tmp_path):
    hf = hf_model("llama", seed=5)
    ours = ours_from(hf)
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                         prefix_projection=True, encoder_hidden_size=8))
    pm.eval().save_pretrained(str(tmp_path))
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert c["token_dim"] == 16 and c["num_attention_heads"] == 2  # GQA: n_kv_heads × head_dim
    x = ids(5)
    expected = peft_logits(pm, x, attention_mask=torch.ones_like(x))
    with pm.disable_adapter():
        assert not torch.allclose(expected, peft_logits(pm, x), atol=1e-3)  # the prefix does something
    pre = load_prompt(ours, tmp_path)
    assert isinstance(pre, PrefixTuning) and pre.transform is None
    with torch.no_grad():
        torch.testing.assert_close(pre(x).logits, expected, **TOL)
        # the real tokens sit at positions N.. (past_key_values of length N); from 0 they would differ
        shifted = pre(x, position_ids=torch.arange(x.shape[1]).expand_as(x)).logits
    assert not torch.allclose(shifted, expected, atol=1e-3)


def test_prefix_ours_to_peft(tmp_path):
    hf = hf_model("llama", seed=6)
    ours = ours_from(hf)
    pre = PrefixTuning(ours, N, projection=True, encoder_hidden_size=8, seed=3)
    save_prompt(pre, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert c["peft_type"] == "PREFIX_TUNING" and c["prefix_projection"] is False
    assert not set(c) - set(peft.PrefixTuningConfig().to_dict()), "a field PEFT does not know"
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (N, 2 * 2 * 16)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = ids(6)
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(pm, x), pre(x).logits, **TOL)


# ------------------------------------------------------------------------------------------ errors
def test_errors_are_clear(tmp_path):
    model = tiny()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_virtual_tokens must be an int >= 1"):
            PromptTuning(model, bad)
        with pytest.raises(ValueError, match="n_virtual_tokens must be an int >= 1"):
            PrefixTuning(model, bad)
    with pytest.raises(ValueError, match="init_text needs the model's tokenizer"):
        PromptTuning(model, 4, init_text="hello")
    with pytest.raises(ValueError, match="encoder must be 'mlp' or 'lstm'"):
        PTuning(model, 4, encoder="gru")
    with pytest.raises(ValueError, match="input_ids must lie in"):
        PromptTuning(model, 2)(torch.tensor([[VOCAB]]))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_prompt(model, tmp_path / "missing")
    save_prompt(PromptTuning(model, 4), tmp_path / "p")
    other = Transformer(ModelConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=4, max_seq_len=64))
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(4, 32\).*needs \(4, 16\)"):
        load_prompt(other, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        load_prompt(model, tmp_path / "p")
