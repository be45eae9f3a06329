"""One training loop and one evaluation for every learner of the study, so that all methods see
the same batches (a seed fixes the order) and the same optimizer and schedule: AdamW, linear
warm-up then linear decay, gradient clipping at 1.0, cross-entropy over the class logits."""
from __future__ import annotations

import math
import random
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .learners import Learner

Example = Tuple[str, int]


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> List[List[int]]:
    """``steps`` batches of row indices: a fresh shuffle of ``range(n)`` per epoch, fixed by ``seed``."""
    if n < batch_size:
        raise ValueError(f"batch_order: {n} training rows are fewer than `batch_size` {batch_size}")
    rng = random.Random(seed)
    batches, pool = [], []
    while len(batches) < steps:
        if len(pool) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            pool = fresh
        batches.append(pool[:batch_size])
        pool = pool[batch_size:]
    return batches


def lr_at(step: int, steps: int, warmup: int) -> float:
    """The schedule's multiplier at optimizer step ``step`` (0-based): linear warm-up, linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


class SavedActivations:
    """Bytes of the tensors autograd keeps for the backward during a forward (activation memory)."""

    def __init__(self):
        self.bytes = 0
        self._seen: set = set()

    def pack(self, t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in self._seen and not isinstance(t, torch.nn.Parameter):
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def train(learner: Learner, examples: Sequence[Example], steps: int, batch_size: int, lr: float,
          warmup_ratio: float, seed: int, weight_decay: float = 0.0, log=None) -> Dict[str, float]:
    """Train ``learner`` for ``steps`` optimizer steps; returns losses, step time and memory."""
    groups = learner.param_groups(lr)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("train: the learner has no trainable parameters")
    opt = torch.optim.AdamW([dict(g, peak_lr=g["lr"]) for g in groups], lr=lr, weight_decay=weight_decay)
    warmup = int(math.ceil(warmup_ratio * steps))
    learner.module.train()
    times, losses, act = [], [], SavedActivations()
    for step, idx in enumerate(batch_order(len(examples), steps, batch_size, seed)):
        for group in opt.param_groups:                 # one schedule, each group at its own peak
            group["lr"] = group["peak_lr"] * lr_at(step, steps, warmup)
        texts = [examples[i][0] for i in idx]
        labels = torch.tensor([examples[i][1] for i in idx])
        start = time.perf_counter()
        if step == 0:
            with act.hooks():
                loss = F.cross_entropy(learner.class_logits(texts), labels)
        else:
            loss = F.cross_entropy(learner.class_logits(texts), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if log is not None and (step % max(1, steps // 5) == 0 or step == steps - 1):
            log(f"  step {step + 1}/{steps} loss {losses[-1]:.4f}")
    learner.module.eval()
    n_params = sum(p.numel() for p in params)
    # fp32 weights + gradients + AdamW's two moments for what trains, plus the forward's saved activations
    state = 4 * sum(p.numel() * p.element_size() for p in params)
    return {"steps": steps, "trainable_params": n_params, "step_seconds": statistics.median(times),
            "train_seconds": sum(times), "first_loss": losses[0],
            "last_loss": statistics.fmean(losses[-max(1, steps // 5):]),
            "activation_mb": act.bytes / 2**20, "train_memory_mb": (act.bytes + state) / 2**20}


@torch.no_grad()
def evaluate(learner: Learner, examples: Sequence[Example], batch_size: int = 16) -> Dict[str, float]:
    """Accuracy of ``learner`` on ``examples`` (rows sorted by length into batches)."""
    learner.module.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    correct = 0
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        pred = learner.class_logits([examples[j][0] for j in idx]).argmax(-1)
        correct += int((pred == torch.tensor([examples[j][1] for j in idx])).sum())
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples)}
