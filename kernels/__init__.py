"""Prefix attention kernels: each task's prefix K/V read in place from a block pool.

``prefix_attention`` is the one entry point; ``available_backends(device)`` says what runs where.
This package depends on torch (and optionally triton) only, never on transformers.
"""
from .api import prefix_attention
from .backends import BACKENDS, available_backends
from .inputs import PrefixAttentionInputs, validate_inputs

__all__ = ["prefix_attention", "available_backends", "BACKENDS", "PrefixAttentionInputs", "validate_inputs"]
