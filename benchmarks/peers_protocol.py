"""The JSON-lines protocol between ``benchmarks.peers`` and its peer workers (standard library only).

Each peer (vLLM, llama.cpp) runs in its own process, usually under the python of its own virtual
environment, so that peers with clashing dependencies are still timed side by side in one run.
The driver writes one JSON object per line to the worker's stdin and reads one JSON line back:

- ``{"op": "load", ...options}`` -> ``{"ok": true, "info": {...}}`` (model loaded, warmed up once)
- ``{"op": "run", "prefixes": [[ids]...], "rows": [[ids]...], "tasks": [t...], "new_tokens": n}``
  -> ``{"ok": true, "tokens": [[ids]...], "seconds": s, ...}``: ``new_tokens`` greedy tokens per row,
  EOS ignored; row ``b`` follows the token prefix ``prefixes[tasks[b]]``; ``seconds`` is the
  worker's own wall time of the generation (the protocol's transfer is not counted).
- ``{"op": "quit"}`` -> the worker exits.

A failure answers ``{"ok": false, "error": "<traceback>"}`` and the worker keeps serving. Workers
write nothing else to the protocol stream: :func:`serve` moves file descriptor 1 to stderr first,
so what the peer's libraries print goes to the worker's log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, Optional


def serve(handlers: Dict[str, Callable[[dict], dict]]) -> None:
    """Answer requests from stdin until ``quit`` or end of input; ``handlers[op](request)`` -> reply."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                    # libraries' prints go to the log, not the protocol
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "quit":
                break
            if op not in handlers:
                raise ValueError(f"op: unknown operation {op!r}; allowed: {sorted(handlers)} or 'quit'")
            reply = {"ok": True, **handlers[op](request)}
        except Exception:                            # report to the driver, keep serving
            reply = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def serve_peer(peer_class) -> None:
    """A peer worker's main: ``load`` builds ``peer_class(request)`` (answering its ``info()``),
    ``run`` calls its ``run(request)``."""
    state = {}

    def load(request):
        state["peer"] = peer_class(request)
        return {"info": state["peer"].info()}

    serve({"load": load, "run": lambda request: state["peer"].run(request)})


class PeerError(RuntimeError):
    """A peer worker failed: its error (or exit) and the tail of its log."""


class PeerProcess:
    """Driver side: one worker process, started with ``python -m <module>`` from the repository root."""

    def __init__(self, name: str, python: str, module: str, log_path: Path, env: Optional[dict] = None):
        self.name = name
        self.log_path = Path(log_path)
        root = Path(__file__).resolve().parent.parent
        env = dict(env or {})
        extra = env.pop("PYTHONPATH", "")
        full_env = {**os.environ, **env}
        # only the benchmarks package is needed from this repository; the peer's venv has the rest
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), extra) if p)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, cwd=str(root), env=full_env, text=True, bufsize=1)

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def request(self, op: str, **fields) -> dict:
        """Send one request and wait for its reply; raises :class:`PeerError` on failure."""
        if self.proc.poll() is not None:
            raise PeerError(f"{self.name}: worker exited with code {self.proc.returncode}\n{self.log_tail()}")
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise PeerError(f"{self.name}: worker exited with code {self.proc.returncode} during {op!r}\n"
                            f"{self.log_tail()}")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise PeerError(f"{self.name}: {op!r} failed:\n{reply.get('error', '?')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()

