"""PNG plots of a benchmark run: speed-up against prefix length, peak memory against batch.

"ours" is our fastest no-copy method in each case (the ``ours`` entry of a row); the caption says so
and names the machine, the thread count and the versions the run used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .baselines import OURS


def caption(sweeps: Dict[str, List[dict]], env: Optional[Dict[str, str]] = None,
            methods: Optional[Sequence[str]] = None) -> str:
    """What the plot compares and where it ran: the definition of "ours", machine, threads, versions."""
    ours = sorted({r["ours"] for rows in sweeps.values() for r in rows if "ours" in r}) or \
        [m for m in (methods or OURS) if m in OURS]
    text = (f'"ours" = the faster of our no-copy backends ({", ".join(ours)}) in each case; '
            "speed-up = baseline time / ours")
    if env:
        text += f"\n{env.get('device', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}, " \
                f"commit {env.get('commit', '?')}"
    return text


def plot_run(name: str, sweeps: Dict[str, List[dict]], path: Path, env: Optional[Dict[str, str]] = None,
             methods: Optional[Sequence[str]] = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    prefix_rows = sweeps.get("prefix", [])
    baselines = sorted({k[len("speed-up vs "):] for r in prefix_rows for k in r if k.startswith("speed-up vs ")})
    for base in baselines:
        pts = [(r["P"], r[f"speed-up vs {base}"]) for r in prefix_rows if f"speed-up vs {base}" in r]
        if pts:
            left.plot(*zip(*pts), marker="o", label=f"vs {base}")
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set_xlabel("prefix length P")
    left.set_ylabel("speed-up of ours (baseline time / ours)")
    left.set_title(f"{name}: speed-up against prefix length")
    if baselines:
        left.legend()

    batch_rows = sweeps.get("batch", [])
    shown = [m for m in ("triton", "torch", "reference", "sdpa_concat", "flex_packed")
             if any(f"{m} MiB" in r for r in batch_rows)]
    for m in shown:
        pts = [(r["B"], r[f"{m} MiB"]) for r in batch_rows if f"{m} MiB" in r]
        right.plot(*zip(*pts), marker="o", label=m + (" (ours)" if m in OURS else ""),
                   lw=2.5 if m in OURS else 1.2)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch B (sequences)")
    right.set_ylabel("peak memory of one call (MiB)")
    right.set_title(f"{name}: memory against batch")
    if shown:
        right.legend()
    fig.text(0.5, 0.01, caption(sweeps, env, methods), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
