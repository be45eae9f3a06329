"""A save killed at any instant (``kill -9``) leaves a folder that loads as the complete previous save
or the complete new one, never neither; the next save clears what killed saves left.

A child process (forked, so it does not re-import torch: 20 fresh interpreters would take a minute)
saves two distinguishable states into one folder in a loop; the test kills it with SIGKILL at a random
moment within about two saves, loads the folder and compares it with both states, 20 times. The old
layout (weights replaced first, JSON second) left an unloadable folder after most such kills.
"""
import os
import random
import signal
import time

import pytest
import torch

from softprompt import PrefixTuning, PTuningV2, SoftPromptModel
from test_integration_common import make_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

KILLS = 20


def _model(seed, names):
    spm = SoftPromptModel(make_model("llama"))
    torch.manual_seed(seed)
    for name in names:
        spm.add_task(name, PrefixTuning(8, projection_dim=32) if name == "a" else PTuningV2(6))
    return spm


def _state(spm):
    return {n: {k: v.detach().clone() for k, v in spm.prompts[n].state_dict().items()} for n in spm.tasks}


def _equal(a, b):
    return a.keys() == b.keys() and all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k])
                                                                            for k in a[n]) for n in a)


def _saver(directory, spms, ready_fd):
    """The child: save the states in turn, forever (until killed). Never returns into pytest."""
    try:
        torch.set_num_threads(1)              # the parent's thread pool does not survive fork
        os.write(ready_fd, b"r")
        while True:
            for spm in spms:
                spm.save(directory)
    finally:
        os._exit(1)


def test_kill_9_during_saves_never_loses_the_checkpoint(tmp_path):
    states = [_model(1, ["a"]), _model(2, ["a", "b"])]
    wanted = [_state(s) for s in states]
    assert not _equal(*wanted)
    directory = tmp_path / "ckpt"
    start = time.perf_counter()
    for spm in states:
        spm.save(directory)
    period = (time.perf_counter() - start) / len(states)       # one save, as measured here
    rng = random.Random(os.urandom(8))
    for kill in range(KILLS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _saver(directory, states, write_fd)
        os.close(write_fd)
        try:
            assert os.read(read_fd, 1) == b"r"
            time.sleep(rng.uniform(0, 2.5 * period))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
        try:
            got = _state(SoftPromptModel.load(make_model("llama"), directory))
        except ValueError as e:
            pytest.fail(f"kill {kill + 1}: the folder no longer loads: {e}; it holds "
                        f"{sorted(p.name for p in directory.iterdir())}")
        assert any(_equal(got, w) for w in wanted), f"kill {kill + 1}: the folder loads as neither saved state"
    # the next save leaves the manifest and one weights file: no temporaries, no older versions
    states[0].save(directory)
    assert sorted(p.name for p in directory.iterdir())[-1] == "softprompt.json"
    assert len(list(directory.iterdir())) == 2, sorted(p.name for p in directory.iterdir())
    assert _equal(_state(SoftPromptModel.load(make_model("llama"), directory)), wanted[0])
