"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Gauges are set by the engine worker from ``Engine.stats()`` after its steps; latencies are observed
by the worker as each request's tokens are made (time to first token from arrival at the worker).
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_RATE_WINDOW_S = 10.0


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.waiting = Gauge("softprompt_requests_waiting", "requests queued, not yet admitted", registry=r)
        self.running = Gauge("softprompt_requests_running", "requests in the running batch", registry=r)
        self.kv_used = Gauge("softprompt_kv_pages_used", "KV cache pages in use", registry=r)
        self.kv_free = Gauge("softprompt_kv_pages_free", "KV cache pages allocated and free", registry=r)
        self.store_bytes = Gauge("softprompt_prefix_store_bytes", "bytes of prefix K/V in the store", registry=r)
        self.tasks = Gauge("softprompt_tasks_loaded", "tasks (adapters) served", registry=r)
        self.tokens_per_s = Gauge("softprompt_generation_tokens_per_second",
                                  f"generated tokens per second over the last {TOKEN_RATE_WINDOW_S:g} s", registry=r)
        self.generated = Counter("softprompt_generation_tokens", "generated tokens", registry=r)
        self.prompt_tokens = Counter("softprompt_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.finished = Counter("softprompt_requests_finished", "finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("softprompt_requests_rejected", "requests refused before admission by status",
                                ["status"], registry=r)
        self.ttft = Histogram("softprompt_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("softprompt_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("softprompt_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._window = collections.deque()      # (time, tokens) of recent steps

    def step(self, tokens: int) -> None:
        now = time.monotonic()
        if tokens:
            self.generated.inc(tokens)
            self._window.append((now, tokens))
        while self._window and self._window[0][0] < now - TOKEN_RATE_WINDOW_S:
            self._window.popleft()
        span = now - self._window[0][0] if len(self._window) > 1 else 0.0
        self.tokens_per_s.set(sum(n for _, n in self._window) / span if span > 0 else 0.0)

    def engine_state(self, stats: dict, tasks: int) -> None:
        kv = stats["kv_cache"]
        self.waiting.set(stats["waiting"])
        self.running.set(stats["running"])
        self.kv_used.set(kv["pages_used"])
        self.kv_free.set(kv["pages_total"] - kv["pages_used"])
        self.store_bytes.set(stats["prefix_store_bytes"])
        self.tasks.set(tasks)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
