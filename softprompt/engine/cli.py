"""``softprompt generate``: serve prompts for saved soft-prompt tasks through the Engine.

    softprompt generate --model smollm2 --adapters DIR --task NAME "prompt" ["prompt" ...]

``--model``: a HF model folder, or ``smollm2`` for the packaged SmolLM2-135M (softprompt.assets).
``--adapters``: a folder of saved tasks, either
  - a ``SoftPromptModel.save`` checkpoint (loaded with ``SoftPromptModel.load``; deep prompts and
    compilable input prompts are served), or
  - ``<task>.safetensors`` files holding ``k`` and ``v`` ``[L, Hkv, P, D]`` in cache convention.
``--task``: once (every prompt) or once per prompt; ``none`` means no soft prompt. The names are
checked against the folder (``softprompt tasks DIR`` lists them) before the model is loaded.
Prints each completion, then tokens/s, batch occupancy and memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..cli_support import HelpFormatter, nonnegative_float, nonnegative_int, positive_int, probability, run_command


def _load_model(name: str):
    if name == "smollm2":
        from ..assets import load_smollm2
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(name)
    if not (path / "config.json").exists():
        raise ValueError(f"--model {name!r} is not a model folder (no config.json) "
                         "and not 'smollm2'")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def load_adapters(model, directory: Optional[str]) -> List[str]:
    """Attach ``model`` and put the tasks saved in ``directory`` into its prefix store; their names."""
    from ..integration import attach
    from ..integration.attach import attached_store
    if directory is None:
        if attached_store(model) is None:
            attach(model)
        return []
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"--adapters {directory!r} is not a folder")
    try:
        from ..methods import checkpoint
        config_name = checkpoint.CONFIG_NAME
    except Exception:            # the methods' save format is not available
        config_name = None
    if config_name is not None and (path / config_name).exists():
        from ..model import SoftPromptModel
        spm = SoftPromptModel.load(model, path)
        served = [n for n in spm.tasks if spm.method_of(n) and (
            spm.prompts[n].kind == "deep" or spm.compilable(n))]
        skipped = sorted(set(spm.tasks) - set(served))
        if skipped:
            print(f"note: tasks {skipped} are inline input prompts that cannot be compiled into a prefix; "
                  "the engine does not serve them", file=sys.stderr)
        spm.sync(served)
        model.__dict__["_softprompt_cli_model"] = spm      # keep the wrapper alive
        return served
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--adapters {directory!r} holds neither a SoftPromptModel "
                         "checkpoint nor <task>.safetensors files")
    from safetensors.torch import load_file
    store = attached_store(model) or attach(model)
    names = []
    for f in files:
        tensors = load_file(str(f))
        if "k" not in tensors or "v" not in tensors:
            raise ValueError(f"{f} has tensors {sorted(tensors)}; expected 'k' and 'v' "
                             "[L, Hkv, P, D] in cache convention")
        try:
            store.add(f.stem, tensors["k"].to(store.dtype), tensors["v"].to(store.dtype))
        except ValueError as exc:
            raise ValueError(f"{f}: {exc}") from None
        names.append(f.stem)
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("--model", required=True, help="HF model folder, or 'smollm2'")
    p.add_argument("--adapters", help="folder of saved tasks (list them with `softprompt tasks DIR`)")
    p.add_argument("--task", action="append", default=None,
                   help="task of the prompts: once for all, or once per prompt ('none' = no soft prompt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt at most")
    p.add_argument("--min-new-tokens", type=nonnegative_int, default=0, help="tokens to generate before EOS may end")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")
    p.add_argument("--max-batch-size", type=positive_int, default=64, help="sequences decoded together at most")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="tokens per engine step at most (prefill chunks and decode rows)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are made")
    p.add_argument("--json", action="store_true", help="print results and stats as JSON")
    return p


def generate_command(argv=None) -> int:
    """``softprompt generate``; raises on bad input (``main`` turns that into one line and exit 2)."""
    import torch
    with torch.no_grad():          # scoped: callers (tests, notebooks) keep their grad mode
        return _generate(build_parser().parse_args(argv))


def _generate_with_progress(engine, prompts, tasks, sampling, show: bool):
    """``engine.generate`` with a progress bar on stderr (tokens made; requests done) unless ``show`` is False."""
    from tqdm.auto import tqdm
    rids = {}
    with tqdm(total=len(prompts) * sampling.max_new_tokens, desc="generating", unit="tok", disable=not show,
              file=sys.stderr, leave=False) as bar:
        done = 0
        for ev in engine.stream(prompts, tasks, sampling):
            rids[ev.index] = ev.request_id
            bar.update(ev.token_id is not None)
            if ev.finished:
                done += 1
                bar.set_postfix_str(f"{done}/{len(prompts)} requests done")
    return [engine.take_result(rids[i]) for i in sorted(rids)]


def _generate(opts) -> int:
    import torch
    from ..adapters import NO_TASK, check_tasks
    from .engine import Engine
    from .requests import SamplingParams
    tasks = opts.task or [NO_TASK]
    if len(tasks) == 1:
        tasks = tasks * len(opts.prompts)
    if len(tasks) != len(opts.prompts):
        raise ValueError(f"{len(tasks)} --task values for {len(opts.prompts)} prompts; "
                         "give one for all or one per prompt")
    check_tasks(opts.adapters, tasks)            # a typo costs no model load
    tasks = [None if t.lower() == NO_TASK else t for t in tasks]
    model, tokenizer = _load_model(opts.model)
    model.eval()
    if torch.cuda.is_available():
        model = model.cuda()
    available = load_adapters(model, opts.adapters)
    sampling = SamplingParams(max_new_tokens=opts.max_new_tokens, min_new_tokens=opts.min_new_tokens,
                              temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed,
                              stop=tuple(opts.stop), ignore_eos=opts.ignore_eos)
    engine = Engine(model, tokenizer, max_batch_size=opts.max_batch_size,
                    max_num_batched_tokens=opts.max_num_batched_tokens)
    start = time.perf_counter()
    if opts.stream and not opts.json:
        rids = {}
        for ev in engine.stream(opts.prompts, tasks, sampling):
            if ev.error:
                print(f"[{ev.index}] error: {ev.error}", flush=True)
            elif ev.text:
                print(f"[{ev.index}] {ev.text!r}", flush=True)
            rids[ev.index] = ev.request_id
        results = [engine.take_result(rids[i]) for i in sorted(rids)]
    else:
        results = _generate_with_progress(engine, opts.prompts, tasks, sampling, show=not opts.json)
    wall = time.perf_counter() - start
    st = engine.stats()
    kv = st["kv_cache"]
    summary = {"requests": len(results), "generated_tokens": st["generated_tokens"], "seconds": round(wall, 3),
               "tokens_per_s": round(st["generated_tokens"] / wall, 2) if wall > 0 else None,
               "prefill_tokens": st["prefill_tokens"], "batch_occupancy": round(st["batch_occupancy"], 3),
               "mean_decode_batch": round(st["mean_decode_batch"], 2), "kv_cache_peak_bytes": kv["bytes_peak"],
               "prefix_store_bytes": st["prefix_store_bytes"], "peak_rss_bytes": st["peak_rss_bytes"],
               "forward_path": st["forward_path"], "tasks_available": available}
    errors = sum(1 for r in results if r is not None and not r.ok)
    if opts.json:
        print(json.dumps({"results": [r.__dict__ for r in results if r is not None], "stats": summary}, indent=2))
    else:
        for i, r in enumerate(results):
            head = f"[{i}] task={r.task or 'none'}"
            if r.ok:
                print(f"{head} ({len(r.token_ids)} tokens, {r.finish_reason}): {r.text!r}")
            else:
                print(f"{head} error: {r.error}")
        print(f"{summary['generated_tokens']} tokens in {wall:.2f}s = {summary['tokens_per_s']} tokens/s | "
              f"batch occupancy {st['batch_occupancy']:.0%} (mean decode batch {st['mean_decode_batch']:.1f} of "
              f"{opts.max_batch_size}) | KV cache peak {kv['bytes_peak'] / 2 ** 20:.2f} MiB, prefix store "
              f"{st['prefix_store_bytes'] / 2 ** 20:.2f} MiB, peak RSS {st['peak_rss_bytes'] / 2 ** 30:.2f} GiB | "
              f"{st['forward_path']}")
    engine.close()
    return 1 if errors else 0


def main(argv=None) -> int:
    return run_command("softprompt generate", generate_command, argv)


if __name__ == "__main__":
    sys.exit(main())
