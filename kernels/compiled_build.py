"""The build of the ``compiled`` backend's C++ op ``softprompt::prefix_paged_attention``
(``csrc/prefix_paged_attention.cpp``): :func:`load` returns the op, or None with a reason.

It is built on first use by ``torch.utils.cpp_extension.load`` (ninja, the system C++ compiler;
about 20 s) into ``$SOFTPROMPT_CACHE_DIR/torch_extensions`` or torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); torch's file lock there
serialises concurrent builds. The extension's name carries a hash of the source, the flags and
the torch and Python versions, so different versions live side by side and none is ever deleted
(another process may have it loaded). Where there is no compiler, the build fails, or
``SOFTPROMPT_CPU_KERNEL=0`` is set, :func:`load` returns None (:func:`unavailable_reason` says why):
the ``compiled`` backend is then unavailable and its users (the engine's CPU decoder) run the
``torch`` backend.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "prefix_paged_attention.cpp"

_op = None
_reason: Optional[str] = None
_tried = False


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list:
    """Optimised, vectorisable, IEEE-safe where it matters (no -ffast-math: the kernel relies on
    exact rounding in its exp range reduction); fused multiply-adds allowed (ISO C++ mode turns
    them off by default); OpenMP, since ``at::parallel_for`` is
    inline and needs it to use torch's pool; AVX2/FMA only where this CPU reports them (part of
    the extension's name, so a cache shared with a CPU without them never serves it this build)."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def extension_name(source: bytes, flags: list) -> str:
    """One name (and cache folder) per source, flags, torch and Python version and machine: a
    build is never rebuilt in place under a process that has it loaded, and none is deleted."""
    key = hashlib.sha256(source + " ".join(flags + [torch.__version__, sys.version, platform.machine()]).encode())
    return f"softprompt_prefix_paged_attention_{key.hexdigest()[:16]}"


def _build_directory(name: str, cpp_extension) -> Path:
    """$SOFTPROMPT_CACHE_DIR/torch_extensions/<name>, else torch's extension cache folder for it."""
    root = os.environ.get("SOFTPROMPT_CACHE_DIR")
    base = (Path(root) / "torch_extensions" if root else
            Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()))
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


STALE_LOCK_S = 900      # a build takes well under a minute; a lock this old was left by a killed one


def _build():
    """Builds (or finds in the cache) and loads the extension; raises on any failure."""
    from torch.utils import cpp_extension           # imports setuptools: only when building

    flags = compile_flags()
    name = extension_name(SOURCE.read_bytes(), flags)
    folder = _build_directory(name, cpp_extension)
    lock = folder / "lock"
    # torch's file lock has no timeout: a build killed midway leaves it behind and every later
    # load would wait forever. Not deleted here (it may be a live build's): reported instead.
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        raise RuntimeError(f"the build lock {lock} is {time.time() - lock.stat().st_mtime:.0f} s old, left by a "
                           f"killed build; delete it to rebuild")
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), is_python_module=False, verbose=False)
    return torch.ops.softprompt.prefix_paged_attention


def load():
    """The op ``torch.ops.softprompt.prefix_paged_attention``, or None when it cannot be used here (see
    :func:`unavailable_reason`)."""
    global _op, _reason, _tried
    if _tried:
        return _op
    _tried, _op = True, None
    if os.environ.get("SOFTPROMPT_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        _reason = "disabled by SOFTPROMPT_CPU_KERNEL"
        return None
    try:
        _op = _build()
    # a build can fail in many ways (no compiler or ninja, compiler errors, an unwritable cache,
    # a loader error); each means "no compiled backend here", with the reason kept for the user
    except Exception as err:                        # noqa: BLE001
        _reason = f"could not build or load {SOURCE.name}: {type(err).__name__}: {str(err).strip()[-1000:]}"
        return None
    _reason = None
    return _op


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned None (None when the kernel is available)."""
    load()
    return _reason
