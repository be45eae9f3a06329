"""Verbalizer evaluation of hard (hand-written) and soft prompts on a held-out split.

Every prompt becomes a task of the same :class:`~softprompt.SoftPromptModel`: a soft prompt is a
trained task; a hard prompt's shared text before the example is a prompt-tuning task whose soft
tokens are exactly the word embeddings of that text (so, compiled for inference, it is the K/V the
model computes for the text: the hand-written prompt, run once). Rows of all prompts are batched
together (mixed tasks), sorted by length, and only the last position's logits are computed; the
predicted class is the label whose verbalizer token scores highest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..methods import PromptTuning


def label_token_sets(tokenizer, words: Sequence[str]) -> List[List[int]]:
    """Per label, the ids of its single-token surface forms (``" w"``, ``"w"``, capitalised)."""
    out = []
    for w in words:
        ids = set()
        for form in (" " + w, w, " " + w.capitalize(), w.capitalize(), " " + w.lower(), w.lower()):
            toks = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.add(int(toks[0]))
        if not ids:
            raise ValueError(f"verbalizer: label word {w!r} has no single-token form")
        out.append(sorted(ids))
    flat = [i for s in out for i in s]
    if len(flat) != len(set(flat)):
        raise ValueError(f"verbalizer: label words {list(words)} share a token")
    return out


@dataclass
class PromptSpec:
    """One prompt to evaluate: ``task`` names a task of the model (a soft prompt) or is None with
    ``prefix`` text (a hard prompt, added for the evaluation and removed after)."""

    name: str
    row: str
    task: Optional[str] = None
    prefix: str = ""


@torch.no_grad()
def evaluate_prompts(spm, tokenizer, prompts: Sequence[PromptSpec], examples: Sequence[Tuple[str, int]],
                     words: Sequence[str], batch_size: int = 16, progress=None) -> Dict[str, dict]:
    """Accuracy of each prompt on ``examples`` (``(text, label)``). Returns
    ``{prompt name: {"accuracy", "correct", "n", "seconds", "predictions"}}``."""
    tokens = label_token_sets(tokenizer, words)
    added = []
    was_training = spm.training
    spm.eval()
    try:
        rows = []                                   # (prompt index, example index, ids)
        task_of = []
        for pi, p in enumerate(prompts):
            task = p.task
            if task is None:
                ids = tokenizer(p.prefix, add_special_tokens=False)["input_ids"]
                task = f"hard{pi}"
                while task in spm.tasks:
                    task += "_"
                spm.add_task(task, PromptTuning(num_virtual_tokens=len(ids), init="text", init_text=ids))
                added.append(task)
            task_of.append(task)
            for ei, (text, _) in enumerate(examples):
                rows.append((pi, ei, tokenizer(p.row.format(text=text), add_special_tokens=False)["input_ids"]))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores = {}
        seconds = {pi: 0.0 for pi in range(len(prompts))}
        spm.sync(task_of)                          # compile every prompt once (K/V of its prefix)
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        it = progress(batches) if progress is not None else batches
        for batch in it:
            S = max(len(rows[i][2]) for i in batch)
            ids = torch.full((len(batch), S), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), S), dtype=torch.long)
            for b, i in enumerate(batch):
                r = rows[i][2]
                ids[b, S - len(r):] = torch.tensor(r)
                mask[b, S - len(r):] = 1
            start = time.perf_counter()
            logits = spm(input_ids=ids, attention_mask=mask, tasks=[task_of[rows[i][0]] for i in batch],
                         logits_to_keep=1)["logits"][:, -1].float()
            elapsed = time.perf_counter() - start
            for b, i in enumerate(batch):
                pi, ei, _ = rows[i]
                scores[(pi, ei)] = [float(logits[b, t].max()) for t in [torch.tensor(s) for s in tokens]]
                seconds[pi] += elapsed / len(batch)
        out = {}
        for pi, p in enumerate(prompts):
            preds = [max(range(len(words)), key=lambda c: scores[(pi, ei)][c]) for ei in range(len(examples))]
            correct = sum(int(pr == y) for pr, (_, y) in zip(preds, examples))
            out[p.name] = {"accuracy": correct / len(examples), "correct": correct, "n": len(examples),
                           "seconds": seconds[pi], "predictions": preds}
        return out
    finally:
        for task in added:
            spm.remove_task(task)
        spm.train(was_training)
