"""``softprompt serve``: an OpenAI-compatible HTTP server over the multi-task engine.

Modules: ``config`` (ServerConfig), ``schemas`` (pydantic request bodies), ``errors`` (OpenAI error
bodies, auth, body limit), ``adapters`` (the served tasks: start-up and run-time loads), ``worker``
(the thread that owns the engine), ``metrics`` (Prometheus), ``generation`` (fan-out / fan-in,
server-sent events), ``app`` (routes), ``runtime`` (build and run), ``cli`` (the command).
Needs the ``serve`` extra: ``pip install 'softprompt[serve]'``.
"""
from .config import ServerConfig
from .runtime import ServerThread, build, run

__all__ = ["ServerConfig", "ServerThread", "build", "run"]
