"""The `llmlab` console script lists its groups, and `llmlab model info --preset micro` prints the formula values
for every attention variant (KV bytes worked out by hand, parameters equal to the built model's numel)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from llmlab.model import ModelConfig, Transformer


# ================================================================================================ CLI
def _numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def _llmlab() -> list[str]:
    exe = Path(sys.executable).with_name("llmlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llmlab.cli.main"]


def test_console_script_help_lists_the_groups():
    out = subprocess.run([*_llmlab(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"\bmodel\b", out.stdout)


def test_model_info_micro_prints_the_formula_values_for_every_variant():
    from llmlab.cli.model import attention_variants

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([*_llmlab(), "model", "info", "--preset", "micro"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.count("│") >= 7}
    variants = attention_variants(ModelConfig.preset("micro"))
    # micro: 6 layers, 6 heads of 64; KV bytes per token in bf16 written out by hand; MLA: latent 128 + rope 32
    kv = {"MHA": 2 * 6 * 6 * 64 * 2, "GQA": 2 * 6 * 2 * 64 * 2, "MQA": 2 * 6 * 1 * 64 * 2, "MLA": 6 * (128 + 32) * 2}
    for name, cfg in variants.items():
        assert name in rows, out.stdout
        assert f"{kv[name]:,}" in rows[name], rows[name]
        assert f"{_numel(cfg) / 1e6:.2f}M" in rows[name], rows[name]
    assert "15.7" in rows["GQA"]  # the preset's advertised size
