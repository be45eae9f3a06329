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
from typing import List, Optional, Sequence, Tuple

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

    def param_groups(self, lr: float) -> List[dict]:
        """Optimizer groups with their peak learning rates (one group at ``lr`` unless a learner splits)."""
        return [{"params": self.parameters(), "lr": lr}]

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
    storage is that task's saved checkpoint; closing removes the task. What trains is the task's prompt
    and, where a subclass has one, a classification head at its own peak ``head_lr`` (``None``: ``lr``)."""

    head_lr: Optional[float] = None

    def _prompt_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.spm.prompts[self.name].parameters() if p.requires_grad]

    def _head_parameters(self) -> List[nn.Parameter]:
        return []

    def parameters(self):
        return self._prompt_parameters() + self._head_parameters()

    def param_groups(self, lr):
        """The prompt at ``lr``; the head, if any, at ``head_lr`` (a linear head wants a smaller step
        than a prefix)."""
        groups = [{"params": self._prompt_parameters(), "lr": lr}]
        head = self._head_parameters()
        if head:
            groups.append({"params": head, "lr": lr if self.head_lr is None else self.head_lr})
        return groups

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

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        out = self.spm(input_ids=ids, attention_mask=mask, tasks=self.name, logits_to_keep=1)
        return self.rows.scores(out["logits"][:, -1])


class SoftPromptLMClassifier(SoftPromptLM):
    """A soft-prompt task with a classification head, as in the P-tuning v2 paper: a linear layer over the
    last position's final hidden state (what the LM head reads), trained with the prompt.

    The head starts as the verbalizer: its rows are the output embeddings of the label words (the mean
    of each label's surface forms), so before training it scores like the label-word readout and training
    moves the classes apart from there instead of from noise. ``head_lr``: its own peak learning rate."""

    def __init__(self, spm, name: str, config, rows: LMRows, init_kv_text: str = "",
                 head_lr: Optional[float] = None):
        super().__init__(spm, name, config, rows, init_kv_text)
        self.lm_head = spm.model.get_output_embeddings()
        rows_init = torch.stack([self.lm_head.weight[s].mean(0) for s in rows.sets]).detach()
        self.head = nn.Linear(rows_init.shape[1], len(rows.sets))
        with torch.no_grad():
            self.head.weight.copy_(rows_init)
            self.head.bias.zero_()
        self.head_lr = head_lr

    def _head_parameters(self):
        return list(self.head.parameters())

    def class_logits(self, texts):
        from ..fused_loss import captured_hidden_states
        ids, mask = self.rows.batch(texts)
        # the LM head's input is the final (normed) hidden state in every family; the recorder that
        # stands in for the head during the forward also spares the vocabulary product
        with captured_hidden_states(self.spm.model, self.lm_head) as capture:
            self.spm(input_ids=ids, attention_mask=mask, tasks=self.name, logits_to_keep=1)
        return self.head(capture.seen[0][:, -1]).float()

    def storage_bytes(self):
        return super().storage_bytes() + _trainable_bytes(self.head)


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


def encoder_logits(model: nn.Module, call, ids, mask, pooling: str) -> torch.Tensor:
    """Class logits of a BERT-style sequence-classification ``model`` run through ``call``.

    ``"cls"``: the model's own head (pooler: dense + tanh over [CLS], then dropout and classifier).
    ``"mean"``: the mean of the tokens' last hidden states, then the model's dropout and classifier; this
    is how all-MiniLM-L6-v2 was trained to embed a sentence (its pooler never trained)."""
    if pooling == "cls":
        return call(input_ids=ids, attention_mask=mask)["logits"].float()
    if pooling != "mean":
        raise ValueError(f"encoder pooling {pooling!r} is unknown; expected 'cls' or 'mean'")
    hidden = call(input_ids=ids, attention_mask=mask, output_hidden_states=True)["hidden_states"][-1]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
    return model.classifier(model.dropout(pooled)).float()


class EncoderRows:
    """``[CLS] text [SEP]`` rows for a sequence-classification encoder, right-padded."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tok, self.max_length = tokenizer, max_length

    def batch(self, texts):
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]


class SoftPromptEncoder(_SoftPromptTask):
    """P-tuning v2 on an encoder with its classification head trained (``trainable_heads``)."""

    def __init__(self, spm, name: str, config, rows: EncoderRows, heads=("classifier",), pooling: str = "cls",
                 head_lr: Optional[float] = None):
        self.spm, self.name, self.rows, self.module, self.heads = spm, name, rows, spm, tuple(heads)
        self.pooling, self.head_lr = pooling, head_lr
        spm.add_task(name, config)

    def _head_parameters(self):
        return [p for h in self.heads for p in self.spm.model.get_submodule(h).parameters()]

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        return encoder_logits(self.spm.model, lambda **kw: self.spm(tasks=self.name, **kw), ids, mask, self.pooling)


class PlainEncoder(Learner):
    """A sequence-classification encoder fine-tuned in full (every weight and the head)."""

    def __init__(self, model: nn.Module, rows: EncoderRows, pooling: str = "cls"):
        self.module, self.rows, self.pooling = model, rows, pooling

    def class_logits(self, texts):
        ids, mask = self.rows.batch(texts)
        return encoder_logits(self.module, self.module, ids, mask, self.pooling)

    def storage_bytes(self):
        return _trainable_bytes(self.module)

