"""PNG plots of a benchmark run: speed-up against prefix length, peak memory against batch."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .baselines import OURS


def plot_run(name: str, sweeps: Dict[str, List[dict]], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    prefix_rows = sweeps.get("prefix", [])
    baselines = sorted({k[len("speed-up vs "):] for r in prefix_rows for k in r if k.startswith("speed-up vs ")})
    for base in baselines:
        pts = [(r["P"], r[f"speed-up vs {base}"]) for r in prefix_rows if f"speed-up vs {base}" in r]
        if pts:
            left.plot(*zip(*pts), marker="o", label=f"vs {base}")
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set_xlabel("prefix length P")
    left.set_ylabel("speed-up of ours (x)")
    left.set_title(f"{name}: speed-up against prefix length")
    left.legend()

    batch_rows = sweeps.get("batch", [])
    methods = [m for m in ("triton", "torch", "reference", "sdpa_concat", "flex_packed")
               if any(f"{m} MiB" in r for r in batch_rows)]
    for m in methods:
        pts = [(r["B"], r[f"{m} MiB"]) for r in batch_rows if f"{m} MiB" in r]
        right.plot(*zip(*pts), marker="o", label=m + (" (ours)" if m in OURS else ""),
                   lw=2.5 if m in OURS else 1.2)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch B (sequences)")
    right.set_ylabel("peak memory of one call (MiB)")
    right.set_title(f"{name}: memory against batch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
