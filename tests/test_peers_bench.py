"""benchmarks.peers without any peer installed: the engine-only run, the worker protocol with a fake
peer, the skip messages and the report's ratios. (The real peers, vLLM and llama.cpp, live in their
own virtual environments and are never needed here.)"""
import sys
import textwrap

import pytest

from benchmarks import peers
from benchmarks.peers_protocol import PeerError, PeerProcess

FAKE_PEER = textwrap.dedent('''
    import os, sys
    from benchmarks.peers_protocol import serve

    def run(request):
        print("noise on stdout must not reach the protocol")
        n = request["new_tokens"]
        # token j of row b: its task's first prefix token + j (a deterministic stand-in for decoding)
        tokens = [[request["prefixes"][t][0] + j for j in range(n)] for t in request["tasks"]]
        return {"tokens": tokens, "seconds": 0.5, "prefix_seconds": 0.25}

    def boom(request):
        raise ValueError("boom: " + request["why"])

    def die(request):
        sys.stderr.write("dying on purpose\\n")
        sys.stderr.flush()
        os._exit(3)

    serve({"load": lambda r: {"info": {"fake": True, "threads": r["threads"]}}, "run": run, "boom": boom,
           "die": die})
''')


@pytest.fixture
def fake_peer(tmp_path):
    (tmp_path / "fake_peer.py").write_text(FAKE_PEER)
    procs = []

    def start(name="fake"):
        proc = PeerProcess(name, sys.executable, "fake_peer", tmp_path / f"{name}.log",
                           env={"PYTHONPATH": str(tmp_path)})
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()


def test_engine_only_run_without_peers(capsys):
    assert peers.main(["--model", "tiny", "--tasks", "3", "--per-task", "2", "--prefix-len", "5",
                       "--new-tokens", "3", "--repeats", "1", "--pause", "0", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "peers: skipped" in out
    engine_row = next(line for line in out.splitlines() if line.startswith(f"| {peers.ENGINE} |"))
    assert "| fp32 |" in engine_row and "100.0% (6/6 rows identical)" in engine_row


def test_missing_peers_are_skipped_with_a_reason(tmp_path, capsys):
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    assert "does not exist" in peers.has_module(missing, "vllm")
    assert "has no" in peers.has_module(sys.executable, "no_such_module_for_peers")
    assert peers.has_module(sys.executable, "json") is None
    opts = peers.parse(["--vllm-python", missing, "--llamacpp-python", missing])
    assert peers.peers(opts, model=None, workload={"prefixes": [[1]], "rows": [[2]], "tasks": [0]},
                       log_dir=tmp_path) == []
    out = capsys.readouterr().out
    assert "vLLM: skipped" in out and "llama.cpp: skipped" in out and missing in out


def test_protocol_round_trip_errors_and_exit(fake_peer):
    peer = fake_peer()
    assert peer.request("load", threads=2)["info"] == {"fake": True, "threads": 2}
    reply = peer.request("run", prefixes=[[10], [20]], rows=[[1], [2], [3]], tasks=[0, 1, 0], new_tokens=3)
    assert reply["tokens"] == [[10, 11, 12], [20, 21, 22], [10, 11, 12]] and reply["seconds"] == 0.5
    with pytest.raises(PeerError, match="boom: on purpose"):
        peer.request("boom", why="on purpose")
    with pytest.raises(PeerError, match="unknown operation 'nope'"):
        peer.request("nope")
    assert peer.request("run", prefixes=[[5]], rows=[[1]], tasks=[0], new_tokens=1)["tokens"] == [[5]]
    with pytest.raises(PeerError, match=r"(?s)exited with code 3.*dying on purpose"):
        peer.request("die")
    with pytest.raises(PeerError, match="exited with code 3"):
        peer.request("run", prefixes=[[5]], rows=[[1]], tasks=[0], new_tokens=1)


def test_interleaved_rounds_and_report_against_a_fake_peer(fake_peer, tmp_path, monkeypatch):
    workload = {"prefixes": [[10], [20]], "rows": [[1], [2], [3], [4]], "tasks": [0, 1, 0, 1]}
    monkeypatch.setattr(peers, "PeerProcess", lambda name, python, module, log, env=None: fake_peer(name))
    peer = peers.peer_system("fake peer", "fp32", sys.executable, "fake_peer", tmp_path, workload, {"threads": 1})
    calls = []

    def engine_run(n):
        calls.append(n)
        tokens = [[workload["prefixes"][t][0] + j for j in range(n)] for t in workload["tasks"]]
        tokens[0][-1] = -1                                  # one token of 16 differs from the peer
        return tokens

    engine = peers.System(peers.ENGINE, "fp32", engine_run)
    peers.interleaved([engine, peer], new_tokens=4, repeats=3, pause=0)
    assert calls == [2, 4, 4, 4]                            # warm-up with 2 tokens, then 3 timed rounds
    assert len(engine.times) == 3 and peer.times == [0.5, 0.5, 0.5] and peer.prefix_seconds == 0.25
    rows, summary = peers.report([engine, peer], made=16)
    by_name = {r["system"]: r for r in rows}
    assert by_name["fake peer"]["tokens/s (median)"] == "32.0"
    assert by_name["fake peer"]["vs best fp32 peer"] == "1.00x"
    assert by_name["fake peer"]["tokens = engine"] == "93.8% (3/4 rows identical)"
    assert by_name["fake peer"]["prefixes computed once (s)"] == "0.25"
    assert summary.startswith("engine ") and "(fake peer)" in summary


def test_a_peer_failing_mid_run_is_dropped_and_the_rest_go_on(capsys):
    def failing(n):
        raise PeerError("broken peer: out of memory")

    closed = []
    engine = peers.System(peers.ENGINE, "fp32", lambda n: [[0] * n])
    broken = peers.System("broken", "fp32", failing, close=lambda: closed.append(True))
    systems = [engine, broken]
    peers.interleaved(systems, new_tokens=3, repeats=2, pause=0)
    assert systems == [engine] and len(engine.times) == 2 and closed == [True]
    assert "broken (fp32) failed, dropped" in capsys.readouterr().out
