"""Server metrics in the Prometheus text format (no client library needed).

    llmlab_requests_total{endpoint="/v1/chat/completions",status="200"}   counter
    llmlab_prompt_tokens_total, llmlab_generation_tokens_total             counters
    llmlab_num_requests_running, llmlab_num_requests_waiting               gauges (engine sequences)
    llmlab_kv_blocks_used, llmlab_kv_blocks_total                          gauges
    llmlab_time_to_first_token_seconds, llmlab_request_latency_seconds     histograms
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.latency = Histogram()

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def add_tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

    def render(self, engine, model_name: str) -> str:
        """The text /metrics answers. Engine numbers are read without stopping it (lengths and counters only)."""
        sched, blocks = engine.scheduler, engine.cache.blocks
        lines = []

        def metric(name: str, kind: str, help_: str, rows: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows])

        with self._lock:
            rows = [f'llmlab_requests_total{{endpoint="{_escape(e)}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            metric("llmlab_requests_total", "counter", "HTTP requests by endpoint and status code", rows)
            metric("llmlab_prompt_tokens_total", "counter", "prompt tokens processed",
                   [f"llmlab_prompt_tokens_total {self.prompt_tokens}"])
            metric("llmlab_generation_tokens_total", "counter", "tokens generated",
                   [f"llmlab_generation_tokens_total {self.generation_tokens}"])
            ttft, latency = self.ttft.lines("llmlab_time_to_first_token_seconds"), \
                self.latency.lines("llmlab_request_latency_seconds")
        metric("llmlab_num_requests_running", "gauge", "sequences the engine is decoding",
               [f"llmlab_num_requests_running {len(sched.running)}"])
        metric("llmlab_num_requests_waiting", "gauge", "sequences waiting for the engine",
               [f"llmlab_num_requests_waiting {len(sched.waiting)}"])
        metric("llmlab_kv_blocks_used", "gauge", "KV-cache blocks in use", [f"llmlab_kv_blocks_used {blocks.in_use()}"])
        metric("llmlab_kv_blocks_total", "gauge", "KV-cache blocks in the pool",
               [f"llmlab_kv_blocks_total {blocks.num_blocks}"])
        metric("llmlab_time_to_first_token_seconds", "histogram", "seconds from arrival to the first token", ttft)
        metric("llmlab_request_latency_seconds", "histogram", "seconds from arrival to the last token", latency)
        metric("llmlab_model_info", "gauge", "the served model", [f'llmlab_model_info{{model="{_escape(model_name)}"}} 1'])
        return "\n".join(lines) + "\n"
