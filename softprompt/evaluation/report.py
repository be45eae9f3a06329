"""The study's Markdown table and plot (accuracy with Wilson 95% intervals)."""
from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _size(n: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(result: dict, command: str = "", when: str = "") -> str:
    cfg, splits = result["config"], result["splits"]
    lines = [f"# Soft prompts vs hand-written prompts vs fine-tuning: {result['task']['description']}", ""]
    if not result.get("complete", True):
        lines += ["**Partial result: the run was cut short; methods missing below did not finish.**", ""]
    if when or command:
        lines += [f"Run: {when}; `{command}`; {result['threads']} CPU threads; {result['seconds'] / 60:.1f} min.", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    sizes, drop = splits["sizes"], splits["dropped"]
    lines += [f"Splits (balanced, fixed seed {cfg['split_seed']}): train {sizes['train']}, validation "
              f"{sizes['validation']}, test {sizes['test']} tweets (per class {splits['per_class']}). Duplicates "
              "(case, whitespace, links, @-mentions normalised) and the "
              f"{splits['conflicting_texts_in_corpus']} texts the corpus labels both ways are dropped; "
              f"dropped per split: {drop}. Overlap between splits after cleaning: {splits['overlap']} (none).", "",
              f"Budget: every {result['models']['lm']} method trains {cfg['steps']} steps x batch {cfg['batch_size']}; "
              f"every {result['models']['encoder']} method {cfg['encoder_steps']} steps x batch "
              f"{cfg['encoder_batch_size']}; same rows and batch order per seed; AdamW, linear warm-up and decay, "
              f"clipping 1.0. Seeds {list(cfg['seeds'])}. Accuracy: mean over seeds on the test split, ± the "
              "seeds' standard deviation, [Wilson 95% interval of the mean at the test size].", ""]
    hard = result.get("hard_prompts")
    if hard:
        lines += ["## Hand-written prompts (SmolLM2, label words; chosen on validation)", "",
                  "| prompt | shots per class | validation | test | test 95% interval |", "|---|---|---|---|---|"]
        for name, e in hard["prompts"].items():
            mark = " **(selected on validation)**" if e["selected_on_validation"] else ""
            lo, hi = e["test"]["ci"]
            lines.append(f"| {name}{mark} | {e['shots']} | {_pct(e['validation']['accuracy'])} | "
                         f"{_pct(e['test']['accuracy'])} | [{_pct(lo)}, {_pct(hi)}] |")
        lines.append("")
    lines += ["## Trained methods", "",
              "| model | method | trainable params | step time | train memory* | storage / task | validation | "
              "test (mean ± sd) | test 95% interval | recipe |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["methods"].values():
        t, rec = m["test"], m["recipe"]
        recipe = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        lines.append(f"| {m['model']} | {m['label']} | {m['trainable_params']:,} | {m['step_seconds']:.2f} s | "
                     f"{m['train_memory_mb']:.0f} MB | {_size(m['storage_bytes'])} | {_pct(m['validation']['mean'])} | "
                     f"**{_pct(t['mean'])}** ± {_pct(t['std'])} ({t['seeds']} seeds) | "
                     f"[{_pct(t['ci_low'])}, {_pct(t['ci_high'])}] | {recipe} |")
    lines += ["", "(*) saved activations of one training forward plus weights, gradients and AdamW state of what "
              "trains (the frozen base model's weights not counted). Step time: median, on a shared machine.", ""]
    lines += ["## Targets", ""]
    for v in result["verdicts"]:
        parts = [f"**{v['model']}**: best soft method {v['best_soft']} {_pct(v['best_soft_accuracy'])}"]
        if "full_accuracy" in v:
            ok = "reached" if v["within_2_points_of_full"] else "NOT reached"
            parts.append(f"full fine-tuning {_pct(v['full_accuracy'])} (gap {v['gap_to_full_points']:+.1f} points; "
                         f"target within 2 points: {ok})")
        if "hard_accuracy" in v:
            ok = "reached" if v["above_hard_prompt"] else "NOT reached"
            parts.append(f"validation-selected hand-written prompt ({v['hard_prompt']}) {_pct(v['hard_accuracy'])} "
                         f"(target above it: {ok})")
        lines.append("- " + "; ".join(parts) + ".")
    sweep_rows = [(m, s) for m in result["methods"].values() for s in m["sweep"]]
    if any(len(m["sweep"]) > 1 for m in result["methods"].values()):
        lines += ["", "## Recipe sweep (validation, first seed)", "", "| model | method | recipe | validation |",
                  "|---|---|---|---|"]
        for m, s in sweep_rows:
            chosen = " (chosen)" if s["recipe"] == m["recipe"] else ""
            lines.append(f"| {m['model']} | {m['label']} | {s['recipe']}{chosen} | {_pct(s['validation'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Test accuracy per method with Wilson 95% intervals (and each seed), per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(m["model"] for m in result["methods"].values()))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4.2), squeeze=False)
    hard = result.get("hard_prompts")
    for ax, model in zip(axes[0], models):
        names, means, lows, highs, seeds, colors = [], [], [], [], [], []
        if hard and model == result["models"]["lm"]:
            for name, e in hard["prompts"].items():
                names.append(("* " if e["selected_on_validation"] else "") + name)
                means.append(e["test"]["accuracy"])
                lows.append(e["test"]["ci"][0])
                highs.append(e["test"]["ci"][1])
                seeds.append([])
                colors.append("#999999")
        for m in result["methods"].values():
            if m["model"] != model:
                continue
            names.append(m["label"])
            means.append(m["test"]["mean"])
            lows.append(m["test"]["ci_low"])
            highs.append(m["test"]["ci_high"])
            seeds.append([r["test"]["accuracy"] for r in m["runs"]])
            colors.append("#d62728" if m["soft"] else "#1f77b4")
        ys = list(range(len(names)))
        ax.barh(ys, means, color=colors, alpha=0.8)
        ax.errorbar(means, ys, xerr=[[a - lo for a, lo in zip(means, lows)], [hi - a for a, hi in zip(means, highs)]],
                    fmt="none", ecolor="black", capsize=3, lw=1)
        for y, s in zip(ys, seeds):
            ax.plot(s, [y] * len(s), "k.", ms=4)
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0.4, 1.0)
        ax.axvline(0.5, color="black", lw=0.6, ls="--")
        ax.set_xlabel("test accuracy (Wilson 95%; dots: seeds)")
        ax.set_title(model, fontsize=9)
    fig.suptitle("grey: hand-written (* chosen on validation); red: soft prompts; blue: fine-tuning", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
