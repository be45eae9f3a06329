"""softprompt: soft prompts (prefix tuning, P-tuning v1/v2, prompt tuning) with prefix attention kernels.

The public names below load on first use, so ``import softprompt`` (and ``softprompt --version``)
imports neither torch nor transformers; ``softprompt.kernels`` needs torch only.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "PrefixStore": ".store",
    "attach": ".integration", "detach": ".integration",
    "Engine": ".engine", "SamplingParams": ".engine",
    "SoftPromptModel": ".model",
    "PrefixTuning": ".methods", "PTuningV2": ".methods", "PromptTuning": ".methods", "PTuningV1": ".methods",
    "HardPrompt": ".methods",
    "list_tasks": ".adapters",
}

_SUBMODULES = ("kernels", "store", "integration", "engine", "methods", "model", "training", "evaluation",
               "tasks", "data", "peft_io", "assets", "baselines", "benchmarks", "adapters", "server")

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value                 # later lookups skip this function
        return value
    if name in _SUBMODULES:                     # softprompt.integration etc. without importing it first
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
