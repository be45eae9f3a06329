"""``softprompt bench kernels|decode|train [--preset cpu|gpu]``: run a benchmark, write JSON, Markdown and PNG.

    python -m benchmarks.run decode            # also: python -m benchmarks.decode
    softprompt bench kernels --preset gpu

Results go to a fresh run folder ./softprompt-runs/bench-<bench>-<time>/<bench>-<preset>.{json,md,png}
(or ``--out DIR``), stamped with the device, versions, date and git commit; only ``--update-results``
replaces the committed files in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from softprompt.cli_support import HelpFormatter, positive_int, run_command

from .common import add_output_arguments, environment, output_dir
from .plots import plot_run
from .presets import METHODS, sweeps
from .suite import format_rows, run_sweep

BENCHES = {
    "kernels": "prefill forward (training/prefill shapes)",
    "decode": "mixed-task decoding, one query per sequence",
    "train": "forward + backward with per-task prefix gradients",
}


def _markdown(rows, methods) -> str:
    table_rows, columns = format_rows(rows, methods)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in table_rows]
    return "\n".join(lines)


def run(bench: str, preset: str = None, directory=None) -> dict:
    """Run one benchmark; with ``directory``, write its JSON, Markdown and PNG there."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = preset or ("gpu" if device.type == "cuda" else "cpu")
    if preset == "gpu" and device.type != "cuda":
        raise SystemExit("the gpu preset needs a CUDA device; use --preset cpu")
    methods = METHODS[preset]
    env = environment()
    print(f"{bench}: {BENCHES[bench]} | preset {preset} | {env['device']} | torch {env['torch']} | "
          f"commit {env['commit']}")
    results = {}
    sections = []
    for sweep, shapes in sweeps(bench, preset).items():
        rows = run_sweep(shapes, methods, device, title=f"{bench}: {sweep} sweep")
        results[sweep] = rows
        sections.append(f"### {sweep} sweep\n\n{_markdown(rows, methods)}")
    text = "\n\n".join(sections)
    print(text)
    if directory is not None:
        stem = Path(directory) / f"{bench}-{preset}"
        header = (f"# {bench} benchmark ({preset} preset)\n\n{BENCHES[bench]}. "
                  f"{', '.join(f'{k}: {v}' for k, v in env.items())}.\n"
                  "Times are medians after warm-up, every method run side by side in one process. "
                  "\"ours\" is our fastest no-copy method in each case (column `ours`); "
                  "every ratio is baseline / ours, so above 1 means ours is faster (speed-up) or "
                  "uses less memory (memory).\n\n")
        for suffix, content in ((".json", json.dumps({"environment": env, "bench": bench, "preset": preset,
                                                        "sweeps": results}, indent=2, default=str)),
                                (".md", header + text + "\n")):
            tmp = stem.with_suffix(suffix + ".tmp")
            tmp.write_text(content)
            os.replace(tmp, stem.with_suffix(suffix))
        png = plot_run(bench, results, stem.with_suffix(".png"), env=env, methods=methods)
        print(f"\nwritten: {stem}.json, {stem}.md, {png}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="softprompt bench", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("bench", choices=[*BENCHES, "generate", "all"],
                        help="generate: end-to-end HF generate() (see python -m benchmarks.generate --help)")
    parser.add_argument("--preset", choices=["cpu", "gpu"], default=None,
                        help="default: gpu when CUDA is available, else cpu")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    add_output_arguments(parser)
    if argv and argv[0] == "generate" or (argv is None and sys.argv[1:2] == ["generate"]):
        from .generate import main as generate_main
        return generate_main(list(argv[1:] if argv else sys.argv[2:]))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    directory = None if opts.no_write else output_dir(f"bench-{opts.bench}", opts.out, opts.update_results)
    for bench in (BENCHES if opts.bench == "all" else [opts.bench]):
        run(bench, opts.preset, directory)
    return 0


if __name__ == "__main__":
    sys.exit(run_command("softprompt bench", main))
