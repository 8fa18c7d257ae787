"""Parity with Hugging Face transformers (litgpt-style): tiny random HF models, their weights copied into our
Transformer through llmlab.io.hf (config_from_hf + state_dict_from_hf), identical fp32 logits.

No downloads: every HF model is built from a config with random weights. Every parameter (norm gains and
biases included, which HF initializes to 1 and 0) is re-randomized, so a mapping that drops or swaps any
tensor shows up in the logits.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmlab.io import CheckpointError, config_from_hf, state_dict_from_hf  # noqa: E402
from llmlab.model import KVCache, ModelConfig, Transformer  # noqa: E402

transformers.logging.set_verbosity_error()

B, T, PAD = 2, 20, 5  # batch, length, padding in the second sequence
VOCAB = 160
TOL = dict(atol=1e-5, rtol=1e-5)

SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_SHAPE = dict(SHAPE, num_key_value_heads=2, rms_norm_eps=1e-6)


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add contention (several times slower on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: 1-D gains ~ 1 + N(0, 0.2²) (norm weights), other 1-D ~ N(0, 0.1²) (biases),
    matrices ~ N(0, 0.15²). Tied parameters are drawn once, so ties survive."""
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


def hf_config_dict(hf_model: torch.nn.Module) -> dict:
    """The model's config.json as save_pretrained writes it (`architectures` is only filled in on save)."""
    return {**hf_model.config.to_dict(), "architectures": [type(hf_model).__name__]}


def to_llmlab(hf_model: torch.nn.Module) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = hf_config_dict(hf_model)
    cfg = config_from_hf(config)
    return cfg, state_dict_from_hf(hf_model.state_dict(), cfg, config)


def ours_from(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    if cfg.tie_embeddings and cfg.head in ("lm", "mlm"):
        # loading copies both names into one tensor: the tie must survive and the two sources must agree
        assert model.head.proj.weight is model.tok_emb.weight
        torch.testing.assert_close(sd["head.proj.weight"], sd["tok_emb.weight"], rtol=0, atol=0)
    return model.eval()


def inputs(vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def left_padding_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :PAD] = 0
    return mask


def right_padding_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - PAD:] = 0
    return mask


def positions_from(mask: torch.Tensor) -> torch.Tensor:
    """What our model derives from a mask (real tokens count 0, 1, ...); HF decoders take arange by default."""
    return (mask.cumsum(dim=1) - 1).clamp_min(0)


def assert_real_tokens_close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None, **tol) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if mask is not None:
        keep = mask.bool()
        ours, theirs = ours[keep], theirs[keep]
    torch.testing.assert_close(ours, theirs, **(tol or TOL))


def check_decoder(hf_model: torch.nn.Module, ours: Transformer, padded: bool, rows_alone: bool = False,
                  **tol) -> None:
    """rows_alone: the padded batch's reference is each row's real tokens run alone through transformers."""
    ids = inputs(hf_model.config.vocab_size)
    with torch.no_grad():
        if padded:
            mask = left_padding_mask()
            if rows_alone:
                ref = torch.zeros(*ids.shape, hf_model.config.vocab_size)
                for i, keep in enumerate(mask.bool()):
                    ref[i, keep] = hf_model(ids[i, keep][None]).logits[0]
            else:
                ref = hf_model(ids, attention_mask=mask, position_ids=positions_from(mask)).logits
            out = ours(ids, attention_mask=mask).logits
        else:
            mask = None
            ref = hf_model(ids).logits
            out = ours(ids).logits
    assert_real_tokens_close(out, ref, mask, **tol)


def build(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(cls(config), seed)


@functools.lru_cache(maxsize=None)
def reference(family: str, variant: str = "") -> torch.nn.Module:
    """One HF model per (family, variant), shared by the tests that only run it forward (no_grad)."""
    if family == "llama":
        return build(LlamaForCausalLM, LlamaConfig(**{**LLAMA_SHAPE, **LLAMA_VARIANTS[variant]}))
    if family == "mistral":
        config = MistralConfig(**LLAMA_SHAPE, sliding_window=WINDOW, attn_implementation=variant or "eager")
        hf = build(MistralForCausalLM, config)
        assert hf.config._attn_implementation == (variant or "eager")
        return hf
    if family == "bert":
        cls = {"model": BertModel, "mlm": BertForMaskedLM, "cls": BertForSequenceClassification}[variant]
        return build(cls, BertConfig(**BERT_SHAPE, num_labels=3))
    raise KeyError(family)


# ---------------------------------------------------------------------------------------------- Llama
LLAMA_VARIANTS = {
    "untied": dict(),
    "tied": dict(tie_word_embeddings=True),
    "all_biases": dict(attention_bias=True, mlp_bias=True),
    "linear": dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0)),
    "llama3": dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=16, rope_theta=500000.0)),
    "yarn": dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                      rope_theta=10000.0)),
    "yarn_betas": dict(rope_parameters=dict(rope_type="yarn", factor=8.0, beta_fast=16.0, beta_slow=2.0,
                                            original_max_position_embeddings=32, rope_theta=10000.0)),
    # DeepSeek's weights of YaRN's temperature: transformers' Llama applies them to cos/sin
    "yarn_mscale": dict(rope_parameters=dict(rope_type="yarn", factor=8.0, mscale=0.8, mscale_all_dim=0.5,
                                             original_max_position_embeddings=16, rope_theta=10000.0)),
    # dynamic NTK kicks in once the sequence (20) exceeds max_position_embeddings (16)
    "dynamic": dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                                                     rope_theta=10000.0)),
    "theta": dict(rope_parameters=dict(rope_type="default", rope_theta=1000.0)),
    "head_dim": dict(head_dim=32),  # n_heads * head_dim != hidden_size
}


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama(variant: str, padded: bool) -> None:
    hf = reference("llama", variant)
    cfg, sd = to_llmlab(hf)
    if variant in ("linear", "llama3", "yarn", "yarn_betas", "yarn_mscale", "dynamic"):
        assert cfg.rope_scaling == {"dynamic": "dynamic_ntk", "yarn_betas": "yarn", "yarn_mscale": "yarn"}.get(
            variant, variant)
    if variant == "yarn_mscale":
        assert (cfg.yarn_mscale, cfg.yarn_mscale_all_dim) == (0.8, 0.5)
    if variant == "tied":
        assert cfg.tie_embeddings
    # dynamic NTK stretches RoPE by the sequence's length: ours by each row's own, transformers by the batch's
    # longest row, so a padded row's reference is that row alone
    check_decoder(hf, ours_from(cfg, sd), padded, rows_alone=variant == "dynamic")


def test_rope_scaling_actually_changes_logits() -> None:
    """Guard against a vacuous pass: with scaling the logits differ from plain RoPE."""
    hf = reference("llama", "yarn")
    cfg, sd = to_llmlab(hf)
    plain = ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": "none", "rope_factor": 1.0})
    ids = inputs()
    with torch.no_grad():
        assert not torch.allclose(ours_from(plain, sd)(ids).logits, hf(ids).logits, atol=1e-3)


# ---------------------------------------------------------------------------------------------- Qwen2
QWEN2_ROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_qwen2(padded: bool) -> None:
    hf = build(Qwen2ForCausalLM, Qwen2Config(**LLAMA_SHAPE, **QWEN2_ROPE))
    cfg, sd = to_llmlab(hf)
    assert cfg.qkv_bias and not cfg.attn_out_bias and cfg.sliding_window is None
    check_decoder(hf, ours_from(cfg, sd), padded)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_qwen2_sliding_window_all_layers(padded: bool) -> None:
    config = Qwen2Config(**LLAMA_SHAPE, **QWEN2_ROPE, use_sliding_window=True, sliding_window=6, max_window_layers=0,
                         attn_implementation="eager")
    hf = build(Qwen2ForCausalLM, config)
    cfg, sd = to_llmlab(hf)
    assert cfg.sliding_window == 6
    check_decoder(hf, ours_from(cfg, sd), padded)


def test_qwen2_mixed_window_layers_are_refused() -> None:
    config = Qwen2Config(**LLAMA_SHAPE, **QWEN2_ROPE, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    with pytest.raises(CheckpointError, match="mix of sliding and full"):
        to_llmlab(build(Qwen2ForCausalLM, config))


# ---------------------------------------------------------------------------------------------- Mistral
WINDOW = 8


@pytest.mark.parametrize("hf_attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_mistral_sliding_window(padded: bool, hf_attn: str) -> None:
    hf = reference("mistral", hf_attn)
    cfg, sd = to_llmlab(hf)
    assert cfg.sliding_window == WINDOW < T
    check_decoder(hf, ours_from(cfg, sd), padded)


def test_mistral_window_matters() -> None:
    """Without the window our model must disagree with HF after WINDOW tokens (and agree before)."""
    hf = reference("mistral", "eager")
    cfg, sd = to_llmlab(hf)
    full = ModelConfig.from_dict({**cfg.to_dict(), "sliding_window": None})
    ids = inputs()
    with torch.no_grad():
        ref, out = hf(ids).logits, ours_from(full, sd)(ids).logits
    torch.testing.assert_close(out[:, :WINDOW], ref[:, :WINDOW], **TOL)
    assert not torch.allclose(out[:, WINDOW:], ref[:, WINDOW:], atol=1e-3)


# ---------------------------------------------------------------------------------------------- GPT-2
GPT2_SHAPE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                  eos_token_id=None, layer_norm_epsilon=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2(tied: bool, padded: bool) -> None:
    hf = build(GPT2LMHeadModel, GPT2Config(**GPT2_SHAPE, tie_word_embeddings=tied))
    cfg, sd = to_llmlab(hf)
    assert cfg.activation == "gelu_tanh" and cfg.position == "learned" and cfg.tie_embeddings == tied
    check_decoder(hf, ours_from(cfg, sd), padded)


# ---------------------------------------------------------------------------------------------- BERT
BERT_SHAPE = dict(SHAPE, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def bert_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = inputs()
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 8:] = 1  # sentence B
    mask = right_padding_mask()
    types = types * mask  # padding gets type 0, as a tokenizer does
    return ids, types, mask


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "rightpad"])
def test_bert_model_hidden_states(padded: bool) -> None:
    hf = reference("bert", "model")
    cfg, sd = to_llmlab(hf)
    assert cfg.head == "none" and cfg.kind == "encoder" and cfg.norm_placement == "post"
    ids, types, mask = bert_inputs()
    mask = mask if padded else None
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        out = ours_from(cfg, sd)(ids, attention_mask=mask, token_type_ids=types)
    assert out.logits is None
    assert_real_tokens_close(out.hidden_states, ref, mask)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "rightpad"])
def test_bert_mlm(padded: bool) -> None:
    hf = reference("bert", "mlm")
    cfg, sd = to_llmlab(hf)
    assert cfg.head == "mlm" and cfg.tie_embeddings
    ids, types, mask = bert_inputs()
    mask = mask if padded else None
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        out = ours_from(cfg, sd)(ids, attention_mask=mask, token_type_ids=types).logits
    assert_real_tokens_close(out, ref, mask)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "rightpad"])
def test_bert_sequence_classification(padded: bool) -> None:
    hf = reference("bert", "cls")
    cfg, sd = to_llmlab(hf)
    assert cfg.head == "classification" and cfg.n_labels == 3 and cfg.classifier_pooler and cfg.pooling == "cls"
    ids, types, mask = bert_inputs()
    mask = mask if padded else None
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        out = ours_from(cfg, sd)(ids, attention_mask=mask, token_type_ids=types).logits
    assert out.shape == (B, 3)
    torch.testing.assert_close(out, ref, **TOL)


# ---------------------------------------------------------------------------------------------- backends
BACKENDS = ["sdpa", "math", "flash"]


def with_backend(cfg: ModelConfig, backend: str) -> ModelConfig:
    # a small flash tile so the online softmax really walks several tiles (and skips hidden ones); flash has no
    # attention dropout (BERT's config carries 0.1 for training; these tests run in eval mode anyway)
    return ModelConfig.from_dict({**cfg.to_dict(), "attn_backend": backend, "flash_block_size": 8, "attn_dropout": 0.0})


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_hf_llama(backend: str, padded: bool) -> None:
    hf = reference("llama", "untied")
    cfg, sd = to_llmlab(hf)
    check_decoder(hf, ours_from(with_backend(cfg, backend), sd), padded)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_hf_mistral_window(backend: str, padded: bool) -> None:
    hf = reference("mistral", "eager")
    cfg, sd = to_llmlab(hf)
    check_decoder(hf, ours_from(with_backend(cfg, backend), sd), padded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_hf_bert(backend: str) -> None:
    hf = reference("bert", "mlm")
    cfg, sd = to_llmlab(hf)
    ids, types, mask = bert_inputs()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        out = ours_from(with_backend(cfg, backend), sd)(ids, attention_mask=mask, token_type_ids=types).logits
    assert_real_tokens_close(out, ref, mask)


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_gradients_match_hf(backend: str) -> None:
    """Same loss on both sides (cross-entropy on the real tokens of a left-padded batch); every parameter's
    gradient, mapped through the same function as the weights, must agree (the flash backend's hand-written
    backward included)."""
    hf = build(LlamaForCausalLM, LlamaConfig(**LLAMA_SHAPE))
    cfg, sd = to_llmlab(hf)
    ours = ours_from(with_backend(cfg, backend), sd)
    ids, mask = inputs(), left_padding_mask()
    targets = inputs(seed=2)
    keep = mask.bool()

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[keep], targets[keep])

    ref_loss = loss_of(hf(ids, attention_mask=mask, position_ids=positions_from(mask)).logits)
    ref_loss.backward()
    our_loss = loss_of(ours(ids, attention_mask=mask).logits)
    our_loss.backward()
    torch.testing.assert_close(our_loss, ref_loss, **TOL)

    ref_grads = state_dict_from_hf({n: p.grad for n, p in hf.named_parameters()}, cfg, hf_config_dict(hf))
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(our_grads) <= set(ref_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cached_decoding_matches_hf_full_forward(family: str) -> None:
    """Prefill 12 tokens of a left-padded batch, then decode the other 8 one at a time through our KVCache:
    every step's logits equal HF's single full forward at that position (the window slides past the
    padding and the prefill for Mistral)."""
    hf = reference(family, "untied" if family == "llama" else "eager")
    cfg, sd = to_llmlab(hf)
    ours = ours_from(cfg, sd)
    ids, mask = inputs(), left_padding_mask()
    prefill = 12
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions_from(mask)).logits
        cache = KVCache()
        steps = [ours(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache).logits]
        for t in range(prefill, T):
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    assert cache.length == T
    assert_real_tokens_close(torch.cat(steps, dim=1), ref, mask)
