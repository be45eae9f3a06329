"""The no-copy ``torch`` backend (and, for the inference cases, the ``compiled`` one where it builds)
against the materialising ``reference`` backend, side by side on the CPU.

    python -m benchmarks.backends_cpu            # both shapes, writes benchmarks/results/backends_cpu.{json,md}

Shapes (from the foundation issue): decode with B=64 sequences over 4 tasks, prefix 1024, own cache 64,
Hq=8, Hkv=2, D=64; and a training step (forward + backward). Peak memory is the CPU tensor memory the
call allocates; the prefix part of the torch backend's memory does not grow with B (the B sweep shows it).
"""
from __future__ import annotations

import argparse

import torch

from softprompt.kernels import available_backends, plan_for_layer, prefix_attention

from .common import (add_output_arguments, cpu_peak_bytes, environment, markdown_table, median_seconds, output_dir,
                     prefix_problem, write_results)

SHAPES = {
    "decode": dict(B=64, T=4, P=1024, Sq=1, Skv=64, Hq=8, Hkv=2, D=64, train=False),
    "train step": dict(B=8, T=4, P=128, Sq=256, Skv=256, Hq=8, Hkv=2, D=64, train=True),
}


def run_case(label: str, *, B, T, P, Sq, Skv, Hq, Hkv, D, train, reps=7):
    args = prefix_problem(B=B, T=T, P=P, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, requires_grad=train)
    # Decode sees a full own cache per sequence (q at its end); training is causal over the sequence.
    kwargs = dict(causal=True)

    def call(backend):
        # One layer: the plan is built once per forward in a model, so each layer costs run() alone.
        plan = plan_for_layer(*args, backend=backend, **kwargs)

        def step():
            if train:
                out = plan.run(*args[:5])
                out.sum().backward()
            else:
                with torch.no_grad():
                    plan.run(*args[:5])
        return step

    with torch.no_grad():
        ref = prefix_attention(*args, backend="reference", **kwargs)
        got = prefix_attention(*args, backend="torch", **kwargs)
    err = float((ref - got).abs().max())
    row = {"case": label, "shape": f"B={B} T={T} P={P} Sq={Sq} Skv={Skv} Hq={Hq} Hkv={Hkv} D={D}"}
    compiled = not train and "compiled" in available_backends("cpu")
    for backend in ("reference", "torch", "compiled") if compiled else ("reference", "torch"):
        row[f"{backend} ms"] = round(1e3 * median_seconds(call(backend), reps=reps), 2)
        row[f"{backend} peak MiB"] = round(cpu_peak_bytes(call(backend)) / 2**20, 1)
    row["speed-up"] = f"{row['reference ms'] / row['torch ms']:.1f}x"
    if compiled:
        with torch.no_grad():
            err = max(err, float((ref - prefix_attention(*args, backend="compiled", **kwargs)).abs().max()))
        row["compiled speed-up"] = f"{row['reference ms'] / row['compiled ms']:.1f}x"
    row["memory ratio"] = f"{row['reference peak MiB'] / max(row['torch peak MiB'], 1e-9):.1f}x"
    row["max |diff|"] = f"{err:.1e}"
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per case (median reported)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results files")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    add_output_arguments(parser)
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rows = [run_case(name, reps=opts.reps, **shape) for name, shape in SHAPES.items()]
    # Prefix memory independent of B: same decode shape at growing batch.
    for B in (16, 256):
        rows.append(run_case(f"decode B={B}", reps=opts.reps, **{**SHAPES["decode"], "B": B}))
    columns = ["case", "shape", "reference ms", "torch ms", "speed-up", "compiled ms", "compiled speed-up",
               "reference peak MiB", "torch peak MiB", "memory ratio", "max |diff|"]
    table = markdown_table(rows, columns)
    env = environment()
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}\n")
    print(table)
    if not opts.no_write:
        print(f"\nwritten: {write_results('backends_cpu', env, rows, table, directory=output_dir('backends_cpu', opts.out, opts.update_results))}")
    return rows


if __name__ == "__main__":
    main()
