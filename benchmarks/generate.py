"""End-to-end mixed-task generation: our patched model against PEFT-style prefix caches.

    python -m benchmarks.generate                      # tiny random Llama, CPU-sized
    python -m benchmarks.generate --model smollm2      # the real SmolLM2-135M (when installed)

Methods, all greedy with the same prompts and prefixes, side by side in one run:
- ``per-task generate``: one HF ``generate()`` per task, that task's prefix copied into each row's
  DynamicCache (what PEFT does, one adapter at a time);
- ``batch, prefix copied``: one HF ``generate()`` over the whole batch, each row's task prefix
  copied into its own cache rows (a PEFT-style mixed batch; needs equal prefix lengths);
- ``softprompt``: the model attached with ``softprompt.attach``, one ``generate()`` with ``task_ids``;
  the cache holds only each sequence's own tokens, the prefixes stay in the store.
The tokens of ``softprompt`` must equal those of ``batch, prefix copied``; tokens/s is reported for each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from softprompt.baselines import copied_prefix_cache, left_pad

from .common import add_output_arguments, environment, markdown_table, output_dir


def tiny_llama(seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def smollm2():
    from softprompt.assets import load_smollm2   # installs nothing; raises with the install command if absent
    model, _ = load_smollm2()
    return model.eval()


def problem(model, *, tasks, per_task, prefix, seed=0):
    """Random cache-convention prefixes per task, the task of each request, and prompt token rows."""
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    prefixes = {f"task{t}": (torch.randn(L, Hkv, prefix, D, generator=g).to(dtype),
                             torch.randn(L, Hkv, prefix, D, generator=g).to(dtype)) for t in range(tasks)}
    names = [f"task{t % tasks}" for t in range(tasks * per_task)]
    rows = [torch.randint(10, cfg.vocab_size, (int(n),), generator=g)
            for n in torch.randint(8, 24, (len(names),), generator=g)]
    return prefixes, names, rows


def run(model, *, tasks: int, per_task: int, prefix: int, new_tokens: int, seed: int = 0):
    from softprompt import attach, detach
    prefixes, names, rows = problem(model, tasks=tasks, per_task=per_task, prefix=prefix, seed=seed)
    pad = 0
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    B = len(names)
    results, tokens = {}, {}

    def timed(label, fn):
        warm = dict(gen)
        gen.update(max_new_tokens=2, min_new_tokens=2)      # warm-up: first calls pay one-off costs
        fn()
        gen.update(warm)
        start = time.perf_counter()
        out = fn()
        results[label] = time.perf_counter() - start
        tokens[label] = out

    with torch.no_grad():
        def per_task():
            outs = [None] * B
            for t in range(tasks):
                idx = [b for b, n in enumerate(names) if n == f"task{t}"]
                ids, mask = left_pad([rows[b] for b in idx], pad)
                mask = torch.cat([torch.ones(len(idx), prefix, dtype=torch.long), mask], 1)
                cache = copied_prefix_cache(prefixes, [names[b] for b in idx])
                out = model.generate(ids, attention_mask=mask, cache=cache, **gen)
                for j, b in enumerate(idx):
                    outs[b] = out[j, ids.shape[1]:]
            return torch.stack(outs)

        def batch_copied():
            ids, mask = left_pad(rows, pad)
            mask = torch.cat([torch.ones(B, prefix, dtype=torch.long), mask], 1)
            return model.generate(ids, attention_mask=mask, cache=copied_prefix_cache(prefixes, names), **gen)[:, ids.shape[1]:]

        timed("per-task generate", per_task)
        timed("batch, prefix copied", batch_copied)
        store = attach(model)
        try:
            for name, (k, v) in prefixes.items():
                store.add(name, k, v)
            ids, mask = left_pad(rows, pad)
            task_ids = store.task_ids(names)
            timed("softprompt", lambda: model.generate(ids, attention_mask=mask, task_ids=task_ids,
                                                       **gen)[:, ids.shape[1]:])
        finally:
            detach(model)

    same = torch.equal(tokens["softprompt"], tokens["batch, prefix copied"])
    agree = (tokens["softprompt"] == tokens["batch, prefix copied"]).float().mean().item()
    best_baseline = min(results["per-task generate"], results["batch, prefix copied"])
    table = []
    for label, sec in results.items():
        table.append({"method": label, "seconds": f"{sec:.2f}", "tokens/s": f"{B * new_tokens / sec:.1f}",
                      "speed-up of softprompt": f"{sec / results['softprompt']:.2f}x" if label != "softprompt"
                      else f"{best_baseline / sec:.2f}x vs best baseline"})
    return table, same, agree


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    add_output_arguments(parser)
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = tiny_llama() if opts.model == "tiny" else smollm2()
    env = environment()
    print(f"generate: {opts.model}, {opts.tasks} tasks x {opts.per_task} requests, prefix {opts.prefix}, "
          f"{opts.new_tokens} new tokens | {env['device']} | commit {env['commit']}")
    table, same, agree = run(model, tasks=opts.tasks, per_task=opts.per_task, prefix=opts.prefix,
                             new_tokens=opts.new_tokens)
    text = markdown_table(table, ["method", "seconds", "tokens/s", "speed-up of softprompt"])
    verdict = ("softprompt tokens identical to the PEFT-style batch: yes" if same else
               f"softprompt tokens identical to the PEFT-style batch: NO ({agree:.1%} of tokens agree)")
    print(text + "\n\n" + verdict)
    if not opts.no_write:
        path = output_dir("generate", opts.out, opts.update_results) / f"generate-{opts.model}.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(f"# generate benchmark ({opts.model})\n\n{', '.join(f'{k}: {v}' for k, v in env.items())}; "
                       f"{opts.tasks} tasks x {opts.per_task} requests, prefix {opts.prefix}, "
                       f"{opts.new_tokens} new tokens, greedy.\n\n{text}\n\n{verdict}\n")
        os.replace(tmp, path)
        print(f"written: {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
