"""Prefix attention kernels: each task's prefix K/V read in place from a block pool.

``plan_prefix_attention`` validates a batch's metadata once and returns a plan whose ``run`` serves
every layer; ``prefix_attention`` is plan + run in one call. ``available_backends(device)`` says
what runs where. This package depends on torch (and optionally triton) only, never on transformers.
"""
from .api import plan_for_layer, prefix_attention
from .backends import BACKENDS, available_backends
from .inputs import PrefixAttentionInputs, validate_inputs
from .plan import PrefixAttentionPlan, plan_prefix_attention

__all__ = ["prefix_attention", "plan_prefix_attention", "plan_for_layer", "PrefixAttentionPlan", "available_backends", "BACKENDS",
           "PrefixAttentionInputs", "validate_inputs"]
