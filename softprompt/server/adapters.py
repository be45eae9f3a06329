"""The tasks a server serves: loaded at start-up from ``--adapters`` and at run time from under
``--adapter-root``. Every method here runs on the engine worker's thread, between steps.

An adapter is one of
- a ``SoftPromptModel.save`` checkpoint folder (``softprompt.json``): all its servable tasks, under
  their saved names (deep prompts, and input prompts that compile into a prefix);
- a PEFT prompt-learning adapter folder (``adapter_config.json``): one task, named by the request
  (default: the folder name);
- a ``<task>.safetensors`` file holding ``k`` and ``v`` ``[L, Hkv, P, D]`` in cache convention.
A folder given at start-up may also hold several PEFT adapter folders and ``.safetensors`` files.
Heads (classification adapters' own weights) are never copied into the shared model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import torch

from ..methods.checkpoint import CONFIG_NAME
from ..model import SoftPromptModel
from ..peft_io import ADAPTER_CONFIG

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class AdapterError(ValueError):
    """An adapter that cannot be loaded (bad name, path outside the root, unreadable, wrong model)."""

    def __init__(self, message: str, param: str, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def check_name(name, base_id: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or name == base_id:
        raise AdapterError(f"`name` {name!r} is invalid; expected 1-128 letters, digits, '_' or '-' (starting "
                           f"with a letter or digit), not the base model id {base_id!r}", "name")
    return name


def resolve_under(root: Optional[Path], relative: str) -> Path:
    """``root / relative`` if it stays under ``root`` after resolving '..' and symlinks; else AdapterError."""
    if root is None:
        raise AdapterError("adapter loading needs --adapter-root", "path", status=403)
    given = Path(relative)
    if given.is_absolute() or ".." in given.parts or "\x00" in relative:
        raise AdapterError(f"`path` {relative!r} is invalid; expected a path relative to the adapter root, "
                           "without '..'", "path")
    target = (root / given).resolve()
    if not target.is_relative_to(root.resolve()):
        raise AdapterError(f"`path` {relative!r} leaves the adapter root", "path")
    if not target.exists():
        raise AdapterError(f"`path` {relative!r} does not exist under the adapter root", "path", status=404)
    return target


class Adapters:
    """The served tasks over one model: a SoftPromptModel (checkpoints, PEFT adapters) plus raw K/V
    tasks written straight into its prefix store."""

    def __init__(self, model, base_id: str):
        self.base_id = base_id
        self.spm = SoftPromptModel(model)
        self.spm.eval()
        self.store = self.spm.store
        self._raw: set = set()
        self.names: List[str] = []            # served tasks, in load order

    def __contains__(self, name) -> bool:
        return name in self.names

    # ------------------------------------------------------------------ loading
    def load_dir(self, directory: Path) -> List[str]:
        """Start-up: every adapter in ``directory`` (a checkpoint, a PEFT folder, or a folder of them)."""
        if not directory.is_dir():
            raise ValueError(f"--adapters {str(directory)!r} is not a folder")
        if (directory / CONFIG_NAME).exists() or (directory / ADAPTER_CONFIG).exists():
            return self.load(directory, None)
        names = []
        for entry in sorted(directory.iterdir()):
            if entry.suffix == ".safetensors" or (entry / ADAPTER_CONFIG).exists() or (entry / CONFIG_NAME).exists():
                names += self.load(entry, None)
        if not names:
            raise ValueError(f"--adapters {str(directory)!r} holds no checkpoint, PEFT adapter or "
                             "<task>.safetensors file")
        return names

    def load(self, path: Path, name: Optional[str], method: Optional[str] = None) -> List[str]:
        """Load the adapter at ``path`` (already checked to lie under the root); the new task names."""
        with torch.no_grad():
            if path.is_dir() and (path / CONFIG_NAME).exists():
                return self._checkpoint(path, name)
            if path.is_dir() and (path / ADAPTER_CONFIG).exists():
                task = self._fresh(name if name is not None else path.name)
                try:
                    self.spm.load_peft(path, task, method=method, heads=False)
                except ValueError as exc:
                    raise AdapterError(str(exc), "path") from None
                return self._serve([task])
            if path.is_file() and path.suffix == ".safetensors":
                return self._raw_file(path, self._fresh(name if name is not None else path.stem))
        raise AdapterError(f"`path` {path.name!r} is neither a softprompt checkpoint folder ({CONFIG_NAME}), a PEFT "
                           f"adapter folder ({ADAPTER_CONFIG}) nor a <task>.safetensors file", "path")

    def _fresh(self, name) -> str:
        check_name(name, self.base_id)
        if name in self.names or name in self.store:
            raise AdapterError(f"`name` {name!r} is already loaded; unload it first", "name", status=409)
        return name

    def _checkpoint(self, path: Path, name: Optional[str]) -> List[str]:
        from ..methods import checkpoint
        try:
            modules, heads, _ = checkpoint.read_checkpoint(path, self.spm.model, self.spm.geometry)
        except ValueError as exc:
            raise AdapterError(str(exc), "path") from None
        saved = [n for n, _ in modules]
        if name is not None and saved != [name]:
            raise AdapterError(f"`name` {name!r} does not match the checkpoint, which holds tasks {saved}; its "
                               "tasks keep their saved names (leave `name` out)", "name")
        if heads:
            raise AdapterError(f"the checkpoint carries head weights {sorted(heads)}; a server shares one model "
                               "between tasks and never loads heads", "path")
        for n in saved:
            self._fresh(n)
        self.spm.load_tasks(path)
        servable = [n for n in saved if self.spm.prompts[n].kind == "deep" or self.spm.compilable(n)]
        for n in set(saved) - set(servable):
            self.spm.remove_task(n)
        if not servable:
            raise AdapterError(f"the checkpoint's tasks {saved} are inline input prompts that do not compile "
                               "into a prefix; the engine cannot serve them", "path")
        return self._serve(servable)

    def _raw_file(self, path: Path, task: str) -> List[str]:
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
            if "k" not in tensors or "v" not in tensors:
                raise ValueError(f"it has tensors {sorted(tensors)}; expected 'k' and 'v' [L, Hkv, P, D]")
            self.store.add(task, tensors["k"].to(self.store.dtype), tensors["v"].to(self.store.dtype))
        except Exception as exc:     # noqa: BLE001 - safetensors raises its own error types
            raise AdapterError(f"{path.name}: {exc}", "path") from None
        self._raw.add(task)
        self.names.append(task)
        return [task]

    def _serve(self, tasks: List[str]) -> List[str]:
        self.spm.sync(tasks)
        self.names += tasks
        return tasks

    def close(self) -> None:
        """Detach the model from its prefix store (the model can be served or attached again)."""
        self.spm.detach_model()
        self.names = []

    # ------------------------------------------------------------------ unloading
    def unload(self, name: str) -> None:
        if name not in self.names:
            raise AdapterError(f"`name` {name!r} is not a loaded task; loaded: {self.names}", "name", status=404)
        if name in self._raw:
            self.store.remove(name)
            self._raw.discard(name)
        else:
            self.spm.remove_task(name)
        self.names.remove(name)
