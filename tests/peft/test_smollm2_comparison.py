"""Issue 8's comparison run, small: SFT of SmolLM2-135M-Instruct on the embedded English chat corpus with every
PEFT method (benchmarks/peft_sft.py, one fresh process per method, a few steps each): each lowers the held-out
loss, trains only its own parameters (counts far below the model's 135M) and reports its cost. The full-size
table is docs/results/peft.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("lora", "dora", "adalora", "ia3", "bitfit", "adapter", "prompt", "ptuning", "prefix")


@pytest.mark.slow
def test_every_method_lowers_smollm2_validation_loss():
    from llmlab.data import sources
    from llmlab.io.assets import AssetNotFoundError, asset_path

    try:
        asset_path("smollm2-135m-instruct")
        sources.chat_pairs("english")
    except (AssetNotFoundError, sources.MissingDataError) as e:
        pytest.skip(str(e))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peft_sft.py"), "--methods", ",".join(METHODS),
                           "--steps", "3", "--conversations", "32", "--batch", "4", "--max-len", "48",
                           "--threads", "2"], capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)["methods"]
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        assert row["val_loss_final"] < row["val_loss_start"], (method, row)
        assert 0 < row["trainable_params"] < 0.05 * 134_515_008, (method, row)
        assert row["peak_rss_mib"] > 0 and row["tokens_per_s"] > 0 and row["tokens"] > 0
