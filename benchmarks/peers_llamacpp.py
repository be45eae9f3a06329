"""Peer worker: llama.cpp through llama-cpp-python's low-level API, batched greedy decoding.

Run by ``benchmarks.peers`` as ``<llama.cpp venv python> -m benchmarks.peers_llamacpp`` and driven
over :mod:`benchmarks.peers_protocol`. Needs only ``llama_cpp`` and ``numpy`` (no torch).

One context with a KV stream per sequence (``kv_unified=False``): sequences ``0..T-1`` hold each
task's prefix, computed once when the prefixes are first seen (llama.cpp's equivalent of a prefix
cache; its time is reported as ``prefix_seconds``); a run copies a task's prefix stream into each of
its rows' streams with ``llama_memory_seq_cp``, prefills all rows' prompts in one batch and then
decodes one token per row per ``llama_decode``, taking the argmax of the logits (EOS ignored).
"""
from __future__ import annotations

import time

import numpy as np

from .peers_protocol import serve_peer

GGML_TYPES = {"f32": 0, "f16": 1}


class LlamaCpp:
    def __init__(self, request: dict):
        import llama_cpp as lc
        self.lc = lc
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(request["model"].encode(), mparams)
        if not self.model:
            raise ValueError(f"model: llama.cpp could not load {request['model']!r}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.threads = int(request["threads"])
        self.kv_type = request.get("kv_type", "f32")
        self.ctx = None
        self.key = None               # (prefixes, max_rows, ctx_per_seq) the context was made for
        self.prefix_seconds = None

    def info(self) -> dict:
        return {"llama_cpp": self.lc.__version__, "kv_cache": self.kv_type,
                "system_info": self.lc.llama_print_system_info().decode(errors="replace").strip()}

    def _context(self, n_seqs: int, ctx_per_seq: int):
        lc = self.lc
        if self.ctx is not None:
            lc.llama_free(self.ctx)
        p = lc.llama_context_default_params()
        p.n_ctx = n_seqs * ctx_per_seq
        p.n_seq_max = n_seqs
        p.n_batch = 8192
        p.n_ubatch = 512
        p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = GGML_TYPES[self.kv_type]
        p.kv_unified = False
        p.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_seqs} x {ctx_per_seq} positions")
        self.mem = lc.llama_get_memory(self.ctx)

    def _decode(self, items):
        """One ``llama_decode`` of ``items`` = [(token, pos, seq, wants_logits)]."""
        lc = self.lc
        batch = lc.llama_batch_init(len(items), 0, 1)
        try:
            for i, (tok, pos, seq, out) in enumerate(items):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if out else 0
            batch.n_tokens = len(items)
            rc = lc.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(items)} tokens")
        finally:
            lc.llama_batch_free(batch)

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def run(self, request: dict) -> dict:
        prefixes, rows, tasks = request["prefixes"], request["rows"], request["tasks"]
        new_tokens = int(request["new_tokens"])
        T, B = len(prefixes), len(rows)
        ctx_per_seq = max(len(p) for p in prefixes) + max(len(r) for r in rows) + new_tokens
        ctx_per_seq = -(-ctx_per_seq // 256) * 256
        key = (tuple(map(tuple, prefixes)), B, ctx_per_seq)
        if key != self.key:                          # new prefixes: compute them once, keep them
            self._context(T + B, ctx_per_seq)
            start = time.perf_counter()
            for t, ids in enumerate(prefixes):
                self._decode([(tok, pos, t, False) for pos, tok in enumerate(ids)])
            self.lc.llama_synchronize(self.ctx)
            self.prefix_seconds = time.perf_counter() - start
            self.key = key
        lc = self.lc
        start = time.perf_counter()
        items, last = [], []
        for b, (ids, t) in enumerate(zip(rows, tasks)):
            seq = T + b
            lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
            lc.llama_memory_seq_cp(self.mem, t, seq, -1, -1)
            P = len(prefixes[t])
            items += [(tok, P + i, seq, i == len(ids) - 1) for i, tok in enumerate(ids)]
            last.append(len(items) - 1)
        self._decode(items)
        out = [[self._argmax(i)] for i in last]
        pos = [len(prefixes[t]) + len(r) for r, t in zip(rows, tasks)]
        for step in range(1, new_tokens):
            self._decode([(out[b][-1], pos[b] + step - 1, T + b, True) for b in range(B)])
            for b in range(B):
                out[b].append(self._argmax(b))
        seconds = time.perf_counter() - start
        return {"tokens": out, "seconds": seconds, "prefix_seconds": self.prefix_seconds}


def main() -> None:
    serve_peer(LlamaCpp)


if __name__ == "__main__":
    main()
