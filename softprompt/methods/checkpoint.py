"""Saving and loading a SoftPromptModel's tasks: one JSON config + one safetensors file.

Layout of a checkpoint folder::

    softprompt.json          {"format": "softprompt", "version": 1, "geometry": {...},
                              "tasks": [{"name", "method", "config", "structure"}, ...],
                              "heads": [...], "weights": "softprompt.safetensors",
                              "weights_sha256": "..."}
    softprompt.safetensors   "tasks.<name>.<param>" (full training state: MLP / LSTM included),
                             "heads.<module path>.<param>" (the trainable heads)

Both files are written atomically (temp file in the same folder, fsync, ``os.replace``); the
weights first, then the JSON that names their checksum, so a reader never sees a half-written
checkpoint as valid. Reading validates everything (format, checksum, geometry, every tensor's
shape) before anything is changed. Never pickle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from .base import Geometry, MethodConfig, SoftPrompt, config_from_dict

FORMAT = "softprompt"
VERSION = 1
CONFIG_NAME = "softprompt.json"
WEIGHTS_NAME = "softprompt.safetensors"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_save(directory, meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    meta = dict(meta, weights=WEIGHTS_NAME, weights_sha256=hashlib.sha256(blob).hexdigest())
    _atomic_write(directory / WEIGHTS_NAME, blob)
    _atomic_write(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())


def task_config_for_load(method: str, data: dict) -> MethodConfig:
    """A saved config; an init that needs a tokenizer is not re-run (the weights overwrite it)."""
    data = dict(data)
    init = data.get("init")
    if method in ("prompt_tuning", "p_tuning_v1") and init == "text":
        data["init"] = "random"
        cfg = config_from_dict(method, data)
        cfg.init = init
        return cfg
    return config_from_dict(method, data)


def _bad(path, why: str) -> ValueError:
    return ValueError(f"softprompt checkpoint {str(path)!r} is invalid: {why}")


def read_checkpoint(directory, model: nn.Module, geometry: Geometry
                    ) -> Tuple[List[Tuple[str, SoftPrompt]], Dict[str, Dict[str, torch.Tensor]], dict]:
    """Read and fully validate a checkpoint against ``model``; changes nothing.

    Returns ``([(name, module)], {head: state_dict}, meta)``; modules are built and loaded on the CPU.
    """
    from safetensors.torch import load
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise _bad(directory, f"{CONFIG_NAME} is missing")
    try:
        meta = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(cfg_path, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(cfg_path, f"`format` is {meta.get('format') if isinstance(meta, dict) else None!r}; expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise _bad(cfg_path, f"`version` {meta.get('version')!r} is not supported; expected {VERSION}")
    saved = meta.get("geometry") or {}
    mine = geometry.to_dict()
    for key in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
        if saved.get(key) != mine[key]:
            raise ValueError(f"softprompt checkpoint {str(directory)!r} does not fit the model: {key} is "
                             f"{saved.get(key)!r} in the checkpoint but {mine[key]} in the model "
                             f"({mine['model_type']})")
    if not w_path.is_file():
        raise _bad(directory, f"{WEIGHTS_NAME} is missing")
    blob = w_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise _bad(w_path, "its checksum does not match softprompt.json (truncated, modified or from another save)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise _bad(w_path, f"not a readable safetensors file ({e})") from None

    modules: List[Tuple[str, SoftPrompt]] = []
    seen = set()
    for entry in meta.get("tasks", []):
        name, method = entry.get("name"), entry.get("method")
        if not isinstance(name, str) or name in seen:
            raise _bad(cfg_path, f"task name {name!r} is missing or repeated")
        seen.add(name)
        cfg = task_config_for_load(method, entry.get("config", {}))
        # text inits need the model's word embeddings; the saved weights replace any init anyway
        build_cfg = dataclasses.replace(cfg, init="random") if cfg.method in ("prompt_tuning", "p_tuning_v1") else cfg
        module = build_cfg.build(geometry, None)
        module.config = cfg
        if hasattr(module, "apply_structure"):
            module.apply_structure(entry.get("structure", {}))
        prefix = f"tasks.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _load_state(module, state, f"task {name!r}", w_path)
        modules.append((name, module))

    heads: Dict[str, Dict[str, torch.Tensor]] = {}
    for head in meta.get("heads", []):
        try:
            target = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"softprompt checkpoint {str(directory)!r} does not fit the model: it has no head "
                             f"module {head!r}") from None
        prefix = f"heads.{head}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        want = target.state_dict()
        if set(state) != set(want):
            raise _bad(w_path, f"head {head!r} has tensors {sorted(state)}; the model's has {sorted(want)}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(want[k].shape):
                raise ValueError(f"softprompt checkpoint {str(directory)!r} does not fit the model: head "
                                 f"{head}.{k} has shape {tuple(v.shape)}; the model's is {tuple(want[k].shape)}")
        heads[head] = state
    return modules, heads, meta


def _load_state(module: nn.Module, state: Dict[str, torch.Tensor], what: str, path) -> None:
    want = module.state_dict()
    if set(state) != set(want):
        raise _bad(path, f"{what} has tensors {sorted(state)}; its method needs {sorted(want)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise _bad(path, f"{what} tensor {k!r} has shape {tuple(v.shape)}; expected {tuple(want[k].shape)}")
        if v.dtype.is_floating_point and not torch.isfinite(v).all():
            raise _bad(path, f"{what} tensor {k!r} contains NaN or inf")
    module.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()}, strict=True)
