"""Load time and peak memory of SmolLM2-135M-Instruct from its GGUF: llmlab.load vs transformers'
from_pretrained(gguf_file=...), each in a fresh process (so peak RSS belongs to one loader), same run.

    python benchmarks/load.py [--asset smollm2-135m-instruct | --asset path/to/model.gguf] [--repeats 2]

Prints one JSON object. peak_rss_mib is the process's maximum resident set; import_rss_mib is the resident set
after the imports, before the load; load_rss_mib is their difference (what the load itself costs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
which, asset = sys.argv[1], sys.argv[2]
if which == "llmlab":
    import llmlab
else:
    from pathlib import Path
    import transformers
    from llmlab.io.assets import ASSETS, asset_path
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss()
t = time.perf_counter()
if which == "llmlab":
    model, tok = llmlab.load(asset)
else:
    path = asset_path(asset) if asset in ASSETS else Path(asset)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
seconds = time.perf_counter() - t
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": seconds, "import_rss_mib": before, "peak_rss_mib": rss(), "params": params}))
"""


def measure(which: str, asset: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, asset], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--asset", default="smollm2-135m-instruct", help="a named asset or a llama-architecture .gguf file")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    result = {"benchmark": "load", "asset": args.asset}
    for which in ("llmlab", "transformers"):
        runs = [measure(which, args.asset) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        result[which] = {"seconds": round(best["seconds"], 2), "peak_rss_mib": round(best["peak_rss_mib"]),
                         "load_rss_mib": round(best["peak_rss_mib"] - best["import_rss_mib"]),
                         "params": best["params"]}
    result["speedup_vs_transformers"] = round(result["transformers"]["seconds"] / result["llmlab"]["seconds"], 2)
    result["load_memory_ratio_vs_transformers"] = round(
        result["llmlab"]["load_rss_mib"] / max(1, result["transformers"]["load_rss_mib"]), 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
