"""Sweeps per benchmark and preset. Each benchmark has a prefix-length sweep and a batch sweep.

CPU presets together finish in under 10 minutes on 2 cores; GPU presets are sized for one H200
(the issue's target shapes included) to fit in about 8 minutes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

from .suite import Shape

_BASE = {
    "cpu": {
        "kernels": Shape(B=8, T=4, P=256, Sq=128, Skv=128, Hq=8, Hkv=2, D=64),
        "decode": Shape(B=64, T=4, P=1024, Sq=1, Skv=64, Hq=8, Hkv=2, D=64),
        "train": Shape(B=8, T=4, P=128, Sq=128, Skv=128, Hq=8, Hkv=2, D=64, train=True),
    },
    "gpu": {
        "kernels": Shape(B=32, T=4, P=128, Sq=1024, Skv=1024, Hq=32, Hkv=8, D=128, dtype="bf16"),
        "decode": Shape(B=256, T=8, P=2048, Sq=1, Skv=256, Hq=32, Hkv=8, D=128, dtype="bf16"),
        "train": Shape(B=32, T=4, P=128, Sq=1024, Skv=1024, Hq=32, Hkv=8, D=128, dtype="bf16", train=True),
    },
}
_PREFIXES = {
    "cpu": {"kernels": [32, 128, 512, 1024], "decode": [128, 512, 1024, 2048], "train": [32, 128, 512]},
    "gpu": {"kernels": [128, 512, 2048], "decode": [512, 2048, 8192], "train": [128, 512, 2048]},
}
_BATCHES = {
    "cpu": {"kernels": [4, 16, 32], "decode": [16, 64, 256], "train": [4, 16]},
    "gpu": {"kernels": [8, 32], "decode": [64, 256, 1024], "train": [8, 32]},
}


def sweeps(bench: str, preset: str) -> Dict[str, List[Shape]]:
    """``{"prefix": [...], "batch": [...], ("own task" for decode)}`` shapes of one benchmark."""
    base = _BASE[preset][bench]
    out = {
        "prefix": [replace(base, P=p) for p in _PREFIXES[preset][bench]],
        "batch": [replace(base, B=b) for b in _BATCHES[preset][bench]],
    }
    if bench == "decode":
        # nothing shared: every sequence its own task (the grouping must not slow this down)
        out["own task"] = [replace(base, T=base.B)]
    return out


METHODS = {
    "cpu": ["torch", "reference", "sdpa_concat"],
    "gpu": ["triton", "torch", "reference", "sdpa_concat", "flex_packed", "flashinfer"],
}
