"""The client side of ``softprompt bench serve``: streaming completions over HTTP.

Kept apart from :mod:`.serve` so the load test can run its clients in a separate process (spawned,
importing only this), as a real deployment's clients would be: in the server's process they would
compete with its event loop and engine thread for the interpreter lock.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import List, Sequence, Tuple


async def stream_one(client, model: str, prompt, max_tokens: int, headers: dict) -> dict:
    """One streaming completion: its tokens, finish reason, TTFT, inter-token gaps and latency."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start = time.perf_counter()
    out = {"tokens": [], "finish": None, "ttft": None, "itl": [], "status": None, "error": None}
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = data["error"]["message"]
                for ch in data.get("choices", []):
                    now = time.perf_counter()
                    if ch["token_ids"]:
                        if last is None:
                            out["ttft"] = now - start
                        else:
                            out["itl"].append(now - last)
                        last = now
                        out["tokens"] += ch["token_ids"]
                    out["finish"] = ch["finish_reason"] or out["finish"]
    except Exception as exc:     # noqa: BLE001 - a lost request is a result here
        out["error"] = repr(exc)
    out["latency"] = time.perf_counter() - start
    return out


def run_clients(url: str, models: Sequence[str], prompts: Sequence, per_client: int, new_tokens: int,
                headers: dict = None) -> Tuple[List[dict], float]:
    """``len(models) // per_client`` concurrent clients, each streaming its ``per_client`` requests
    one after another (client ``k`` sends requests ``k * per_client ...``): the results in request
    order and the wall time of the whole burst."""
    import httpx
    clients = len(models) // per_client

    async def client_loop(c, k):
        return [await stream_one(c, models[k * per_client + j], prompts[k * per_client + j], new_tokens,
                                 headers or {}) for j in range(per_client)]

    async def burst():
        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
            per = await asyncio.gather(*(client_loop(c, k) for k in range(clients)))
        return [r for rs in per for r in rs]

    start = time.perf_counter()
    results = asyncio.run(burst())
    return results, time.perf_counter() - start


def ready() -> bool:
    """A no-op for a freshly spawned worker: its imports happen before the timed burst."""
    import httpx  # noqa: F401
    return True
