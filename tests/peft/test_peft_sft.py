"""SFT with parameter-efficient methods (issue 8): the `peft` recipe section, `llmlab sft --peft`, the adapter
files next to final/, `llmlab peft merge`, and clear errors. A nano model pretrained for a few steps on a tiny
corpus (as tests/train does) is the base."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from train_helpers import nano_overrides, write_corpus  # noqa: E402

import llmlab  # noqa: E402
from llmlab.cli.main import main  # noqa: E402
from llmlab.peft import AdapterConfig, load_adapter, load_bottleneck_adapter, load_prompt  # noqa: E402
from llmlab.peft.adapters import adapter_parameter_count  # noqa: E402
from llmlab.train import PretrainConfig, load_recipe, pretrain  # noqa: E402
from llmlab.train.metrics import read_metrics  # noqa: E402
from llmlab.train.supervised import SFTConfig, sft  # noqa: E402

FAST = ["data.max_len=64", "data.batch_size=4", "train.max_steps=12", "train.eval_every=6", "train.lr=3e-3",
        "train.warmup_steps=2", "train.progress=false", "train.plot=false", "train.peak_flops=1e11",
        "train.sample_prompts=[Say the number 3.]", "train.sample_tokens=4", "train.threads=1",
        "train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_sft")
    corpus = write_corpus(root / "docs.jsonl")
    torch.set_num_threads(1)
    pretrain(load_recipe(PretrainConfig, ROOT / "recipes" / "pretrain" / "nano.yaml", nano_overrides(
        corpus, root / "pre", **{"train.max_steps": 12, "train.eval_every": 0, "train.checkpoint_every": 12,
                                 "train.keep_last": 1, "data.val_fraction": 0.0})))
    chats = root / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(60):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say the number {i % 7}."},
                                             {"role": "assistant", "content": f"The number is {i % 7}."}]}) + "\n")
    return root / "pre" / "final", chats


def overrides(base, out, *extra):
    model, chats = base
    return [f"model={model}", f"out_dir={out}", f"data.sources=[{chats}]", *FAST, *extra]


def run(base, out, *extra):
    return sft(load_recipe(SFTConfig, ROOT / "recipes" / "sft" / "nano.yaml", overrides(base, out, *extra)))


def batch(seed=0):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(m, x):
    with torch.no_grad():
        return m.eval()(x).logits


def test_lora_sft_trains_only_the_adapter_and_saves_it_in_peft_format(base, tmp_path):
    out = tmp_path / "lora"
    result = run(base, out, "peft.method=lora", "peft.r=4", "peft.alpha=8")
    val = read_metrics(out / "metrics.jsonl", "val")
    assert math.isfinite(result.val_loss) and val[-1]["val_loss"] < val[0]["val_loss"], val
    summary = json.loads((out / "peft.json").read_text())
    assert summary["method"] == "lora" and 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["trainable_percent"] == pytest.approx(
        100 * summary["trainable_parameters"] / summary["total_parameters"])
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    # the base weights are bit-identical after training: in the final checkpoint's training state...
    original, _ = llmlab.load(base[0])
    from safetensors.torch import load_file
    ckpt = Path(result.checkpoint)
    trained = {}
    for f in ckpt.glob("*.safetensors"):
        if f.name.startswith("model"):
            trained.update(load_file(str(f)))
    for name, p in original.state_dict().items():
        key = name if name in trained else name.replace(".weight", ".base_layer.weight")
        if key in trained:
            assert torch.equal(trained[key], p), name
    assert sum(".adapters.default." in k for k in trained) > 0
    # ...and the adapter loaded onto a fresh base reproduces the trained model (= final/, the merged model)
    final, tok = llmlab.load(out / "final")
    assert tok is not None and tok.chat_template is not None
    fresh, _ = llmlab.load(base[0])
    load_adapter(fresh, out / "adapter")
    x = batch()
    assert torch.allclose(logits(fresh, x), logits(final, x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(original, x), logits(final, x), atol=1e-3)


@pytest.mark.parametrize("method,extra,files", [
    ("dora", ["peft.r=4"], ["adapter_config.json", "adapter_model.safetensors"]),
    ("ia3", [], ["adapter_config.json", "adapter_model.safetensors"]),
    ("adalora", ["peft.r=2", "peft.init_r=4", "peft.tinit=2", "peft.tfinal=2"],
     ["adalora_model.safetensors", "adalora_config.json"]),
    ("bitfit", ["peft.target_modules=[q, o, up, down]"], ["bitfit_model.safetensors", "bitfit.json"]),
    ("adapter", ["peft.reduction_factor=8"], ["bottleneck_adapter.safetensors", "bottleneck_adapter.json"]),
    ("prompt", ["peft.n_virtual_tokens=4"], ["adapter_config.json", "adapter_model.safetensors"]),
    ("ptuning", ["peft.n_virtual_tokens=4"], ["adapter_config.json", "adapter_model.safetensors"]),
    ("prefix", ["peft.n_virtual_tokens=4"], ["adapter_config.json", "adapter_model.safetensors"]),
])
def test_every_method_trains_and_saves(base, tmp_path, method, extra, files):
    out = tmp_path / method
    result = run(base, out, f"peft.method={method}", "train.max_steps=6", "train.eval_every=6", *extra)
    assert result.steps == 6 and math.isfinite(result.val_loss) and math.isfinite(result.train_loss)
    for f in files:
        assert (out / "adapter" / f).is_file(), f
    summary = json.loads((out / "peft.json").read_text())
    assert 0 < summary["trainable_parameters"] < 0.5 * summary["total_parameters"]
    final, _ = llmlab.load(out / "final")  # always a plain checkpoint
    x = batch()
    if method in ("dora", "ia3"):
        fresh, _ = llmlab.load(base[0])
        load_adapter(fresh, out / "adapter")
        assert torch.allclose(logits(fresh, x), logits(final, x), atol=1e-4, rtol=1e-4)
    if method == "adalora":
        ranks = json.loads((out / "adapter" / "adalora_config.json").read_text())["ranks"]
        assert sum(ranks.values()) <= 2 * len(ranks)  # pruned to the target budget at step T - tfinal
    if method in ("prompt", "ptuning", "prefix", "adapter"):
        original, _ = llmlab.load(base[0])
        assert torch.equal(logits(original, x), logits(final, x))  # the base is untouched
    if method == "adapter":  # the trained bottleneck loads back onto the base and changes its outputs
        assert load_bottleneck_adapter(original, out / "adapter") == "default"
        assert not torch.allclose(logits(original, x), logits(final, x), atol=1e-4)
        assert summary["trainable_parameters"] == adapter_parameter_count(
            final.cfg.dim, AdapterConfig(reduction_factor=8), final.cfg.n_layers)
    if method in ("prompt", "ptuning", "prefix"):
        wrapper = load_prompt(original, out / "adapter")
        assert wrapper.n_virtual_tokens == 4
        assert not read_metrics(out / "metrics.jsonl", "sample")  # no samples from a prompt wrapper


def test_cli_peft_flag_and_merge(base, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["sft", "--recipe", str(ROOT / "recipes" / "sft" / "nano.yaml"), "--peft", "lora",
            *overrides(base, out, "train.max_steps=4", "peft.r=2")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sft: 4 steps" in printed and "lora:" in printed and "trainable" in printed
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    # llmlab peft merge BASE ADAPTER OUT: the merged model computes what the adapted one does
    for to in ("llmlab", "hf"):
        merged_dir = tmp_path / f"merged-{to}"
        assert main(["peft", "merge", str(base[0]), str(out / "adapter"), str(merged_dir), "--to", to]) == 0
        merged, tok = llmlab.load(merged_dir)
        assert tok is not None
        adapted, _ = llmlab.load(base[0])
        load_adapter(adapted, out / "adapter")
        x = batch(1)
        assert torch.allclose(logits(adapted, x), logits(merged, x), atol=1e-4, rtol=1e-4), to
        assert "blocks.0.attn.qkv.weight" in merged.state_dict()
    capsys.readouterr()
    assert main(["peft", "merge", str(base[0]), str(tmp_path / "nothing"), str(tmp_path / "m")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_merge_of_ia3_and_dora_equals_the_adapted_model(base, tmp_path):
    from llmlab.peft import IA3Config, LoraConfig, add_ia3, add_lora, save_adapter

    for name, add in (("ia3", lambda m: add_ia3(m, IA3Config())),
                      ("dora", lambda m: add_lora(m, LoraConfig(r=2, target_modules=("q", "v", "down"),
                                                                use_dora=True)))):
        m, _ = llmlab.load(base[0])
        add(m)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        save_adapter(m, tmp_path / name)
        assert main(["peft", "merge", str(base[0]), str(tmp_path / name), str(tmp_path / f"{name}-m")]) == 0
        merged, _ = llmlab.load(tmp_path / f"{name}-m")
        x = batch(2)
        assert torch.allclose(logits(m, x), logits(merged, x), atol=1e-4, rtol=1e-4), name


def test_bad_peft_settings_are_clear_errors(base, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown peft.method 'lorra' \\(did you mean 'lora'\\?\\)"):
        load_recipe(SFTConfig, None, ["peft.method=lorra"])
    with pytest.raises(ValueError, match="peft.rr.*peft.r"):
        load_recipe(SFTConfig, None, ["peft.rr=4"])
    with pytest.raises(ValueError, match="peft.r must be an int >= 1"):
        load_recipe(SFTConfig, None, ["peft.r=0"])
    with pytest.raises(ValueError, match="r=512 is larger than min"):
        run(base, tmp_path / "big", "peft.method=lora", "peft.r=512")
    with pytest.raises(ValueError, match="peft.tinit \\+ peft.tfinal"):
        load_recipe(SFTConfig, None, ["peft.method=adalora", "peft.tinit=10", "peft.tfinal=10",
                                      "train.max_steps=20"])
    assert main(["sft", "--peft", "nope", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "unknown peft.method 'nope'" in capsys.readouterr().err
