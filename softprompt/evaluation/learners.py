"""What the study trains, behind one interface: a :class:`Learner` turns a batch of examples into
class logits and names its trainable parameters and its per-task storage.

* decoder LMs (SmolLM2): the row ``"Tweet: {text}\\nAnswer:"`` is left-padded and the next-token
  logits are read at the last position; a class scores the best of its label word's single-token
  surface forms (the same verbalizer as the hand-written prompts);
* encoders (MiniLM): ``[CLS] text [SEP]`` right-padded into a sequence-classification model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from torch import nn

from . import label_token_sets


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Learner:
    """Base: ``module`` (train/eval switches), ``parameters()``, ``class_logits(rows)``, ``storage_bytes()``."""

    module: nn.Module

    def parameters(self) -> List[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def class_logits(self, rows: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def storage_bytes(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the learner added to shared models."""


class LMRows:
    """Tokenizes rows for a decoder LM and reads class scores from the last position's logits."""

    def __init__(self, tokenizer, row: str, labels: Sequence[str]):
        self.tok, self.row = tokenizer, row
        self.sets = [torch.tensor(s) for s in label_token_sets(tokenizer, labels)]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tok(self.row.format(text=t), add_special_tokens=False)["input_ids"] for t in texts]
        S = max(len(r) for r in ids)
        out = torch.full((len(ids), S), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), S), dtype=torch.long)
        for b, r in enumerate(ids):
            out[b, S - len(r):] = torch.tensor(r)
            mask[b, S - len(r):] = 1
        return out, mask

    def scores(self, last: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` next-token logits -> ``[B, C]``: each class's best surface form."""
        return torch.stack([last[:, s].amax(-1) for s in self.sets], -1).float()


class _SoftPromptTask(Learner):
    """A learner that is one task of a shared ``SoftPromptModel`` (``self.spm``, ``self.name``):
    storage is that task's saved checkpoint; closing removes the task."""

    def storage_bytes(self):
        with tempfile.TemporaryDirectory() as d:
            self.spm.save(d, tasks=[self.name])
            return _folder_bytes(Path(d))

    def close(self):
        self.spm.remove_task(self.name)


class SoftPromptLM(_SoftPromptTask):
    """A soft-prompt task of a shared :class:`~softprompt.SoftPromptModel` (added here, removed by ``close``)."""

    def __init__(self, spm, name: str, config, rows: LMRows, init_kv_text: str = ""):
        self.spm, self.name, self.rows, self.module = spm, name, rows, spm
        spm.add_task(name, config)
        if init_kv_text:
            from ..demo_real import init_deep_from_text
            init_deep_from_text(spm, name, rows.tok(init_kv_text, add_special_tokens=False)["input_ids"])

    def parameters(self):
        return [p for p in self.spm.prompts[self.name].parameters() if p.requires_grad]

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        out = self.spm(input_ids=ids, attention_mask=mask, tasks=self.name, logits_to_keep=1)
        return self.rows.scores(out["logits"][:, -1])


class PlainLM(Learner):
    """A decoder LM trained directly: LoRA adapters (``peft``) or every weight (full fine-tuning)."""

    def __init__(self, model: nn.Module, rows: LMRows, kind: str):
        self.module, self.rows, self.kind = model, rows, kind

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.module(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
        return self.rows.scores(out["logits"][:, -1])

    def storage_bytes(self):
        return _trainable_bytes(self.module)


def _trainable_bytes(module: nn.Module) -> int:
    """What a task must store: its trainable tensors at their dtype (fp32 here)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


class EncoderRows:
    """``[CLS] text [SEP]`` rows for a sequence-classification encoder, right-padded."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tok, self.max_length = tokenizer, max_length

    def batch(self, texts):
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]


class SoftPromptEncoder(_SoftPromptTask):
    """P-tuning v2 on an encoder with its classification head trained (``trainable_heads``)."""

    def __init__(self, spm, name: str, config, rows: EncoderRows, heads=("classifier",)):
        self.spm, self.name, self.rows, self.module, self.heads = spm, name, rows, spm, tuple(heads)
        spm.add_task(name, config)

    def parameters(self):
        heads = [p for h in self.heads for p in self.spm.model.get_submodule(h).parameters()]
        return [p for p in self.spm.prompts[self.name].parameters() if p.requires_grad] + heads

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        return self.spm(input_ids=ids, attention_mask=mask, tasks=self.name)["logits"].float()


class PlainEncoder(Learner):
    """A sequence-classification encoder fine-tuned in full (every weight and the head)."""

    def __init__(self, model: nn.Module, rows: EncoderRows):
        self.module, self.rows = model, rows

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        return self.module(input_ids=ids, attention_mask=mask)["logits"].float()

    def storage_bytes(self):
        return _trainable_bytes(self.module)

