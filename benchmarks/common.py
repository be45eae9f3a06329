"""Shared helpers for the CPU benchmarks: timing, peak memory, problem construction, results files."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def median_seconds(fn: Callable[[], object], warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of ``fn`` after warm-up (CPU: wall clock; compare ratios, not absolutes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep benchmark output readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated while ``fn`` runs (from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def prefix_problem(*, B: int, T: int, P: int, Sq: int, Skv: int, Hq: int, Hkv: int, D: int,
                   block_size: int = 16, dtype=torch.float32, requires_grad: bool = False, seed: int = 0):
    """Random inputs for ``prefix_attention``: T tasks of prefix length P, sequences spread over tasks."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-P // block_size)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    args = (
        randn(B, Hq, Sq, D), randn(B, Hkv, Skv, D), randn(B, Hkv, Skv, D),
        randn(T * blocks, Hkv, block_size, D), randn(T * blocks, Hkv, block_size, D),
        torch.randperm(T * blocks, generator=g).view(T, blocks),
        torch.full((T,), P, dtype=torch.long),
        torch.arange(B) % T,
    )
    return args


def environment() -> Dict[str, str]:
    import softprompt.kernels  # noqa: F401  (versions of what ran)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, env: Dict[str, str], rows: List[Dict[str, object]], table: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under benchmarks/results/ (atomically) and return the .md path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = f"# {name}\n\n{', '.join(f'{k}: {v}' for k, v in env.items())}\n\n{table}\n"
    for suffix, text in ((".json", json.dumps({"environment": env, "rows": rows}, indent=2)), (".md", md)):
        path = RESULTS_DIR / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return RESULTS_DIR / f"{name}.md"
