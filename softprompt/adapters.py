"""What an adapters folder holds, read from its metadata alone (no model, no tensors loaded).

Two layouts are understood, the same two that ``softprompt generate --adapters`` serves:

- a ``SoftPromptModel.save`` checkpoint: the JSON manifest ``softprompt.json`` names each task's
  method and config, and the base model's class and geometry; sizes come from the header of the
  safetensors file it names;
- ``<task>.safetensors`` files holding ``k`` and ``v`` ``[L, Hkv, P, D]`` (cache convention).

``softprompt tasks DIR`` prints the table; :func:`check_tasks` lets a command refuse an unknown
``--task`` before it spends time loading a model.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

MANIFEST = "softprompt.json"          # methods.checkpoint.CONFIG_NAME, kept here to avoid importing torch
NO_TASK = "none"                      # what --task takes for "no soft prompt"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class TaskInfo:
    """One task of an adapters folder."""
    name: str
    method: str                  # prompt_tuning | p_tuning_v1 | prefix_tuning | p_tuning_v2 | prefix_kv
    prefix_len: Optional[int]    # virtual tokens (prefix rows per layer)
    base_model: str              # the model class and geometry the prompts were trained for
    parameters: int              # stored values (full training state: MLP / LSTM included)
    bytes: int                   # bytes of those values on disk


def _safetensors_header(path: Path) -> Dict[str, dict]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), read from its header."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _sizes(entries: Sequence[dict]) -> tuple:
    params = sum(math.prod(e.get("shape", [])) for e in entries)
    nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] if "data_offsets" in e else
                 math.prod(e.get("shape", [])) * _DTYPE_BYTES.get(e.get("dtype"), 0) for e in entries)
    return params, nbytes


def _describe_geometry(model_class: str, g: dict) -> str:
    parts = [f"{g[k]} {label}" for k, label in (("num_layers", "layers"), ("hidden_size", "hidden"),
                                                   ("num_kv_heads", "KV heads"), ("head_dim", "head dim"),
                                                   ("vocab_size", "vocab")) if k in g]
    return f"{model_class} ({', '.join(parts)})" if parts else model_class


def _from_manifest(path: Path) -> List[TaskInfo]:
    try:
        meta = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "softprompt" or not isinstance(meta.get("tasks"), list):
        raise ValueError(f"{path / MANIFEST} is not a softprompt manifest (expected 'format': 'softprompt' "
                         "and a 'tasks' list)")
    base = meta.get("base_model") or _describe_geometry(str(meta.get("model_class", "unknown model")),
                                                        meta.get("geometry") or {})
    weights = path / str(meta.get("weights", "softprompt.safetensors"))
    table = _safetensors_header(weights) if weights.is_file() else {}
    infos = []
    for entry in meta["tasks"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{path / MANIFEST}: task entry {entry!r:.80} has no name")
        config = entry.get("config") or {}
        own = [v for k, v in table.items() if k.startswith(f"tasks.{entry['name']}.")]
        params, nbytes = _sizes(own)
        infos.append(TaskInfo(entry["name"], str(entry.get("method", "unknown")), config.get("num_virtual_tokens"),
                              base, params, nbytes))
    return infos


def _from_kv_files(path: Path) -> List[TaskInfo]:
    infos = []
    for f in sorted(path.glob("*.safetensors")):
        table = _safetensors_header(f)
        k = table.get("k", {}).get("shape")
        if not k or len(k) != 4 or "v" not in table:
            raise ValueError(f"{f} has tensors {sorted(table)}; expected 'k' and 'v' [L, Hkv, P, D] "
                             "in cache convention")
        params, nbytes = _sizes(list(table.values()))
        base = f"any model with {k[0]} layers, {k[1]} KV heads, head dim {k[3]}"
        infos.append(TaskInfo(f.stem, "prefix_kv", k[2], base, params, nbytes))
    return infos


def list_tasks(directory) -> List[TaskInfo]:
    """The tasks saved in the adapters folder ``directory`` (either layout), without loading any model."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"adapters folder {str(directory)!r} is not a folder")
    if (path / MANIFEST).is_file():
        return _from_manifest(path)
    infos = _from_kv_files(path)
    if not infos:
        raise ValueError(f"adapters folder {str(directory)!r} holds neither a SoftPromptModel checkpoint "
                         f"({MANIFEST}) nor <task>.safetensors files")
    return infos


def check_tasks(directory, tasks: Sequence[Optional[str]], argument: str = "--task") -> List[TaskInfo]:
    """Raise a ValueError naming ``argument`` when a task is not in ``directory`` (``None`` / 'none'
    means no soft prompt and is always allowed; without a folder only that is allowed); the folder's tasks."""
    infos = list_tasks(directory) if directory is not None else []
    known = {i.name for i in infos}
    unknown = sorted({t for t in tasks if t is not None and t.lower() != NO_TASK and t not in known})
    if unknown:
        where = f"the adapters folder {str(directory)!r}" if directory is not None else "no adapters folder"
        allowed = sorted(known) + [NO_TASK]
        raise ValueError(f"{argument} {', '.join(map(repr, unknown))} is not a task of {where}; "
                         f"expected one of {allowed} (list them with `softprompt tasks DIR`)")
    return infos


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_tasks(infos: Sequence[TaskInfo]) -> str:
    """A plain-text table of ``infos``: task, method, prefix length, parameters, size, base model."""
    head = ("task", "method", "prefix", "parameters", "size", "base model")
    rows = [(i.name, i.method, "-" if i.prefix_len is None else str(i.prefix_len), f"{i.parameters:,}",
             _human_bytes(i.bytes), i.base_model) for i in infos]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    right = {2, 3, 4}
    fmt = lambda r: "  ".join(c.rjust(w) if n in right else c.ljust(w)   # noqa: E731
                              for n, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), *map(fmt, rows)])


def tasks_command(argv=None) -> int:
    """``softprompt tasks DIR [--json]``."""
    p = argparse.ArgumentParser(prog="softprompt tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", metavar="DIR", help="an adapters folder (a SoftPromptModel.save folder, or "
                                                    "<task>.safetensors files)")
    p.add_argument("--json", action="store_true", help="print the tasks as a JSON list instead of a table")
    opts = p.parse_args(argv)
    infos = list_tasks(opts.directory)
    if opts.json:
        print(json.dumps([asdict(i) for i in infos], indent=2))
    else:
        print(format_tasks(infos))
    return 0
