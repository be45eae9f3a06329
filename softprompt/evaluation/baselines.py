"""The fine-tuning baselines the soft prompts are compared with: LoRA adapters through ``peft`` and
full fine-tuning, on a fresh copy of the base model each run."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.05,
         target_modules: Sequence[str] = ("q_proj", "v_proj")) -> nn.Module:
    """``model`` with LoRA adapters of rank ``r`` on ``target_modules`` (only the adapters train)."""
    from peft import LoraConfig, get_peft_model
    if r <= 0:
        raise ValueError(f"lora: `r` is {r}; expected a positive rank")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    return get_peft_model(model, config)


def full(model: nn.Module) -> nn.Module:
    """``model`` with every weight trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model
