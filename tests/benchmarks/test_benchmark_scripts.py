"""The benchmark scripts run end to end and print the JSON they promise (tiny sizes: this checks the
scripts, not the speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_model_throughput_reports_all_contenders():
    result = run("model_throughput.py", "--rounds", "1", "--steps", "1", "--batch", "1", "--seq", "16", "--dtypes", "fp32",
                 "--no-compile")
    row = result["fp32"]
    for key in ("llmlab_tokens_per_s", "llmlab_logits_tokens_per_s", "transformers_tokens_per_s", "speedup", "llmlab_mfu"):
        assert row[key] > 0
    assert result["params"]["llmlab"] == result["params"]["transformers"]  # same shape, same parameter count


def test_attention_backends_agree():
    result = run("attention_backends.py", "--seq", "48", "--batch", "2", "--reps", "1")
    for mask, backends in result["masks"].items():
        assert backends["math"]["agrees"] and backends["flash"]["agrees"], mask


def test_tokenizer_benchmark_runs_and_ids_agree():
    from llmlab.data import sources

    try:
        sources.sotu_speeches()
    except sources.MissingDataError as e:
        pytest.skip(f"corpus not installed here: {e}")
    result = run("tokenizer.py", "--mb", "0.3", "--vocab", "3000", "--kinds", "bpe,wordpiece,unigram",
                 "--no-smollm2")
    for kind in ("bpe", "wordpiece", "unigram"):
        row = result[kind]["3000"]  # the Chinese characters alone need about 2,300 ids
        assert row["ids_identical"] == {"tokenizers": True, "fast_path": True, "python_batched": True}
        assert 256 < row["vocab_learned"] <= 3000
        assert row["train_s"]["llmlab"] > 0 and row["encode_mb_per_s"]["llmlab_python"] > 0
        assert row["encode_corpus_mb_per_s"]["llmlab_python"] > 0
        assert row["quality"]["english"]["bytes_per_token"] > 1
        goals, rates = row["goals"], row["encode_mb_per_s"]
        assert all(g["ratio"] > 0 and g["met"] in (True, False) for g in goals.values())
        assert goals["llmlab_python_vs_tokenizers_call_by_call_held_out"]["ratio"] == round(
            rates["llmlab_python"] / rates["tokenizers_call_by_call"], 2)
    bpe = result["bpe"]["3000"]
    assert bpe["fast_path"] == "tiktoken" and bpe["encode_mb_per_s"]["tiktoken"] > 0
    assert {"train_vs_tokenizers", "fast_vs_tiktoken_held_out"} <= set(bpe["goals"])


def test_load_benchmark_reports_both_loaders(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "io"))
    from test_gguf import hf_weights, write_gguf  # a one-layer llama GGUF: transformers reads SmolLM2's in a minute

    write_gguf(tmp_path / "tiny.gguf", hf_weights())
    result = run("load.py", "--repeats", "1", "--asset", str(tmp_path / "tiny.gguf"))
    assert result["llmlab"]["params"] == result["transformers"]["params"]
    assert result["llmlab"]["seconds"] > 0 and result["llmlab"]["peak_rss_mib"] > 0


@pytest.mark.slow
def test_generate_benchmark_reports_both_layouts():
    result = run("generate.py", "--rounds", "1", "--new-tokens", "4", "--requests", "4", "--beam-tokens", "4",
                 "--no-smollm2", "--threads", "1", "--no-compile")  # the compiled engine is tested in tests/infer
    row = result["decode_b1_15m"]
    assert row["identical"] and row["ms_per_token"]["weights_floor"] > 0
    for layout in ("paged", "contiguous"):
        assert row[f"speedup_{layout}"] > 0
        assert result["throughput_15m"][layout]["llmlab_tokens_per_s"] > 0
    beam = result["beam_15m"]
    assert beam["identical"] and beam["speedup_paged"] > 0
    assert 0 < beam["kv_mib_paged_at_peak"] < beam["kv_mib_kvcache_at_end"]  # the beams share their prompts


@pytest.mark.slow
def test_serve_benchmark_reports_both_servers():
    result = run("serve.py", "--small", "--requests", "4", "--concurrency", "2", "--warmup", "1")
    for server in ("llmlab", "transformers"):
        row = result[server]
        assert row["requests_per_s"] > 0 and row["tokens_per_s"] > 0 and row["completion_tokens"] > 0
        assert 0 < row["ttft_ms"]["p50"] <= row["latency_ms"]["p50"] and row["latency_ms"]["p99"] > 0
    assert set(result["ratio"]) == {"requests_per_s", "tokens_per_s", "p50_latency", "p50_ttft"}
    assert isinstance(result["goal_3x_requests_at_equal_or_better_p50"], bool)
    assert 0 <= result["greedy_texts_equal_fraction"]["transformers"] <= 1


@pytest.mark.slow
def test_peft_benchmark_reports_every_method_against_full_fine_tuning():
    result = run("peft.py", "--preset", "nano", "--methods", "full,lora,ia3,bitfit", "--steps", "1", "--batch", "1",
                 "--seq", "16", "--threads", "1")
    rows = result["methods"]
    assert rows["full"]["trainable_percent"] == 100 and rows["full"]["vs_full"]["peak_rss"] == 1.0
    for method in ("lora", "ia3", "bitfit"):
        row = rows[method]
        assert 0 < row["trainable_params"] < rows["full"]["trainable_params"], method
        assert row["peak_rss_mib"] > 0 and row["tokens_per_s"] > 0 and row["vs_full"]["tokens_per_s"] > 0
