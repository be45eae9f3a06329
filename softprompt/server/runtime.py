"""Putting a server together and running it: model + tasks → engine → worker → app → uvicorn.

``run`` serves in the foreground with the SIGTERM policy (stop accepting, let requests in flight
finish for the grace period, abort the rest with a reason, exit cleanly); ``ServerThread`` runs
one in a background thread of this process (tests, benchmarks).
"""
from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import uvicorn

from ..engine import Engine
from .adapters import Adapters
from .app import create_app
from .config import ServerConfig
from .metrics import ServerMetrics
from .worker import EngineWorker

SHUTDOWN_SLACK_S = 5.0      # after the grace period, time for aborted streams to send their last chunk
KEEP_ALIVE_S = 30           # idle keep-alive connections close after this (uvicorn's 5 s races busy clients'
                            # next request on the same connection: "server disconnected without a response")


def build(model, tokenizer, config: ServerConfig, adapters_dir: Optional[Path] = None, **engine_kwargs):
    """``(app, worker)`` serving ``model`` with the tasks of ``adapters_dir``; start the worker
    (``worker.start()``) before the first request, stop it (``worker.stop()``) after the last."""
    model.eval()
    adapters = Adapters(model, config.model_id)
    if adapters_dir is not None:
        adapters.load_dir(Path(adapters_dir))
    engine = Engine(model, tokenizer, **engine_kwargs)
    worker = EngineWorker(engine, adapters, ServerMetrics(), max_waiting=config.max_waiting,
                          max_prompt_tokens=config.max_prompt_tokens)
    return create_app(worker, config), worker


class _Server(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT also drains the engine worker."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace_s: float):
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.worker.accepting:
            self.worker.drain(self.grace_s)
        super().handle_exit(sig, frame)


def uvicorn_config(app, host: str, port: int, grace_s: float, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=int(grace_s + SHUTDOWN_SLACK_S) + 1)


def run(app, worker: EngineWorker, host: str, port: int, grace_s: float, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT; returns once requests in flight finished or were aborted.

    uvicorn re-raises the signal that stopped it to the handler that was there before; SIGTERM's
    is a no-op here, so a drained server returns normally (exit 0). SIGINT still interrupts."""
    worker.start()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        _Server(uvicorn_config(app, host, port, grace_s, log_level), worker, grace_s).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        worker.drain(0.0)
        deadline = time.monotonic() + SHUTDOWN_SLACK_S
        while worker.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server on ``127.0.0.1:<free port>`` in a background thread: ``start()``, ``url``, ``stop()``."""

    def __init__(self, app, worker: EngineWorker, host: str = "127.0.0.1", port: Optional[int] = None,
                 grace_s: float = 5.0):
        self.worker, self.host = worker, host
        self.port = port or free_port(host)
        self.server = _Server(uvicorn_config(app, host, self.port, grace_s, "warning"), worker, grace_s)
        self.thread = threading.Thread(target=self.server.run, name="softprompt-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.worker.start()
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.worker.drain(0.0)
        self.server.should_exit = True
        self.thread.join(30)
        self.worker.stop()
