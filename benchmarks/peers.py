"""The engine workload through softprompt's Engine, vLLM (CPU build) and llama.cpp, side by side in one run.

    python -m benchmarks.peers                         # SmolLM2-135M, 4 tasks x 16 tweets, prefix 64, 64 tokens
    python -m benchmarks.peers --prefix-len 1024       # long shared prefixes
    python -m benchmarks.peers --best-precision        # also each peer at its best precision, labelled
    python -m benchmarks.peers --model tiny            # tiny random Llama, engine only (a smoke run)

Workload: that of ``benchmarks.engine`` (its prompt rows and task assignment): ``--tasks`` tasks x
``--per-task`` requests, greedy, EOS ignored, ``--new-tokens`` tokens per request. Each task's
prefix is ``--prefix-len`` text tokens (few-shot demonstrations from the task's training tweets),
given to every system as the same token ids:
- ``softprompt engine``: the prefix's K/V computed once by the base model and kept in the prefix
  store (the hard-prompt path), rows prefilled and decoded by ``softprompt.Engine``;
- ``vLLM``: prefix + row as one token prompt, automatic prefix caching, the prefixes cached before
  each run (``benchmarks/peers_vllm.py``); ``vLLM, prompt embeddings``: the same prompts as embeddings
  (prompt tuning as vLLM serves it, no prefix caching);
- ``llama.cpp``: F32 GGUF, one batch, one KV stream per sequence, each task's prefix computed once
  and copied into its rows' streams with ``seq_cp`` (``benchmarks/peers_llamacpp.py``).
So the prefixes are ready-made for every system and each run pays for its rows' prefill and decode.
The tokens of every system are compared with the engine's (same model, same fp32 arithmetic up to
summation order: they should agree except after near-ties).

Peers are optional: each runs in a worker process under the python of its own virtual environment
(``--vllm-python`` / ``SOFTPROMPT_VLLM_PYTHON``, ``--llamacpp-python`` / ``SOFTPROMPT_LLAMACPP_PYTHON``;
recipe in ``benchmarks/README.md``); a peer whose python or package is missing is skipped with a
message. All systems are loaded once and run interleaved (the order rotates each round), one
warm-up round then ``--repeats`` timed rounds; tokens/s on medians, ratios against the best peer
at the same precision (fp32). Writes ``benchmarks/results/peers-<model>-p<prefix>-cpu.{md,json}``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .common import add_output_arguments, environment, markdown_table, output_dir, write_results
from .engine import tweet_rows
from .generate import problem, tiny_llama
from .peers_protocol import PeerError, PeerProcess

ENGINE = "softprompt engine"
VLLM_ENV, LLAMACPP_ENV = "SOFTPROMPT_VLLM_PYTHON", "SOFTPROMPT_LLAMACPP_PYTHON"
DEFAULT_ENV_ROOT = Path("/work/peers-env")
KV_BYTES_FP32 = 4


@dataclass
class System:
    """One row of the comparison: a name, its precision label and how to run the workload once."""
    name: str
    precision: str
    run: Callable[[int], List[List[int]]] = field(repr=False)     # new_tokens -> tokens per row
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    info: dict = field(default_factory=dict)
    times: List[float] = field(default_factory=list)
    prefix_seconds: Optional[float] = None
    last_seconds: Optional[float] = None         # a peer's own time of its last run
    tokens: Optional[List[List[int]]] = None


def prefix_token_ids(tokenizer, tasks: int, length: int, seed: int = 0) -> List[List[int]]:
    """Per task, ``length`` token ids of few-shot text: training tweets of one of the demo tasks with
    their labels, in the demo's row format (each task its own draw), cut to exactly ``length``."""
    from softprompt.tasks import TASK_NAMES, load_task
    out = []
    for t in range(tasks):
        task = load_task(TASK_NAMES[t % len(TASK_NAMES)], 200, 10, seed=seed + t)
        ids: List[int] = []
        for text, label in task.train:
            ids += tokenizer(f"Tweet: {text}\nAnswer: {task.labels[label]}\n\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                break
        if len(ids) < length:
            raise ValueError(f"prefix_len: {length} tokens asked, the task's training tweets give only {len(ids)}")
        out.append(ids[:length])
    return out


@torch.no_grad()
def prefix_kv(model, ids: List[int]):
    """The K/V a cache holds after the base model reads ``ids`` (cache convention, ``[L, Hkv, P, D]``)."""
    if not ids:
        cfg = model.config
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        empty = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, 0, D, dtype=model.dtype)
        return empty, empty.clone()
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    layers = out.cache.layers
    return torch.stack([layer.keys[0] for layer in layers]), torch.stack([layer.values[0] for layer in layers])


def engine_system(model, prefixes: List[List[int]], rows, names) -> System:
    """softprompt's Engine with the text prefixes' K/V in its prefix store (attached until closed)."""
    from softprompt import attach, detach
    from softprompt.engine import Engine, SamplingParams
    store = attach(model)
    for t, ids in enumerate(prefixes):
        store.add(f"task{t}", *prefix_kv(model, ids))
    engine = Engine(model, max_batch_size=len(rows))

    def run(new_tokens: int):
        with torch.no_grad():
            res = engine.generate(rows, names, SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens))
        bad = [r.error for r in res if not r.ok]
        if bad:
            raise RuntimeError(f"engine: {len(bad)} requests failed, first: {bad[0]}")
        return [list(r.token_ids) for r in res]

    def close():
        engine.close()
        detach(model)

    return System(ENGINE, "fp32", run, close, info={"forward path": engine.forward_path()})


def has_module(python: str, module: str) -> Optional[str]:
    """None when ``python`` can import ``module`` (found without importing it); else why not."""
    if not python:
        return "no python given"
    if not Path(python).exists():
        return f"{python} does not exist"
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        rc = subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{python} did not run: {exc}"
    return None if rc == 0 else f"{python} has no {module}"


def peer_system(name: str, precision: str, python: str, module: str, log_dir: Path, workload: dict,
                load: dict, env: Optional[dict] = None) -> System:
    """A worker process for one peer, loaded (its model read once) and ready to run the workload."""
    log = log_dir / ("".join(c if c.isalnum() else "_" for c in f"{name} {precision}") + ".log")
    peer = PeerProcess(name, python, module, log, env=env)
    try:
        info = peer.request("load", **load)["info"]
    except Exception:
        peer.close()
        raise
    system = System(name, precision, run=None, close=peer.close, info={**info, "log": str(log)})

    def run(new_tokens: int):
        reply = peer.request("run", **workload, new_tokens=new_tokens)
        system.prefix_seconds = reply.get("prefix_seconds")
        system.last_seconds = reply["seconds"]
        return reply["tokens"]

    system.run = run
    return system


def vllm_kv_gib(rows: int, max_model_len: int, model, bytes_per_value: int) -> int:
    """KV-cache space (GiB, rounded up) for ``rows`` sequences of ``max_model_len`` positions."""
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * D * bytes_per_value
    return max(1, math.ceil(1.2 * rows * max_model_len * per_token / 2 ** 30))


def peers(opts, model, workload: dict, log_dir: Path) -> List[System]:
    """Start every peer that is installed; print why each missing one is skipped."""
    out: List[System] = []
    B = len(workload["rows"])
    max_len = max(len(p) for p in workload["prefixes"]) + max(len(r) for r in workload["rows"]) + opts.new_tokens
    max_model_len = -(-max_len // 256) * 256
    threads = {"OMP_NUM_THREADS": str(opts.threads)}

    def start(*args, **kwargs):
        try:
            out.append(peer_system(*args, **kwargs))
            print(f"  {args[0]} ({args[1]}): loaded", flush=True)
        except PeerError as exc:
            print(f"  {args[0]} ({args[1]}): failed to load, skipped:\n{exc}", flush=True)

    why = has_module(opts.vllm_python, "vllm")
    if why:
        print(f"  vLLM: skipped ({why}; give --vllm-python or {VLLM_ENV})")
    else:
        modes = [("text", "vLLM, text prefix + prefix caching")]
        if not opts.no_vllm_embeds:
            modes.append(("embeds", "vLLM, prompt embeddings"))
        best = opts.best_precision and not opts.no_vllm_bf16
        dtypes = [("float32", "fp32", 4)] + ([("bfloat16", "bf16 (best)", 2)] if best else [])
        for dtype, label, elt in dtypes:
            for mode, name in modes:
                if mode == "embeds" and dtype != "float32":
                    continue
                env = {**threads, "VLLM_CPU_KVCACHE_SPACE": str(vllm_kv_gib(B, max_model_len, model, elt)),
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "VLLM_CPU_OMP_THREADS_BIND": f"0-{opts.threads - 1}"}   # its "auto" keeps a core back
                start(name, label, opts.vllm_python, "benchmarks.peers_vllm", log_dir, workload,
                      dict(model=str(opts.hf_model), mode=mode, dtype=dtype, threads=opts.threads,
                           max_model_len=max_model_len, max_rows=B, block_size=opts.vllm_block_size),
                      env=env)
    why = has_module(opts.llamacpp_python, "llama_cpp")
    ggufs = [(opts.gguf, "fp32", "f32")] + ([(opts.gguf_best, "Q8_0 weights, f16 KV (best)", "f16")]
                                           if opts.best_precision else [])
    if not why:
        missing = [str(g) for g, _, _ in ggufs if not Path(g).is_file()]
        why = f"GGUF {', '.join(missing)} not found (give --gguf / --gguf-best)" if missing else None
    if why:
        print(f"  llama.cpp: skipped ({why}; give --llamacpp-python or {LLAMACPP_ENV})")
    else:
        for gguf, label, kv in ggufs:
            start("llama.cpp", label, opts.llamacpp_python, "benchmarks.peers_llamacpp", log_dir, workload,
                  dict(model=str(gguf), threads=opts.threads, kv_type=kv), env=threads)
    return out


def interleaved(systems: List[System], new_tokens: int, repeats: int, pause: float) -> None:
    """One warm-up round (2 tokens), then ``repeats`` timed rounds; the order rotates each round.
    A peer that fails is dropped from ``systems`` with a message (the engine's failure raises)."""
    for rep in range(repeats + 1):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]
        for system in order:
            time.sleep(pause)                 # let the previous system's idle threads park
            start = time.perf_counter()
            try:
                tokens = system.run(2 if rep == 0 else new_tokens)
            except PeerError as exc:
                print(f"  {system.name} ({system.precision}) failed, dropped:\n{exc}", flush=True)
                system.close()
                systems.remove(system)
                continue
            wall = time.perf_counter() - start
            if rep == 0:
                continue
            # a peer's own timing excludes the protocol's transfer; the engine's is the wall time
            system.times.append(wall if system.last_seconds is None else system.last_seconds)
            system.tokens = tokens
            print(f"  round {rep}: {system.name} ({system.precision}) {system.times[-1]:.2f}s", flush=True)


def agreement(tokens, reference) -> str:
    same = sum(a == b for r, s in zip(tokens, reference) for a, b in zip(r, s))
    total = sum(len(r) for r in reference)
    rows = sum(r == s for r, s in zip(tokens, reference))
    return f"{same / total:.1%} ({rows}/{len(reference)} rows identical)"


def report(systems: List[System], made: int) -> tuple:
    """Rows for the table and the JSON: tokens/s on medians, ratio to the best fp32 peer."""
    engine = next(s for s in systems if s.name == ENGINE)
    median = {id(s): statistics.median(s.times) for s in systems}
    fp32_peers = [s for s in systems if s is not engine and s.precision == "fp32"]
    best_peer = min(fp32_peers, key=lambda s: median[id(s)]) if fp32_peers else None
    rows = []
    for s in systems:
        tps = made / median[id(s)]
        row = {"system": s.name, "precision": s.precision, "tokens/s (median)": f"{tps:.1f}",
               "runs (s)": " / ".join(f"{t:.2f}" for t in s.times),
               "tokens = engine": agreement(s.tokens, engine.tokens),
               "prefixes computed once (s)": "" if s.prefix_seconds is None else f"{s.prefix_seconds:.2f}"}
        if best_peer is not None:
            row["vs best fp32 peer"] = f"{median[id(best_peer)] / median[id(s)]:.2f}x"
        row["info"] = {k: v for k, v in s.info.items() if k != "system_info"}
        rows.append(row)
    summary = None
    if best_peer is not None:
        summary = (f"engine {median[id(best_peer)] / median[id(engine)]:.2f}x the best fp32 peer "
                   f"({best_peer.name}) on median runs")
    return rows, summary


def parse(argv=None):
    root = DEFAULT_ENV_ROOT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--per-task", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (medians reported)")
    p.add_argument("--threads", type=int, default=2, help="threads of every system")
    p.add_argument("--quick", action="store_true", help="4 tasks x 4 requests, 16 new tokens, 1 timed round")
    p.add_argument("--vllm-python", default=os.environ.get(VLLM_ENV, str(root / "vllm/bin/python")))
    p.add_argument("--llamacpp-python", default=os.environ.get(LLAMACPP_ENV, str(root / "llamacpp/bin/python")))
    p.add_argument("--gguf", default=str(root / "models/smollm2-135m-f32.gguf"), help="F32 GGUF for llama.cpp")
    p.add_argument("--gguf-best", default=str(root / "models/smollm2-135m-q8_0.gguf"),
                   help="GGUF for llama.cpp's best-precision row")
    p.add_argument("--hf-model", default=None, help="HF folder for vLLM (default: softprompt's SmolLM2 folder)")
    p.add_argument("--vllm-block-size", type=int, default=32,
                   help="vLLM KV block size, the prefix-caching unit (its CPU default 128 would cache no 64-token prefix)")
    p.add_argument("--no-vllm-embeds", action="store_true", help="skip vLLM with prompt embeddings")
    p.add_argument("--no-vllm-bf16", action="store_true",
                   help="with --best-precision, leave out vLLM in bf16 (one more model load and compile)")
    p.add_argument("--no-peers", action="store_true", help="only the engine")
    p.add_argument("--best-precision", action="store_true",
                   help="also vLLM in bf16 and llama.cpp with Q8_0 weights and an f16 KV cache (labelled)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between systems")
    p.add_argument("--out-name", default=None, help="results name (default peers-<model>-p<prefix>-cpu)")
    p.add_argument("--no-write", action="store_true")
    add_output_arguments(p)
    opts = p.parse_args(argv)
    for name in ("tasks", "per_task", "new_tokens", "repeats", "threads"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(opts, name)}; must be >= 1")
    if opts.prefix_len < 0:
        p.error(f"--prefix-len: {opts.prefix_len}; must be >= 0")
    if opts.quick:
        opts.per_task, opts.new_tokens, opts.repeats = 4, 16, 1
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    torch.set_num_threads(opts.threads)
    if opts.model == "tiny":
        model, tokenizer = tiny_llama(), None
        if not opts.no_peers:
            print("peers: skipped (they need the real model: --model smollm2)")
            opts.no_peers = True
    else:
        from softprompt.assets import load_smollm2, smollm2_dir
        model, tokenizer = load_smollm2()
        model.eval()
        opts.hf_model = opts.hf_model or str(smollm2_dir())
    _, names, random_rows = problem(model, tasks=opts.tasks, per_task=opts.per_task, prefix=0)
    if tokenizer is not None:
        rows = [r.tolist() for r in tweet_rows(tokenizer, len(names))]
        prefixes = prefix_token_ids(tokenizer, opts.tasks, opts.prefix_len)
    else:
        g = torch.Generator().manual_seed(1)
        rows = [r.tolist() for r in random_rows]
        prefixes = [torch.randint(10, model.config.vocab_size, (opts.prefix_len,), generator=g).tolist()
                    for _ in range(opts.tasks)]
    tasks = [int(n[len("task"):]) for n in names]
    workload = {"prefixes": prefixes, "rows": rows, "tasks": tasks}
    made = len(rows) * opts.new_tokens
    env = environment()
    title = (f"peers: {opts.model}, {opts.tasks} tasks x {opts.per_task} requests, {opts.prefix_len}-token text "
             f"prefix per task, {opts.new_tokens} greedy tokens, {opts.threads} threads per system")
    print(f"{title} | {env['device']} | commit {env['commit']}", flush=True)

    systems = [engine_system(model, prefixes, rows, names)]
    with tempfile.TemporaryDirectory(prefix="peers-logs-") as logs:
        try:
            if not opts.no_peers:
                systems += peers(opts, model, workload, Path(logs))
            interleaved(systems, opts.new_tokens, opts.repeats, opts.pause)
        finally:
            for s in systems:
                s.close()
    rows_out, summary = report(systems, made)
    columns = ["system", "precision", "tokens/s (median)", "vs best fp32 peer", "runs (s)", "tokens = engine",
               "prefixes computed once (s)"]
    text = markdown_table(rows_out, columns)
    if summary:
        text += f"\n\n{summary}."
    print(text)
    if not opts.no_write:
        env.update(workload=title, cpu=_cpu_name())
        name = opts.out_name or f"peers-{opts.model}-p{opts.prefix_len}-cpu"
        print(f"written: {write_results(name, env, rows_out, text, output_dir(name, opts.out, opts.update_results))}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
