"""Data-parallel training (2 CPU processes, gloo, under torchrun) equals the single-process run on
the same global batch: the prompt parameters after a few steps agree to 1e-6."""
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["a=p_tuning_v2", "b=prompt_tuning", "c=prefix_tuning"]


def _data(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ids = [rng.randint(5, 500) for _ in range(rng.randint(3, 9))]
            f.write(json.dumps({"prompt_ids": ids, "target_ids": [ids[0] % 7 + 10]}) + "\n")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp: Path, out: str, batch: int):
    tasks = [f"{t}:{_data(tmp / (t[0] + '.jsonl'), 12, i)}" for i, t in enumerate(TASKS)]
    argv = ["--model", "tiny", "--steps", "3", "--batch-size", str(batch), "--lr", "0.5", "--optimizer", "sgd", "--max-grad-norm", "0", "--tokens", "4",
            "--projection-dim", "8", "--output-dir", out, "--resume", "none", "--logging-steps", "1", "--no-progress"]
    for t in tasks:
        argv += ["--task", t]
    return argv


def _prompts(directory) -> dict:
    import json

    from safetensors.torch import load_file
    final = Path(directory) / "final"
    weights = json.loads((final / "softprompt.json").read_text())["weights"]      # the manifest names them
    return load_file(str(final / weights))


def test_ddp_two_processes_equal_single_process(tmp_path):
    pytest.importorskip("accelerate")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    ddp_out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "softprompt.training", *_args(tmp_path, ddp_out, 2)]
    ddp = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile, the same run in this process with the whole global batch (2 x 2) at once
    from softprompt.training import train_command
    single_out = str(tmp_path / "single")
    torch.set_num_threads(1)
    assert train_command(_args(tmp_path, single_out, 4)) == 0

    log, _ = ddp.communicate(timeout=240)
    assert ddp.returncode == 0, log[-4000:]
    assert "on 2 process(es)" in log, log[-2000:]
    single, multi = _prompts(single_out), _prompts(ddp_out)
    assert single.keys() == multi.keys() and len(single) >= 3
    moved = 0.0
    for key in single:
        assert torch.allclose(single[key], multi[key], atol=1e-6, rtol=0), (key, (single[key] - multi[key]).abs().max())
        moved = max(moved, float(single[key].abs().max()))
    assert moved > 0            # the prompts did train (zero-initialised ones moved away from 0)
