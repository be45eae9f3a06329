"""Training data for soft prompts: tokenized examples of several tasks in one dataset, and a
collator that makes batches mixing tasks.

An example is a prompt and a target (the tokens the loss is taken on), either as text
(``("I loved it", " positive")`` or ``{"prompt": ..., "target": ...}``, tokenized with the
model's tokenizer) or already tokenized (``{"input_ids": [...], "labels": [...]}`` with -100 on
positions that carry no loss, or ``{"prompt_ids": [...], "target_ids": [...]}``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset


def tokenize_example(example, tokenizer=None, max_length: Optional[int] = None) -> Dict[str, List[int]]:
    """One example -> ``{"input_ids", "labels"}`` (lists of ints, labels -100 on the prompt)."""
    if isinstance(example, dict) and "input_ids" in example:
        ids = [int(i) for i in example["input_ids"]]
        labels = [int(i) for i in example.get("labels", ids)]
        if len(labels) != len(ids):
            raise ValueError(f"training example: `labels` has {len(labels)} entries for {len(ids)} input_ids")
    else:
        if isinstance(example, dict) and "prompt_ids" in example:
            prompt, target = list(example["prompt_ids"]), list(example["target_ids"])
        else:
            if isinstance(example, dict):
                text, tgt = example.get("prompt"), example.get("target")
            elif isinstance(example, (tuple, list)) and len(example) == 2:
                text, tgt = example
            else:
                raise ValueError(f"training example {example!r:.80} is invalid; expected (prompt, target), "
                                 "{'prompt', 'target'}, {'input_ids', 'labels'} or {'prompt_ids', 'target_ids'}")
            if tokenizer is None:
                raise ValueError("training example: text examples need a tokenizer")
            prompt = tokenizer(str(text), add_special_tokens=False)["input_ids"]
            target = tokenizer(str(tgt), add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"training example {example!r:.80} has an empty target")
        if max_length is not None and len(prompt) + len(target) > max_length:
            prompt = prompt[len(prompt) + len(target) - max_length:]      # keep the end next to the target
        ids = [int(i) for i in prompt] + [int(i) for i in target]
        labels = [-100] * len(prompt) + [int(i) for i in target]
    if not any(lab != -100 for lab in labels[1:]):
        raise ValueError("training example: no labelled position after the first token (give a non-empty prompt)")
    return {"input_ids": ids, "labels": labels}


class MultiTaskDataset(Dataset):
    """The examples of several tasks in one map-style dataset; each item carries its task index
    (the task's position in ``task_names``, which must be the order of ``SoftPromptModel.tasks``)."""

    def __init__(self, task_examples: Dict[str, Sequence], task_names: Sequence[str], tokenizer=None,
                 max_length: Optional[int] = None):
        self.task_names = list(task_names)
        self.items: List[dict] = []
        for name, examples in task_examples.items():
            if name not in self.task_names:
                raise ValueError(f"MultiTaskDataset: task {name!r} is not one of {self.task_names}")
            tid = self.task_names.index(name)
            for ex in examples:
                item = tokenize_example(ex, tokenizer, max_length)
                item["task_ids"] = tid
                self.items.append(item)
        if not self.items:
            raise ValueError("MultiTaskDataset: no examples")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def counts(self) -> Dict[str, int]:
        out = {n: 0 for n in self.task_names}
        for it in self.items:
            out[self.task_names[it["task_ids"]]] += 1
        return out


class MultiTaskCollator:
    """Left-pads a list of items into ``input_ids, attention_mask, labels, task_ids`` tensors.

    Left padding puts every row's last token at the end, so when all labels sit in the last few
    positions (classification targets) only those logits are computed: the batch also carries
    ``logits_to_keep`` (the number of final positions whose logits the loss needs) when
    ``trim_logits`` is on.
    """

    def __init__(self, pad_token_id: int = 0, trim_logits: bool = True):
        self.pad_token_id = int(pad_token_id)
        self.trim_logits = trim_logits

    def __call__(self, items: List[dict]) -> dict:
        # With trimmed logits, one extra pad column on the left of every row keeps rows right-aligned
        # even where input-level soft tokens are spliced in (SoftPromptModel aligns spliced rows to
        # the side the batch is padded on).
        S = max(len(it["input_ids"]) for it in items) + (1 if self.trim_logits else 0)
        B = len(items)
        ids = torch.full((B, S), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            ids[b, S - n:] = torch.tensor(it["input_ids"])
            mask[b, S - n:] = 1
            labels[b, S - n:] = torch.tensor(it["labels"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "task_ids": torch.tensor([it["task_ids"] for it in items], dtype=torch.long)}
        if self.trim_logits:
            cols = (labels != -100).any(0).nonzero().flatten()
            first = int(cols[0]) if cols.numel() else S - 1
            batch["logits_to_keep"] = S - max(first - 1, 0)      # logits at first-1 .. S-1
        return batch
