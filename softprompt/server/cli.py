"""``softprompt serve``: an OpenAI-compatible HTTP server over the multi-task engine.

    softprompt serve --model smollm2 --adapters DIR [--host 127.0.0.1 --port 8000]
    python -m softprompt.server --model DIR --adapters DIR

``--model``: a HF model folder, or ``smollm2`` for the packaged SmolLM2-135M-Instruct.
``--adapters``: a softprompt checkpoint folder, a PEFT prompt-learning adapter folder, or a folder of
them and of ``<task>.safetensors`` K/V files; every task is a model id of the API.
Binds to 127.0.0.1 unless ``--host`` says otherwise. SIGTERM: stop accepting, let requests in flight
finish for ``--grace-period`` seconds, abort the rest with a reason, exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..cli_support import nonnegative_float, positive_int

API_KEY_ENV = "SOFTPROMPT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder, or 'smollm2'")
    p.add_argument("--adapters", help="folder of tasks to serve from the start")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint (default: ${API_KEY_ENV})")
    p.add_argument("--enable-adapter-loading", action="store_true",
                   help="allow POST /v1/load_adapter and /v1/unload_adapter")
    p.add_argument("--adapter-root", help="the only folder run-time adapter loads may read from")
    p.add_argument("--max-waiting", type=positive_int, default=256, help="queued requests beyond this get 429")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=4096)
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20)
    p.add_argument("--default-max-tokens", type=positive_int, default=256,
                   help="max_tokens of chat requests that give none")
    p.add_argument("--grace-period", type=nonnegative_float, default=30.0,
                   help="seconds requests in flight may go on after SIGTERM before they are aborted")
    p.add_argument("--max-batch-size", type=positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def load_model(name: str):
    """``(model, tokenizer, model id)`` for ``--model``."""
    if name == "smollm2":
        from ..assets import load_smollm2
        return (*load_smollm2(), "smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(name)
    if not (path / "config.json").exists():
        raise ValueError(f"--model {name!r} is not a model folder (no config.json) and not 'smollm2'")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), path.resolve().name


def serve_command(argv=None) -> int:
    """``softprompt serve``; raises on bad input (the CLI turns that into one line and exit 2)."""
    opts = build_parser().parse_args(argv)
    if opts.enable_adapter_loading and not opts.adapter_root:
        raise ValueError("--enable-adapter-loading needs --adapter-root DIR (the only folder adapters load from)")
    root = Path(opts.adapter_root) if opts.adapter_root else None
    if root is not None and not root.is_dir():
        raise ValueError(f"--adapter-root {opts.adapter_root!r} is not a folder")
    logging.basicConfig(level=opts.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from .config import ServerConfig
    from .runtime import build, run
    model, tokenizer, model_id = load_model(opts.model)
    config = ServerConfig(model_id=model_id, api_key=opts.api_key or os.environ.get(API_KEY_ENV) or None,
                          adapter_root=root, enable_adapter_loading=opts.enable_adapter_loading,
                          max_waiting=opts.max_waiting, max_prompt_tokens=opts.max_prompt_tokens,
                          max_body_bytes=opts.max_body_bytes, default_max_tokens=opts.default_max_tokens,
                          grace_s=opts.grace_period)
    app, worker = build(model, tokenizer, config, opts.adapters, max_batch_size=opts.max_batch_size,
                        max_num_batched_tokens=opts.max_num_batched_tokens)
    logging.getLogger(__name__).info("serving %s and tasks %s on http://%s:%d", model_id, worker.tasks,
                                     opts.host, opts.port)
    run(app, worker, opts.host, opts.port, config.grace_s, opts.log_level)
    return 0


def main(argv=None) -> int:
    from ..cli_support import run_command
    return run_command("softprompt serve", serve_command, argv)
