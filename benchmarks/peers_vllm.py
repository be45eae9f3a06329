"""Peer worker: vLLM's CPU build, offline ``LLM.generate`` in this process, greedy decoding.

Run by ``benchmarks.peers`` as ``<vLLM venv python> -m benchmarks.peers_vllm`` and driven over
:mod:`benchmarks.peers_protocol` (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in
this process, so its time is this process's time).

Two modes (``load`` option ``mode``):
- ``text``: each row's prompt is its task's prefix tokens followed by its own tokens, with automatic
  prefix caching. Before each timed run the prefix cache is emptied and refilled with the task
  prefixes alone, so every run finds the prefixes cached and its rows not (as the engine, which keeps
  the prefixes in its store and prefills the rows every run).
- ``embeds``: prompt tuning as vLLM serves it: each prompt is given as embeddings
  (``enable_prompt_embeds``); the prefix part is the prefix tokens' embedding vectors, so the tokens
  must agree with ``text``. vLLM computes the whole prompt every run.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from .peers_protocol import serve_peer  # noqa: E402


class Vllm:
    def __init__(self, request: dict):
        import torch
        import vllm
        self.torch, self.vllm = torch, vllm
        self.mode = request.get("mode", "text")
        if self.mode not in ("text", "embeds"):
            raise ValueError(f"mode: {self.mode!r}; allowed: 'text', 'embeds'")
        torch.set_num_threads(int(request["threads"]))
        kwargs = dict(model=request["model"], dtype=request.get("dtype", "float32"), seed=0,
                      max_model_len=int(request["max_model_len"]), max_num_seqs=int(request["max_rows"]),
                      enable_prefix_caching=self.mode == "text")
        if request.get("block_size"):
            kwargs["block_size"] = int(request["block_size"])
        if self.mode == "embeds":
            kwargs["enable_prompt_embeds"] = True
        self.llm = vllm.LLM(**kwargs)
        self.embedding = None
        if self.mode == "embeds":
            self.embedding = self._embedding_table(request["model"])

    def _embedding_table(self, folder: str):
        """The model's input embedding matrix, read from its safetensors files (no second model)."""
        from pathlib import Path

        from safetensors import safe_open
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    if name.endswith("embed_tokens.weight"):
                        return f.get_tensor(name).float()
        raise ValueError(f"model: no embed_tokens.weight in the safetensors files of {folder!r}")

    def info(self) -> dict:
        return {"vllm": self.vllm.__version__, "torch": self.torch.__version__, "mode": self.mode,
                "torch_threads": self.torch.get_num_threads()}

    def _prompts(self, prefixes, rows, tasks):
        if self.mode == "text":
            return [{"prompt_token_ids": list(prefixes[t]) + list(r)} for r, t in zip(rows, tasks)]
        dtype = self.llm.llm_engine.model_config.dtype
        return [{"prompt_embeds": self.embedding[self.torch.tensor(list(prefixes[t]) + list(r))].to(dtype)}
                for r, t in zip(rows, tasks)]

    def run(self, request: dict) -> dict:
        SamplingParams = self.vllm.SamplingParams
        n = int(request["new_tokens"])
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        prompts = self._prompts(request["prefixes"], request["rows"], request["tasks"])
        prefix_seconds = None
        if self.mode == "text":
            self.llm.reset_prefix_cache()
            start = time.perf_counter()
            self.llm.generate([{"prompt_token_ids": list(p)} for p in request["prefixes"] if p],
                              SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
            prefix_seconds = time.perf_counter() - start
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": seconds,
                "prefix_seconds": prefix_seconds}


def main() -> None:
    serve_peer(Vllm)


if __name__ == "__main__":
    main()
