"""Multi-task generation engine: continuous batching over a paged own-token KV cache, with each
task's prefix read in place from the model's prefix store.

Modules: ``requests`` (Request, SamplingParams, Result, StreamEvent), ``kv_cache`` (PagedKVCache
and the per-forward StepCache), ``scheduler`` (admission and per-step token budget),
``sampling`` (greedy / temperature / top-k / top-p, stops), ``runner`` (the model forward:
ModelRunner, HFRunner, CpuDecoderRunner), ``cpu_decode`` (the CPU decoder of Llama-family models),
``engine`` (Engine: requests, scheduling, sampling, stats), ``cli`` (``softprompt generate``).
"""
from .engine import Engine
from .kv_cache import PagedKVCache
from .requests import Request, RequestError, Result, SamplingParams, StreamEvent

__all__ = ["Engine", "PagedKVCache", "Request", "RequestError", "Result", "SamplingParams", "StreamEvent"]
