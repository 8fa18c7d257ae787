"""llmlab checkpoints: save -> load is the identity (weights, config, ties, buffers, tokenizer ids), shards,
dtypes, generation config, atomic replacement (an exception or a SIGKILL mid-save leaves the old checkpoint
loadable) and the errors a damaged directory gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmlab.io.checkpoint as ckpt
from llmlab import tokenizer as tokenizers
from llmlab.io import CheckpointError, load_checkpoint, load_generation_config, save_checkpoint
from llmlab.model import ModelConfig, Transformer

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "all that glitters is not gold", "the early bird catches the worm"] * 10


def model_of(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("nano", **overrides)).eval()


def assert_same_model(a: Transformer, b: Transformer) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    ids = torch.randint(0, a.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"prefix_len": 4} if a.cfg.kind == "prefix_lm" else {}
    with torch.no_grad():
        out_a, out_b = a(ids, **kwargs), b(ids, **kwargs)
    ya = out_a.hidden_states if out_a.logits is None else out_a.logits
    yb = out_b.hidden_states if out_b.logits is None else out_b.logits
    # Not bitwise: the loaded weights are views into the mmapped file, 8-byte but not 64-byte aligned, and MKL's
    # kernels for a few rows (model/linear.py) round differently by the alignment of the weight (about 1e-7).
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)


# Configs that exercise every buffer _rebuild_buffers recomputes, ties, MoE, MLA and the encoder heads.
VARIANTS = {
    "nano": dict(),
    "tied": dict(tie_embeddings=True),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=32),
    "sinusoidal": dict(position="sinusoidal"),
    "alibi": dict(position="alibi"),
    "learned_gpt2ish": dict(position="learned", norm="layernorm", norm_bias=True, activation="gelu_tanh",
                            qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "moe": dict(n_experts=4, moe_top_k=2, n_shared_experts=1),
    "mla": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "prefix_lm": dict(kind="prefix_lm"),
    "bert_mlm": dict(kind="encoder", head="mlm", position="learned", norm_placement="post", n_token_types=2,
                     embed_norm=True, norm="layernorm", tie_embeddings=True),
    "classifier": dict(kind="encoder", head="classification", n_labels=3, classifier_pooler=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_identity(tmp_path, variant: str) -> None:
    model = model_of(**VARIANTS[variant])
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, tok = load_checkpoint(tmp_path / "ckpt")
    assert tok is None and not loaded.training
    assert_same_model(model, loaded)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert ModelConfig.from_json(tmp_path / "ckpt" / "config.json") == model.cfg


def test_tied_head_is_stored_once_and_tied_on_load(tmp_path) -> None:
    model = model_of(tie_embeddings=True)
    save_checkpoint(model, tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "head.proj.weight" not in stored and "tok_emb.weight" in stored
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.head.proj.weight is loaded.tok_emb.weight


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_and_generation_config(tmp_path, kind: str) -> None:
    tok = tokenizers.train(TEXTS, kind, vocab_size=300 if kind == "bpe" else 120)  # bpe: 256 bytes + merges
    model = model_of()
    generation = {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9, "eos_token_id": 2}
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok, generation_config=generation)
    loaded, tok2 = load_checkpoint(tmp_path / "ckpt")
    assert_same_model(model, loaded)
    for text in ["the lazy fox saves gold", "unseen words: zebra quartz!"]:
        assert tok2.encode(text) == tok.encode(text)
    assert load_generation_config(tmp_path / "ckpt") == generation


def test_tokenizer_must_have_save(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"\.save\(directory\)"):
        save_checkpoint(model_of(), tmp_path / "ckpt", tokenizer=object())
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.iterdir())  # the temp dir is gone too


def test_sharded_checkpoint(tmp_path) -> None:
    model = model_of()
    save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert_same_model(model, load_checkpoint(tmp_path / "ckpt")[0])


def test_dtypes(tmp_path) -> None:
    model = model_of().to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    as_fp32, _ = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    torch.testing.assert_close(as_fp32.tok_emb.weight, model.tok_emb.weight.float(), rtol=0, atol=0)


# ============================================================================================ atomic writes
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch) -> None:
    old = model_of(seed=0)
    save_checkpoint(old, tmp_path / "ckpt", max_shard_bytes=40_000)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # one shard of the new checkpoint is on disk, then the writer dies
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model_of(seed=1), tmp_path / "ckpt", max_shard_bytes=40_000)
    assert_same_model(old, load_checkpoint(tmp_path / "ckpt")[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_killed_save_leaves_previous_checkpoint(tmp_path) -> None:
    """A real SIGKILL half way through writing the shards of the new checkpoint."""
    old = model_of(seed=0)
    save_checkpoint(old, tmp_path / "ckpt", max_shard_bytes=40_000)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import llmlab.io.checkpoint as ckpt
        from llmlab.model import ModelConfig, Transformer
        real, calls = ckpt.save_file, []
        def dying(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            calls.append(filename)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_file = dying
        torch.manual_seed(1)
        ckpt.save_checkpoint(Transformer(ModelConfig.preset("nano")), {str(tmp_path / "ckpt")!r}, max_shard_bytes=40_000)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # the half-written new one, unused
    assert_same_model(old, load_checkpoint(tmp_path / "ckpt")[0])
    new = model_of(seed=1)
    save_checkpoint(new, tmp_path / "ckpt")  # and a later save goes through
    assert_same_model(new, load_checkpoint(tmp_path / "ckpt")[0])


def test_replace_without_atomic_exchange(tmp_path, monkeypatch) -> None:
    """Where renameat2 is missing, the swap is two renames; if a crash falls between them the previous
    checkpoint sits in a hidden sibling, and loading finds it (with a warning)."""
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    save_checkpoint(model_of(seed=0), tmp_path / "ckpt")
    new = model_of(seed=1)
    save_checkpoint(new, tmp_path / "ckpt")
    assert_same_model(new, load_checkpoint(tmp_path / "ckpt")[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old-1234abcd")  # the state between the two renames
    with pytest.warns(UserWarning, match="interrupted save left the previous checkpoint"):
        assert_same_model(new, load_checkpoint(tmp_path / "ckpt")[0])


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a model directory"):
        save_checkpoint(model_of(), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_checkpoint(model_of(), tmp_path / "file")


# ============================================================================================ damaged checkpoints
@pytest.fixture
def saved(tmp_path) -> Path:
    save_checkpoint(model_of(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_bad_config(saved) -> None:
    (saved / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(saved)
    (saved / "config.json").write_text(json.dumps({**model_of().cfg.to_dict(), "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"config\.json: not a valid llmlab ModelConfig.*did you mean 'n_layers'"):
        load_checkpoint(saved)


def test_truncated_weights(saved) -> None:
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        load_checkpoint(saved)


def test_missing_unexpected_and_misshapen_tensors(saved) -> None:
    sd = load_file(saved / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensors 'blocks\.1\.attn\.qkv\.weight'"):
        load_checkpoint(saved)
    save_file({**sd, "blocks.0.attn.extra": torch.zeros(2)}, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensors 'blocks\.0\.attn\.extra'"):
        load_checkpoint(saved)
    save_file(sd, saved / "model.safetensors")
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "hidden_dim": 96}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'blocks\.0\.mlp\.up\.weight' has shape "
                                              r"\(256, 64\), the config expects \(192, 64\)"):
        load_checkpoint(saved)
