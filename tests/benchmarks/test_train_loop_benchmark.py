"""benchmarks/train_loop.py runs end to end and prints the JSON it promises (nano, a few steps: this checks
the script, not the speed)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_loop_benchmark_reports_the_loop_fraction():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_loop.py"), "--preset", "nano", "--steps", "6",
                          "--warmup", "2", "--seq", "32", "--batch", "2", "--checkpoint-every", "4", "--vocab", "300",
                          "--threads", "1"], capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout)
    assert result["benchmark"] == "train_loop" and result["steps_timed"] == 6
    assert result["loop_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0
    assert abs(result["loop_fraction"] - result["loop_tokens_per_s"] / result["bare_tokens_per_s"]) < 1e-3
    assert result["checkpoints_written"] == 2
