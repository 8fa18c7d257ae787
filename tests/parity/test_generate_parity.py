"""Greedy generation equals transformers' generate(do_sample=False) token for token: tiny random Llama, Qwen2,
Mistral (sliding window) and GPT-2 models, a batch of prompts of different lengths (left-padded in
transformers, continuously batched in ours), 40 new tokens."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmlab.infer import LLM, SamplingParams  # noqa: E402
from llmlab.io import config_from_hf, state_dict_from_hf  # noqa: E402
from llmlab.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, NEW = 160, 40
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SHAPE)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=12, attn_implementation="eager")),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=None, eos_token_id=None)),
}


@torch.no_grad()
def random_pair(name: str):
    cls, config = MODELS[name]
    torch.manual_seed(0)
    hf = cls(config).eval()
    g = torch.Generator().manual_seed(0)
    for pname, p in hf.named_parameters():  # sharper than the default init, so argmax is never a near-tie
        noise = torch.randn(p.shape, generator=g)
        p.copy_(0.15 * noise if p.dim() >= 2 else (1 + 0.2 * noise if pname.endswith("weight") else 0.1 * noise))
    data = {**hf.config.to_dict(), "architectures": [cls.__name__]}
    cfg = config_from_hf(data)
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, data))
    return hf, ours.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_batch_equals_transformers(name):
    hf, ours = random_pair(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 9)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, width:]
    outs = LLM(ours, block_size=8).generate(prompts, SamplingParams(max_tokens=NEW, temperature=0))
    for out, r in zip(outs, ref.tolist()):
        assert out.token_ids == r
