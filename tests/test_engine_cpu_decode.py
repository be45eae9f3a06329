"""The engine's CPU forwards: CpuDecoder's decode step and packed prefill against the HF forward of
the same step (attention on the compiled and on the torch backend), and which models it takes.
The attention itself is checked against ``reference`` through plan/run in test_plan.py,
test_fuzz_attention.py and test_engine_cpu_kernel.py."""
import pytest
import torch

from softprompt.engine import cpu_kernel
from softprompt.engine.cpu_decode import CpuDecoder, unsupported_reason
from test_engine_common import attach, engine, greedy, one_thread, random_rows, setup

_threads = pytest.fixture(autouse=True)(one_thread)


def _fast_then_hf(eng, model, fast, args, hf_batches):
    """Run the CpuDecoder call ``fast(*args)``, put the KV pages back as they were, run the HF
    forward of each ``(ids, cache, task_ids)`` batch, and check logits and written K/V agree."""
    k0, v0 = eng.kv.k.clone(), eng.kv.v.clone()
    got = fast(*args)
    k1, v1 = eng.kv.k.clone(), eng.kv.v.clone()
    eng.kv.k.copy_(k0)
    eng.kv.v.copy_(v0)
    for (ids, cache, task_ids), logits in zip(hf_batches, got if isinstance(got, list) else [got]):
        out = model(input_ids=ids, attention_mask=cache.attention_mask, position_ids=cache.position_ids,
                    cache=cache, use_cache=True, task_ids=task_ids, logits_to_keep=1)
        torch.testing.assert_close(logits, out.logits[:, -1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k1, eng.kv.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, eng.kv.v, atol=1e-5, rtol=1e-5)
    return got


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decode_step_equals_hf_forward(family, compiled):
    """Run a mixed-task engine; at every decode step compare CpuDecoder's logits and the K/V it
    writes with the HF forward of the same step (same StepCache, same pages), with the attention
    through the compiled backend and through the torch backend."""
    if compiled and cpu_kernel.load() is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_kernel.unavailable_reason()}")
    model, prefixes, names = setup(family, lengths=[5, 2, 0, 7])
    attach(model, prefixes)
    eng = engine(model)
    decoder = eng.cpu_decoder
    assert decoder is not None
    decoder.compiled_attention = compiled
    assert decoder._use_kernel() == compiled
    fast_step, checked = decoder.step, []

    def both(token_ids, cache, task_ids):
        checked.append(len(token_ids))
        return _fast_then_hf(eng, model, fast_step, (token_ids, cache, task_ids),
                             [(token_ids[:, None], cache, task_ids)])

    decoder.step = both
    rows = random_rows([6, 3, 9, 4, 5])
    tasks = [names[0], names[1], None, names[3], names[0]]
    results = eng.generate(rows, tasks, greedy(4))
    assert all(r.ok for r in results) and checked and max(checked) == len(rows)


def test_which_models_take_the_cpu_decoder():
    for family in ("llama", "qwen2", "mistral"):
        model, _, _ = setup(family)
        assert unsupported_reason(model) is None, family
    for family in ("gpt2", "gpt_neox", "gemma2"):
        model, _, _ = setup(family)
        assert unsupported_reason(model) is not None, family
        with pytest.raises(ValueError, match="not supported"):
            CpuDecoder(model, None, None)
        softprompt_store = attach(model, {})
        assert engine(model).cpu_decoder is None, family
        assert softprompt_store is not None
    model, prefixes, _ = setup("llama")
    attach(model, prefixes)
    assert engine(model).cpu_decoder is not None
    assert engine(model, cpu_decoder=False).cpu_decoder is None
    with pytest.raises(ValueError, match="cpu_decoder"):
        engine(model, cpu_decoder="yes")


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_prefill_equals_hf_forward(family, compiled):
    """The step's prefills in one packed CpuDecoder forward (several length groups, a chunked
    prompt) give the logits and the K/V of the HF forward of each group, with the attention
    through the compiled kernel (where it builds) and through torch ops."""
    model, prefixes, names = setup(family, lengths=[5, 2, 0, 7])
    attach(model, prefixes)
    eng = engine(model, max_num_batched_tokens=24, prefill_padding=0.0)   # chunks and several groups
    decoder = eng.cpu_decoder
    decoder.compiled_attention = compiled and decoder.compiled_attention
    fast_prefill, checked = decoder.prefill, []

    def both(parts):
        checked.append(len(parts))
        return _fast_then_hf(eng, model, fast_prefill, (parts,), [(ids, cache, t) for cache, ids, t in parts])

    decoder.prefill = both
    rows = random_rows([6, 3, 17, 4, 9, 2])
    tasks = [names[0], names[1], None, names[3], names[0], names[2]]
    results = eng.generate(rows, tasks, greedy(3))
    assert all(r.ok for r in results) and max(checked) > 1 and len(checked) > 1
