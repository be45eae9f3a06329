"""Saving and loading a SoftPromptModel's tasks: a JSON manifest naming one safetensors file.

Layout of a checkpoint folder::

    softprompt.json                      the manifest: {"format": "softprompt", "version": 2,
                                         "geometry": {...}, "model_class": ...,
                                         "tasks": [{"name", "method", "config", "structure"}, ...],
                                         "heads": [...], "weights": "softprompt-<hash>.safetensors",
                                         "weights_sha256": "...", "sha256": "..."}
    softprompt-<hash>.safetensors        "tasks.<name>.<param>" (full training state: MLP / LSTM
                                         included), "heads.<module path>.<param>" (trainable heads)

A hard-prompt task (``HardPrompt``) has no tensors: its manifest entry keeps the text, its token
ids and the tokenizer's name, and its K/V are recomputed from the token ids when it is loaded
(one forward over the text; exact for the model it is loaded into, whatever its dtype or device).

A save is all-or-nothing: the weights go to a new file named by their checksum (written to a
temporary, fsync'd, renamed), then the manifest is replaced with one rename (fsync'd, and the
folder too). That rename is the only switch, so after a crash at any instant the folder holds the
complete old save or the complete new one; the next save removes what a killed save left
(temporaries, unreferenced weights). ``sha256`` covers the manifest itself (and through
``weights_sha256`` the weights). One writer per folder; readers may run alongside.

Reading validates everything before anything is allocated or changed: format, both checksums,
the geometry against the model, and every tensor's shape against what the saved configs need.
Version 1 folders (``softprompt.json`` + ``softprompt.safetensors``, no manifest checksum) still
load. Never pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .base import METHODS, Geometry, MethodConfig, SoftPrompt, config_from_dict

FORMAT = "softprompt"
VERSION = 2
CONFIG_NAME = "softprompt.json"
LEGACY_WEIGHTS_NAME = "softprompt.safetensors"          # version 1
_WEIGHTS = re.compile(r"softprompt-[0-9a-f]{16}\.safetensors")
_TEMP = re.compile(r"\.softprompt[-.].*\.tmp")
_GEOMETRY_KEYS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: temp file in the same folder, fsync, rename, fsync the folder."""
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
    _fsync_dir(path.parent)


def _remove_stale(directory: Path, keep: Optional[str] = None) -> None:
    """Remove what earlier (killed) saves left: temporaries and, with ``keep`` given (the weights the
    manifest now names), every other weights file of this layout."""
    for entry in directory.iterdir():
        name = entry.name
        stale = _TEMP.fullmatch(name) or (keep is not None and name != keep and
                                          (_WEIGHTS.fullmatch(name) or name == LEGACY_WEIGHTS_NAME))
        if stale and entry.is_file():
            try:
                entry.unlink()
            except OSError:
                pass


def _digest(meta: dict) -> str:
    """Checksum of the manifest's content (key order and whitespace do not matter)."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_save(directory, meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Write a checkpoint all-or-nothing (see the module docstring)."""
    from safetensors.torch import save
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory)
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    sha = hashlib.sha256(blob).hexdigest()
    weights = f"softprompt-{sha[:16]}.safetensors"
    _atomic_write(directory / weights, blob)
    meta = dict(meta, format=FORMAT, version=VERSION, weights=weights, weights_sha256=sha)
    meta["sha256"] = _digest(meta)
    _atomic_write(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())   # the switch
    _remove_stale(directory, keep=weights)


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


def _as_dir(directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"softprompt checkpoint: `directory` of type {type(directory).__name__} is invalid; "
                        "expected a path (str or os.PathLike)")
    return Path(directory)


def _read_files(directory: Path) -> Tuple[dict, Path, bytes]:
    """The manifest and the bytes of the weights it names. A save that replaces both between our two
    reads (the old weights are then gone) is retried with the new manifest."""
    cfg_path = directory / CONFIG_NAME
    for _ in range(3):
        try:
            raw = cfg_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _bad(directory, f"{CONFIG_NAME} is missing (or not a file)") from None
        meta = _parse_manifest(cfg_path, raw)
        w_path = directory / meta["weights"]
        try:
            return meta, w_path, w_path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            try:
                if cfg_path.read_bytes() != raw:
                    continue
            except FileNotFoundError:
                pass
            raise _bad(directory, f"{meta['weights']} (named by {CONFIG_NAME}) is missing") from None
    raise _bad(directory, f"{CONFIG_NAME} kept changing while it was read (a save is running in a loop?)")


def _parse_manifest(cfg_path: Path, raw: bytes) -> dict:
    """Parse and check the manifest's own fields (types, checksum); nothing about the model yet."""
    try:
        meta = json.loads(raw.decode())
    except (ValueError, RecursionError) as e:      # UnicodeDecodeError is a ValueError
        raise _bad(cfg_path, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(cfg_path, f"`format` is {meta.get('format') if isinstance(meta, dict) else None!r}; "
                   f"expected {FORMAT!r}")
    version = meta.get("version")
    if version == VERSION:
        if meta.get("sha256") != _digest(meta):
            raise _bad(cfg_path, "its checksum `sha256` does not match its content (edited or damaged)")
        if not isinstance(meta.get("weights"), str) or not _WEIGHTS.fullmatch(meta["weights"]):
            raise _bad(cfg_path, f"`weights` {meta.get('weights')!r} is invalid; expected "
                       "'softprompt-<16 hex digits>.safetensors'")
    elif version == 1:
        if meta.get("weights", LEGACY_WEIGHTS_NAME) != LEGACY_WEIGHTS_NAME:
            raise _bad(cfg_path, f"`weights` {meta.get('weights')!r} is invalid for version 1; "
                       f"expected {LEGACY_WEIGHTS_NAME!r}")
        meta["weights"] = LEGACY_WEIGHTS_NAME
    else:
        raise _bad(cfg_path, f"`version` {version!r} is not supported; expected 1 or {VERSION}")
    geometry = meta.get("geometry")
    if not isinstance(geometry, dict) or not all(_is_int(geometry.get(k)) for k in _GEOMETRY_KEYS):
        raise _bad(cfg_path, f"`geometry` {geometry!r} is invalid; expected an object with integer "
                   f"{', '.join(_GEOMETRY_KEYS)}")
    if not isinstance(meta.get("weights_sha256"), str):
        raise _bad(cfg_path, f"`weights_sha256` {meta.get('weights_sha256')!r} is invalid; expected a hex string")
    tasks, heads = meta.get("tasks", []), meta.get("heads", [])
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise _bad(cfg_path, f"`tasks` {tasks!r:.80} is invalid; expected a list of objects")
    if not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads) or len(set(heads)) != len(heads):
        raise _bad(cfg_path, f"`heads` {heads!r:.80} is invalid; expected a list of distinct module paths")
    meta["tasks"], meta["heads"] = tasks, heads
    return meta


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_fits(directory: Path, meta: dict, model: nn.Module, geometry: Geometry) -> None:
    """The checkpoint was saved from a model of this geometry; else a ValueError saying which differs."""
    saved, mine = meta["geometry"], geometry.to_dict()
    differ = [k for k in _GEOMETRY_KEYS if saved[k] != mine[k]]
    if not differ:
        return
    key = differ[0]

    def describe(g):
        return ", ".join(f"{k}={g[k]}" for k in _GEOMETRY_KEYS)
    raise ValueError(
        f"softprompt checkpoint {str(directory)!r} does not fit the model: {key} is {saved[key]} in the checkpoint "
        f"but {mine[key]} in the model. The checkpoint was saved from a {meta.get('model_class', '?')!s:.60} "
        f"(model_type {saved.get('model_type', '?')!s:.40}; {describe(saved)}); this model is a "
        f"{type(model).__name__} (model_type {mine['model_type']}; {describe(mine)})")


def read_checkpoint(directory, model: nn.Module, geometry: Geometry
                    ) -> Tuple[List[Tuple[str, SoftPrompt]], Dict[str, Dict[str, torch.Tensor]], dict]:
    """Read and fully validate a checkpoint against ``model``; changes nothing.

    Returns ``([(name, module)], {head: state_dict}, meta)``; modules are built and loaded on the CPU.
    Every error is a ValueError naming the file and what is wrong.
    """
    from safetensors.torch import load
    directory = _as_dir(directory)
    meta, w_path, blob = _read_files(directory)
    cfg_path = directory / CONFIG_NAME
    _check_fits(directory, meta, model, geometry)
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise _bad(w_path, f"its checksum does not match {CONFIG_NAME} (truncated, modified or from another save)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise _bad(w_path, f"not a readable safetensors file ({e})") from None

    planned, used = [], set()
    for entry in meta["tasks"]:
        name, cfg, structure = _task_entry(cfg_path, entry, {n for n, *_ in planned})
        state = _take(tensors, f"tasks.{name}.", used)
        _check_shapes(cfg.state_shapes(geometry, structure), state, f"task {name!r}", w_path)
        planned.append((name, cfg, structure, state))
    heads: Dict[str, Dict[str, torch.Tensor]] = {}
    for head in meta["heads"]:
        try:
            target = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"softprompt checkpoint {str(directory)!r} does not fit the model: it has no head "
                             f"module {head!r}") from None
        state = _take(tensors, f"heads.{head}.", used)
        want = target.state_dict()
        if set(state) != set(want):
            raise _bad(w_path, f"head {head!r} has tensors {sorted(state)}; the model's has {sorted(want)}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(want[k].shape):
                raise ValueError(f"softprompt checkpoint {str(directory)!r} does not fit the model: head "
                                 f"{head}.{k} has shape {tuple(v.shape)}; the model's is {tuple(want[k].shape)}")
            if v.dtype.is_floating_point != want[k].dtype.is_floating_point:
                raise _bad(w_path, f"head {head!r} tensor {k!r} has dtype {v.dtype}; the model's is {want[k].dtype}")
            _check_finite(v, f"head {head!r} tensor {k!r}", w_path)
        heads[head] = state
    stray = sorted(set(tensors) - used)
    if stray:
        raise _bad(w_path, f"tensors {stray[:5]} belong to no task or head of {CONFIG_NAME}")

    modules: List[Tuple[str, SoftPrompt]] = []
    for name, cfg, structure, state in planned:      # shapes are checked: this allocates what the file holds
        try:                                         # checks that need the geometry (anchor token ids)
            module = cfg.for_loading(structure).build(geometry, None)
        except ValueError as e:
            raise _bad(cfg_path, f"task {name!r} `config` does not fit the model ({e})") from None
        module.config = cfg
        if hasattr(module, "apply_structure"):
            module.apply_structure(structure)
        _load_state(module, state, f"task {name!r}", w_path)
        modules.append((name, module))
    return modules, heads, meta


def _task_entry(cfg_path: Path, entry: dict, seen: set) -> Tuple[str, MethodConfig, dict]:
    """A task entry of the manifest as ``(name, config, structure)``, or a ValueError naming the field."""
    name, method = entry.get("name"), entry.get("method")
    if not isinstance(name, str) or not name or "." in name or name in seen:
        raise _bad(cfg_path, f"task `name` {name!r} is invalid or repeated; expected a distinct non-empty "
                   "string without '.'")
    if not isinstance(method, str) or method not in METHODS:
        raise _bad(cfg_path, f"task {name!r} `method` {method!r} is invalid; expected one of {sorted(METHODS)}")
    config, structure = entry.get("config", {}), entry.get("structure", {})
    if not isinstance(config, dict):
        raise _bad(cfg_path, f"task {name!r} `config` {config!r:.80} is invalid; expected an object")
    if not isinstance(structure, dict):
        raise _bad(cfg_path, f"task {name!r} `structure` {structure!r:.80} is invalid; expected an object")
    try:
        cfg = task_config_for_load(method, config)
        cfg.for_loading(structure)
    except (TypeError, ValueError, OverflowError) as e:
        raise _bad(cfg_path, f"task {name!r} `config` is invalid ({e})") from None
    return name, cfg, structure


def _take(tensors: Dict[str, torch.Tensor], prefix: str, used: set) -> Dict[str, torch.Tensor]:
    keys = [k for k in tensors if k.startswith(prefix)]
    used.update(keys)
    return {k[len(prefix):]: tensors[k] for k in keys}


def _check_shapes(expected, state: Dict[str, torch.Tensor], what: str, path) -> None:
    """Compare a file's tensors with a config's ``state_shapes`` (stops at the first difference, so a
    config asking for more tensors than the file holds costs nothing)."""
    names = set()
    for key, shape in expected:
        if key not in state:
            raise _bad(path, f"{what} lacks tensor {key!r} (shape {shape}) that its config needs; it has "
                       f"{sorted(state)[:8]}")
        if tuple(state[key].shape) != tuple(shape):
            raise _bad(path, f"{what} tensor {key!r} has shape {tuple(state[key].shape)}; its config needs {shape}")
        if not state[key].dtype.is_floating_point:
            raise _bad(path, f"{what} tensor {key!r} has dtype {state[key].dtype}; expected floating point")
        names.add(key)
    extra = sorted(set(state) - names)
    if extra:
        raise _bad(path, f"{what} has tensors {extra[:5]} that its config does not need")


def _check_finite(t: torch.Tensor, what: str, path) -> None:
    if t.dtype.is_floating_point and not torch.isfinite(t).all():
        raise _bad(path, f"{what} contains NaN or inf")


def _load_state(module: nn.Module, state: Dict[str, torch.Tensor], what: str, path) -> None:
    want = module.state_dict()
    if set(state) != set(want):
        raise _bad(path, f"{what} has tensors {sorted(state)}; its method needs {sorted(want)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise _bad(path, f"{what} tensor {k!r} has shape {tuple(v.shape)}; expected {tuple(want[k].shape)}")
        _check_finite(v, f"{what} tensor {k!r}", path)
    module.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()}, strict=True)
