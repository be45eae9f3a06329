"""The prompt methods: each a config dataclass whose ``build`` makes the task's module.

* :class:`PrefixTuning` / :class:`PTuningV2`: deep prompts (per-layer prefix K/V).
* :class:`PromptTuning` / :class:`PTuningV1`: input-embedding soft tokens (P-tuning v1 placed by a template).
* :class:`HardPrompt`: a hand-written text whose K/V the frozen model computes once (:func:`text_prefix`).
"""
from .base import METHODS, DeepPrompt, Geometry, InputPrompt, MethodConfig, SoftPrompt, config_from_dict
from .hard_prompt import HardPrompt, TextPrefix, text_prefix
from .p_tuning import PromptEncoder, PTuningV1
from .prefix import PrefixEncoder, PrefixTuning, PTuningV2, flat_to_kv, kv_to_flat
from .prompt_tuning import PromptEmbedding, PromptTuning
from .template import parse_template

__all__ = ["PrefixTuning", "PTuningV2", "PromptTuning", "PTuningV1", "HardPrompt", "TextPrefix", "text_prefix",
           "MethodConfig", "SoftPrompt", "DeepPrompt",
           "InputPrompt", "Geometry", "METHODS", "config_from_dict", "PrefixEncoder", "PromptEmbedding",
           "PromptEncoder", "flat_to_kv", "kv_to_flat", "parse_template"]
