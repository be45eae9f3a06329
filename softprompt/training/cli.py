"""``softprompt train``: train one or many soft-prompt tasks at once (batches mix tasks).

    softprompt train --task sentiment2=prompt_tuning --task topic=prefix_tuning --steps 60
    torchrun --nproc_per_node 2 -m softprompt.training --model tiny --task a=p_tuning_v2:data.jsonl ...

``--task NAME=METHOD[:DATA]``: METHOD is prompt_tuning | p_tuning_v1 | prefix_tuning | p_tuning_v2;
DATA is one of the built-in tasks (sentiment2, sentiment3, topic; the default is NAME) or a
JSONL file with ``{"prompt", "target"}`` or ``{"input_ids", "labels"}`` rows. ``--model`` is
smollm2 (the default; the packaged SmolLM2-135M), a local HF folder, or ``tiny`` (a random
4-layer Llama, for tests). The trained prompts are written to ``OUTPUT/final`` (load them with
``SoftPromptModel.load``); ``OUTPUT/checkpoint-*`` are resumed from automatically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cli_support import (HelpFormatter, nonnegative_float, nonnegative_int, positive_float, positive_int,
                           run_command)

METHODS = ("prompt_tuning", "p_tuning_v1", "prefix_tuning", "p_tuning_v2")


def tiny_model(seed: int = 0):
    """A random 4-layer Llama (vocab 512) for tests and smoke runs."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def load_model(spec: str):
    """``(model, tokenizer or None)`` for ``--model``."""
    if spec == "tiny":
        return tiny_model(), None
    if spec == "smollm2":
        from ..assets import load_smollm2
        return load_smollm2()
    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"--model {spec!r} is neither 'smollm2', 'tiny' nor a local HF model folder (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)


def method_config(method: str, tokens: int, tokenizer=None, init_text: str = "", projection_dim: int = 128,
                  encoder_hidden: int = 256, seed: int = 0):
    """The default config of each method used by the CLI and the real demo."""
    from ..methods import PrefixTuning, PromptTuning, PTuningV1, PTuningV2
    if method == "prompt_tuning":
        if init_text and tokenizer is not None:
            return PromptTuning(tokens, init="text", init_text=init_text, tokenizer=tokenizer)
        return PromptTuning(tokens, init="vocab", seed=seed)
    if method == "p_tuning_v1":
        if init_text and tokenizer is not None:
            return PTuningV1(num_virtual_tokens=tokens, encoder="mlp", hidden_size=encoder_hidden, init="text",
                             init_text=init_text, tokenizer=tokenizer)
        return PTuningV1(num_virtual_tokens=tokens, encoder="mlp", hidden_size=encoder_hidden)
    if method == "prefix_tuning":
        return PrefixTuning(tokens, projection_dim=projection_dim, init="zero")
    if method == "p_tuning_v2":
        return PTuningV2(tokens, init="zero")
    raise ValueError(f"method {method!r} is unknown; expected one of {METHODS}")


def read_jsonl(path) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"{path}:{n}: a row must be a JSON object with 'prompt' and 'target' "
                                     "(or 'input_ids' and 'labels')")
    if not rows:
        raise ValueError(f"{path}: no examples; expected one JSON object per line with 'prompt' and 'target' "
                         "(or 'input_ids' and 'labels')")
    return rows


def parse_task(spec: str):
    if "=" not in spec:
        raise ValueError(f"--task {spec!r} is invalid; expected NAME=METHOD[:DATA]")
    name, rest = spec.split("=", 1)
    if not name.strip():
        raise ValueError(f"--task {spec!r} has an empty NAME; expected NAME=METHOD[:DATA]")
    method, _, data = rest.partition(":")
    if method not in METHODS:
        raise ValueError(f"--task {spec!r}: method {method!r} is unknown; expected one of {METHODS}")
    return name, method, data or name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt train", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local HF folder")
    p.add_argument("--task", action="append", required=True, metavar="NAME=METHOD[:DATA]",
                   help="a task to train (repeatable); METHOD: " + " | ".join(METHODS))
    p.add_argument("--tokens", type=positive_int, default=16, help="soft tokens / prefix length per task")
    p.add_argument("--projection-dim", type=positive_int, default=128, help="prefix tuning MLP width")
    p.add_argument("--n-train", type=positive_int, default=600, help="examples per built-in task")
    p.add_argument("--n-eval", type=nonnegative_int, default=0,
                   help="held-out examples per built-in task for the eval loss (0: no evaluation)")
    p.add_argument("--output-dir", default="softprompt-run", help="checkpoints and the final prompts (OUTPUT/final)")
    p.add_argument("--steps", type=nonnegative_int, default=60, help="optimizer steps (0: train --epochs instead)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="epochs, used when --steps is 0")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per step and process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="batches accumulated into one step")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate of every task")
    p.add_argument("--task-lr", action="append", default=[], metavar="NAME=LR",
                   help="learning rate of one task (repeatable), overriding --lr")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer of the prompts")
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0, help="gradient clipping (0: none)")
    p.add_argument("--warmup-ratio", type=nonnegative_float, default=0.0,
                   help="share of the steps spent warming the learning rate up from 0")
    p.add_argument("--scheduler", default="linear",
                   help="learning-rate schedule after warm-up: a transformers scheduler name "
                        "(linear, cosine, constant, ...)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp32 on the CPU; on a GPU bf16 where supported, else fp16")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the base model's activations in the backward pass (less memory)")
    p.add_argument("--eval-steps", type=nonnegative_int, default=0,
                   help="evaluate every so many steps (0: once, at the end; needs --n-eval)")
    p.add_argument("--save-steps", type=nonnegative_int, default=0,
                   help="write OUTPUT/checkpoint-N every so many steps (0: only the final prompts)")
    p.add_argument("--logging-steps", type=positive_int, default=10, help="print the loss every so many steps")
    p.add_argument("--resume", default="auto",
                   help="auto: from the last OUTPUT/checkpoint-* if any | PATH: that checkpoint | none")
    p.add_argument("--fsdp", default="", help='e.g. "full_shard auto_wrap" (base models that do not fit; untested)')
    p.add_argument("--seed", type=int, default=0, help="data order, splits and initialisation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    return p


def train_command(argv=None) -> int:
    """Entry of ``softprompt train`` (also ``python -m softprompt.training``, and under ``torchrun``)."""
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .. import SoftPromptModel
    from ..tasks import TASK_NAMES, load_task
    from .trainer import TrainConfig, train_tasks

    # Everything that can be checked without the model is checked first: no slow load before a typo.
    specs = {}
    for spec in opts.task:
        name, method, data = parse_task(spec)
        if name in specs:
            raise ValueError(f"--task {spec!r}: task {name!r} is given twice; each NAME once")
        if data not in TASK_NAMES and not Path(data).is_file():
            raise ValueError(f"--task {spec!r}: data {data!r} is neither a built-in task {TASK_NAMES} nor a file")
        specs[name] = (spec, method, data)
    task_lr = {}
    for item in opts.task_lr:
        name, _, lr = item.partition("=")
        if name not in specs:
            raise ValueError(f"--task-lr {item!r}: {name!r} is not a --task name; expected one of {sorted(specs)}")
        try:
            task_lr[name] = positive_float(lr)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--task-lr {item!r}: {exc}; expected NAME=LR with LR > 0") from None
    files = {name: read_jsonl(data) for name, (_, _, data) in specs.items() if data not in TASK_NAMES}

    model, tok = load_model(opts.model)
    spm = SoftPromptModel(model)
    tasks = {}
    for name, (spec, method, data) in specs.items():
        init_text = ""
        if data in TASK_NAMES:
            if tok is None:
                raise ValueError(f"--task {spec!r}: built-in task {data!r} needs a model with a tokenizer")
            task = load_task(data, opts.n_train, max(opts.n_eval, 3 * 2), seed=opts.seed)
            train = task.train_examples()
            evals = [(task.soft_row.format(text=t), task.target(y)) for t, y in task.test][: opts.n_eval]
            init_text = task.init_text
        else:
            train, evals = files[name], []
        config = method_config(method, opts.tokens, tok, init_text, opts.projection_dim, seed=opts.seed)
        tasks[name] = (config, train, evals) if evals else (config, train)
    args = TrainConfig(output_dir=opts.output_dir, max_steps=opts.steps, num_epochs=opts.epochs,
                       batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr,
                       task_lr=task_lr, optimizer=opts.optimizer, max_grad_norm=opts.max_grad_norm,
                       warmup_ratio=opts.warmup_ratio, lr_scheduler=opts.scheduler,
                       seed=opts.seed, precision=opts.precision, gradient_checkpointing=opts.gradient_checkpointing,
                       eval_steps=opts.eval_steps or None, save_steps=opts.save_steps or None,
                       logging_steps=opts.logging_steps, resume=None if opts.resume == "none" else opts.resume,
                       fsdp=opts.fsdp, progress=not opts.no_progress)
    result = train_tasks(spm, tasks, args, tokenizer=tok)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result['steps']} steps in {result['seconds']:.1f} s on {result['world_size']} process(es); "
              f"final train loss {result['train_loss']:.4f}"
              + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else "")
              + f"; prompts in {Path(opts.output_dir) / 'final'}")
    _end_distributed()
    return 0


def _end_distributed() -> None:
    """Under torchrun, leave the process group together: a rank that exits while gloo's threads
    still serve a peer can abort at interpreter shutdown ("terminate called without an active exception")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    """``python -m softprompt.training`` / ``torchrun -m softprompt.training``: one-line errors, like ``softprompt train``."""
    return run_command("softprompt train", train_command, argv)


if __name__ == "__main__":
    sys.exit(main())
