"""Train the soft prompts of one or many tasks at once, on top of HF ``Trainer``.

    from softprompt import SoftPromptModel, PromptTuning, PrefixTuning
    from softprompt.training import TrainConfig, train_tasks

    spm = SoftPromptModel(model)
    result = train_tasks(spm, {"sentiment": (PromptTuning(16), train_pairs),
                               "topic": (PrefixTuning(16, projection_dim=128), topic_pairs)},
                         TrainConfig(output_dir="runs/x", max_steps=60, batch_size=8),
                         tokenizer=tok)

Batches mix tasks (one shuffled dataset over every task's examples; each row carries its task
index), so one optimizer step updates every task present in the batch. ``Trainer`` provides
gradient accumulation, mixed precision (bf16/fp16 on a GPU), evaluation, checkpoints (only the
prompt modules are written, with the optimizer/scheduler/RNG state) and resume, the progress bar,
and data parallelism: started under ``torchrun`` the same call runs DDP (gloo on CPUs, NCCL on
GPUs); each process takes its own shard of every global batch, gradients are averaged, and the
loss is normalised by the number of target tokens of the *global* batch, so the prompts follow
the single-process run on the same global batch. FSDP (``TrainConfig.fsdp``) is passed to
``Trainer`` for a base model that does not fit one device; it is not exercised by the tests.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..methods.base import MethodConfig
from .data import MultiTaskCollator, MultiTaskDataset

log = logging.getLogger("softprompt.training")


@dataclass
class TrainConfig:
    """Settings of a training run (global batch = batch_size x gradient_accumulation_steps x processes).

    Args:
        output_dir: checkpoints (``checkpoint-<step>/``), the final prompts and ``train_result.json``.
        max_steps: optimizer steps (``<= 0``: ``num_epochs`` epochs instead).
        batch_size: rows per device per micro-batch.
        learning_rate: default peak learning rate; ``task_lr`` overrides it per task.
        lr_scheduler: a ``Trainer`` scheduler name ("linear", "cosine", "constant", ...).
        precision: "auto" (fp32 on a CPU; bf16 on a GPU that has it, else fp16), "fp32", "bf16", "fp16".
        gradient_checkpointing: recompute the base model's activations in the backward. Works for
            input-level methods (prompt tuning, P-tuning v1); SoftPromptModel refuses it with
            deep-prompt tasks (prefix tuning, P-tuning v2) in the batch.
        eval_steps: evaluate (loss) every so many steps when evaluation data is given; 0/None: at the end only.
        save_steps: write a checkpoint every so many steps (0/None: none until the end).
        resume: "auto" (the newest ``checkpoint-*`` in ``output_dir`` if any), a checkpoint path, or None.
        max_length: cut each example's prompt from the left to fit (target kept).
        trim_logits: compute logits only for the final positions that carry labels (left-padded batches).
        group_by_length: batches of similar lengths (HF's length-grouped sampler: shuffled groups of
            50 batches, sorted within), so less of each batch is padding; a faster epoch on the CPU.
        candidate_tokens: restrict the loss's softmax to these token ids (a verbalizer loss for
            classification: cross-entropy among the label words of all tasks, not the whole vocabulary);
            every labelled token must be one of them. None: the ordinary language-model loss.
        fsdp: passed to ``TrainingArguments.fsdp`` (e.g. "full_shard auto_wrap") for base models that do not
            fit one device; untested here (the CPU tests use DDP).
        optimizer: "adamw" or "sgd" (plain SGD: updates proportional to the gradient, used by the DDP test
            so that a wrongly scaled loss would show).
        progress: show the progress bar and log lines (main process only).
    """

    output_dir: str = "softprompt-run"
    max_steps: int = 60
    num_epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    task_lr: Dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    eval_steps: Optional[int] = None
    eval_batch_size: Optional[int] = None
    logging_steps: int = 10
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = 2
    resume: Optional[str] = "auto"
    max_length: Optional[int] = None
    trim_logits: bool = True
    group_by_length: bool = False
    candidate_tokens: Optional[Sequence[int]] = None
    fsdp: str = ""
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _precision_flags(precision: str) -> Tuple[bool, bool]:
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"TrainConfig: `precision` {precision!r} is invalid; expected auto, fp32, bf16 or fp16")
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return False, False
        return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
    if precision in ("bf16", "fp16") and not cuda:
        raise ValueError(f"TrainConfig: precision {precision!r} needs a GPU here; use fp32 (or auto) on the CPU")
    return precision == "bf16", precision == "fp16"


def _world() -> Tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class SoftPromptTrainer(Trainer):
        """``Trainer`` for a :class:`~softprompt.SoftPromptModel`: target-token loss normalised over the
        global batch, checkpoints holding only the prompt modules."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # count target tokens per (accumulated, all-process) batch and hand the count to compute_loss
            self.model_accepts_loss_kwargs = True
            self.candidates = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            keep = inputs.get("logits_to_keep")
            outputs = model(**inputs)
            logits = outputs["logits"]
            if keep is not None:
                labels = labels[:, labels.shape[1] - logits.shape[1]:]
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            if self.candidates is not None:
                cand = self.candidates.to(shift_logits.device)
                shift_logits = shift_logits.index_select(-1, cand)
                lookup = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=cand.device)
                lookup[cand] = torch.arange(cand.numel(), device=cand.device)
                mapped = lookup[shift_labels.clamp_min(0)]
                if bool(((mapped < 0) & (shift_labels != -100)).any()):
                    raise ValueError("TrainConfig: a labelled token is not among `candidate_tokens`")
                shift_labels = mapped.masked_fill(shift_labels == -100, -100)
            loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
            if num_items_in_batch is None:
                loss = loss_sum / (shift_labels != -100).sum().clamp_min(1)
            else:
                loss = loss_sum / num_items_in_batch
                if self.args.average_tokens_across_devices and self.model.training:
                    loss = loss * self.accelerator.num_processes    # DDP averages gradients over processes
            return (loss, outputs) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            if not self.args.should_save:
                return
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_prompts(self.accelerator.unwrap_model(self.model), resume_from_checkpoint)

    class LogLines(ProgressCallback):
        """Labelled progress bars (training, evaluation) with readable log lines instead of raw dicts."""

        def __init__(self, label: str = "training"):
            super().__init__()
            self.label = label

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True)
            self.current_step = 0

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            from tqdm.auto import tqdm
            if state.is_world_process_zero and self.prediction_bar is None and eval_dataloader is not None:
                try:
                    total = len(eval_dataloader)
                except TypeError:
                    total = None
                during = self.training_bar is not None
                self.prediction_bar = tqdm(total=total, desc="evaluating" if during else "final evaluation",
                                           unit="batch", leave=not during, dynamic_ncols=True)
            if self.prediction_bar is not None:
                self.prediction_bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval loss {:.4f}"),
                             ("learning_rate", "lr {:.2e}"), ("grad_norm", "grad norm {:.3f}")):
                if key in logs and logs[key] is not None:
                    parts.append(fmt.format(float(logs[key])))
            if "train_runtime" in logs:
                parts.append(f"done in {logs['train_runtime']:.1f} s")
            line = " | ".join(parts)
            if self.training_bar is not None:
                self.training_bar.write(line)
            else:
                print(line, flush=True)

    return SoftPromptTrainer, LogLines, ProgressCallback


def load_prompts(spm, directory) -> None:
    """Copy the prompt (and head) weights of a checkpoint into ``spm``'s existing tasks (resume)."""
    from ..methods import checkpoint
    modules, heads, _ = checkpoint.read_checkpoint(directory, spm.model, spm.geometry)
    with torch.no_grad():
        for name, module in modules:
            if name not in spm.prompts:
                raise ValueError(f"load_prompts: checkpoint {str(directory)!r} has task {name!r}, which the model lacks")
            spm.prompts[name].load_state_dict(module.state_dict())
        for head, state in heads.items():
            target = spm.model.get_submodule(head)
            for k, t in target.state_dict().items():
                t.copy_(state[k].to(t.dtype))


TaskSpec = Union[Tuple[Optional[MethodConfig], Sequence], Tuple[Optional[MethodConfig], Sequence, Sequence]]


def trainable_parameters(spm, name: str) -> int:
    return sum(p.numel() for p in spm.prompts[name].parameters() if p.requires_grad)


def train_tasks(spm, tasks: Dict[str, TaskSpec], args: Optional[TrainConfig] = None, tokenizer=None) -> dict:
    """Train the prompts of ``tasks`` together, in batches that mix them.

    Args:
        spm: a :class:`~softprompt.SoftPromptModel`.
        tasks: ``{name: (config, train_examples[, eval_examples])}``; a task missing from ``spm`` is
            added with ``config``; an existing one is trained as it is (``config`` may be None).
            Examples: see :mod:`softprompt.training.data`.
        args: :class:`TrainConfig`.
        tokenizer: for text examples (and its pad id).

    Returns a dict: ``steps``, ``seconds``, ``train_loss``, ``eval_loss`` (or None), ``examples`` per
    task, ``trainable_parameters`` per task, ``world_size``, ``output_dir``.
    """
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint, set_seed

    args = args or TrainConfig()
    if not tasks:
        raise ValueError("train_tasks: `tasks` is empty; give {name: (config, train_examples)}")
    set_seed(args.seed)
    train_sets, eval_sets = {}, {}
    for name, spec in tasks.items():
        if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
            raise ValueError(f"train_tasks: task {name!r}: expected (config, train_examples[, eval_examples])")
        config = spec[0]
        if name not in spm.tasks:
            if config is None:
                raise ValueError(f"train_tasks: task {name!r} is not in the model; give its method config")
            spm.add_task(name, config)
        train_sets[name] = spec[1]
        if len(spec) == 3 and spec[2]:
            eval_sets[name] = spec[2]
    unknown = set(args.task_lr) - set(tasks)
    if unknown:
        raise ValueError(f"TrainConfig: `task_lr` names tasks {sorted(unknown)} that are not being trained")
    # only the prompts being trained get gradients
    trained = set(tasks)
    for name, module in spm.prompts.items():
        for p in module.parameters():
            p.requires_grad_(name in trained)
    if args.gradient_checkpointing:
        deep = [n for n in trained if spm.prompts[n].kind == "deep"]
        if deep:
            raise ValueError(f"TrainConfig: gradient_checkpointing is not supported with deep-prompt tasks {deep} "
                             "(prefix tuning / P-tuning v2); train them without it")
        if hasattr(spm.model, "activation_checkpointing_enable"):
            spm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            spm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        spm.model.config.use_cache = False

    names = spm.tasks
    train_ds = MultiTaskDataset(train_sets, names, tokenizer, args.max_length)
    eval_ds = MultiTaskDataset(eval_sets, names, tokenizer, args.max_length) if eval_sets else None
    pad = getattr(tokenizer, "pad_token_id", None)
    collator = MultiTaskCollator(pad if pad is not None else 0, trim_logits=args.trim_logits)

    groups = []
    for name in names:
        params = [p for p in spm.prompts[name].parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": args.task_lr.get(name, args.learning_rate),
                           "weight_decay": args.weight_decay})
    heads = [p for h in spm.trainable_heads for p in spm.model.get_submodule(h).parameters() if p.requires_grad]
    if heads:
        groups.append({"params": heads, "lr": args.learning_rate, "weight_decay": args.weight_decay})
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        raise ValueError(f"TrainConfig: `optimizer` {args.optimizer!r} is invalid; expected 'adamw' or 'sgd'")

    bf16, fp16 = _precision_flags(args.precision)
    rank, world = _world()
    cuda = torch.cuda.is_available()
    steps = args.max_steps if args.max_steps and args.max_steps > 0 else -1
    save = bool(args.save_steps)
    evaluate = eval_ds is not None
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=steps, num_train_epochs=args.num_epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_steps=int(math.ceil(args.warmup_ratio * max(steps, 1))),
        lr_scheduler_type=args.lr_scheduler, max_grad_norm=args.max_grad_norm, seed=args.seed, data_seed=args.seed,
        bf16=bf16, fp16=fp16, use_cpu=not cuda,
        eval_strategy=("steps" if args.eval_steps else "no") if evaluate else "no",
        eval_steps=args.eval_steps or None, prediction_loss_only=True,
        save_strategy="steps" if save else "no", save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        logging_strategy="steps", logging_steps=max(1, args.logging_steps), logging_first_step=True,
        report_to=[], disable_tqdm=not args.progress, remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=cuda,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        ddp_backend=("nccl" if cuda else "gloo") if world > 1 else None,
        ddp_find_unused_parameters=True if world > 1 else None, ddp_broadcast_buffers=False,
        fsdp=args.fsdp or "",
    )
    Trainer, LogLines, ProgressCallback = _make_trainer_class()
    # Trainer checks the wrapped model's class for loss-related hooks; SoftPromptModel computes no loss itself
    trainer = Trainer(model=spm, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                      optimizers=(optimizer, None))
    if args.candidate_tokens is not None:
        trainer.candidates = torch.tensor(sorted(set(int(t) for t in args.candidate_tokens)), dtype=torch.long)
    trainer.remove_callback(ProgressCallback)
    if args.progress:
        listed = ", ".join(n for n in names if n in trained)
        trainer.add_callback(LogLines(label=f"training {listed if len(listed) <= 40 else f'{len(trained)} tasks'}"))
    resume = None
    if args.resume == "auto":
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    elif args.resume:
        resume = args.resume
    if rank == 0 and args.progress:
        counts = train_ds.counts()
        print(f"training {len(trained)} task(s) on {world} process(es): "
              + ", ".join(f"{n} ({spm.method_of(n)}, {counts[n]} examples, {trainable_parameters(spm, n):,} params)"
                          for n in names if n in trained)
              + f"; global batch {args.batch_size * args.gradient_accumulation_steps * world}"
              + (f"; resuming from {resume}" if resume else ""), flush=True)
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    eval_loss = None
    if evaluate:
        if rank == 0 and args.progress:
            print(f"final evaluation: loss on {len(eval_ds)} held-out examples", flush=True)
        eval_loss = float(trainer.evaluate()["eval_loss"])
    spm.eval()
    result = {"steps": int(trainer.state.global_step), "seconds": seconds,
              "train_loss": float(out.training_loss), "eval_loss": eval_loss,
              "examples": train_ds.counts(), "world_size": world, "output_dir": str(args.output_dir),
              "trainable_parameters": {n: trainable_parameters(spm, n) for n in names if n in trained},
              "resumed_from": resume}
    if trainer.args.should_save:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        spm.save(Path(args.output_dir) / "final")
        (Path(args.output_dir) / "train_result.json").write_text(json.dumps(result, indent=2))
    return result
