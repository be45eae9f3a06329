"""``python -m softprompt.server`` as a process: it loads a saved model folder and task files, serves,
and on SIGTERM stops accepting, lets requests in flight finish for the grace period, aborts the
rest with a reason, and exits 0."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from softprompt.server.runtime import free_port
from test_server_common import char_tokenizer, tiny_model, write_tasks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")


def _stream(url, body, out, first):
    """Read one streamed completion into ``out`` (tokens, finish reasons, error messages)."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["errors"].append(data["error"]["message"])
                for ch in data.get("choices", []):
                    out["tokens"] += ch["token_ids"]
                    if ch["finish_reason"]:
                        out["finish"] = ch["finish_reason"]
                first.set()
    except httpx.HTTPError as exc:
        out["errors"].append(repr(exc))
    finally:
        first.set()


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    write_tasks(model, tmp_path / "tasks")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "softprompt.server", "--model", str(tmp_path / "model"),
                             "--adapters", str(tmp_path / "tasks"), "--port", str(port), "--grace-period", "0.5",
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300             # imports take long on a busy machine
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "model"
        short, long = ({"tokens": [], "errors": [], "finish": None} for _ in range(2))
        started = [threading.Event(), threading.Event()]
        base = {"prompt": "go", "temperature": 0, "ignore_eos": True, "stream": True}
        threads = [threading.Thread(target=_stream, args=(url, {**base, "model": "task0", "max_tokens": 8},
                                                          short, started[0])),
                   threading.Thread(target=_stream, args=(url, {**base, "model": "task1", "max_tokens": 4000},
                                                          long, started[1]))]
        threads[1].start()
        assert started[1].wait(60)
        threads[0].start()
        assert started[0].wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert short["finish"] == "length" and len(short["tokens"]) == 8 and not short["errors"], short
    assert long["finish"] == "abort" and 0 < len(long["tokens"]) < 4000, {**long, "tokens": len(long["tokens"])}
    assert long["errors"] and "shutting down" in long["errors"][0] and "grace period" in long["errors"][0]
