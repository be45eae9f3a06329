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
    # equal_nan: pages no step wrote hold whatever the pool was allocated with (NaN bit patterns too)
    torch.testing.assert_close(k1, eng.kv.k, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(v1, eng.kv.v, atol=1e-5, rtol=1e-5, equal_nan=True)
    return got


def _check_every_call(eng, model, name, hf_batches):
    """Make every call of the CpuDecoder method ``name`` (``step`` or ``prefill``) of ``eng`` run
    against the HF forward of ``hf_batches(*args)``; returns the size of each call (its first
    argument's length) and the mismatches found. The engine retries a failing forward on halves of
    its rows, so a mismatch raised inside a call must be recorded, not only raised."""
    fast, checked, failures = getattr(eng.cpu_decoder, name), [], []

    def both(*args):
        checked.append(len(args[0]))
        try:
            return _fast_then_hf(eng, model, fast, args, hf_batches(*args))
        except AssertionError as exc:
            failures.append((len(args[0]), exc))
            raise

    setattr(eng.cpu_decoder, name, both)
    return checked, failures


def _check_every_decode_step(eng, model):
    return _check_every_call(eng, model, "step", lambda ids, cache, tasks: [(ids[:, None], cache, tasks)])


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
    checked, failures = _check_every_decode_step(eng, model)
    rows = random_rows([6, 3, 9, 4, 5])
    tasks = [names[0], names[1], None, names[3], names[0]]
    results = eng.generate(rows, tasks, greedy(4))
    assert not failures, failures[0]
    assert all(r.ok for r in results) and checked and max(checked) == len(rows)


@pytest.mark.parametrize("rows", [1, 3, 8, 12, 15, 30])
def test_decode_step_equals_hf_forward_at_every_column_layout(rows):
    """Decode batches whose size takes each product layout of small_gemm.decode_columns (a GEMV,
    a token-major operand, extra zero columns up to 16 or 32): same logits and K/V as HF."""
    if cpu_kernel.load() is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_kernel.unavailable_reason()}")
    model, prefixes, names = setup("llama", lengths=[5, 2, 0, 7])
    attach(model, prefixes)
    eng = engine(model, max_batch_size=32)
    checked, failures = _check_every_decode_step(eng, model)
    tasks = [names[i % 4] if i % 5 else None for i in range(rows)]
    results = eng.generate(random_rows([3 + i % 7 for i in range(rows)]), tasks, greedy(3))
    assert not failures, failures[0]
    assert all(r.ok for r in results) and checked and max(checked) == rows


def test_decode_columns_and_operand_layout():
    from softprompt.engine.small_gemm import COLUMN_MULTIPLE, decode_columns, feature_major_operand
    for rows in range(1, 200):
        columns = decode_columns(rows)
        assert columns == rows or (columns > rows and columns % COLUMN_MULTIPLE == 0
                                   and columns - rows < COLUMN_MULTIPLE)
    assert [decode_columns(r) for r in (1, 2, 8, 12, 16, 17, 30, 64)] == [1, 2, 8, 16, 16, 17, 32, 64]
    x = torch.randn(7, 5)
    y = feature_major_operand(x)
    assert torch.equal(y, x) and y.stride() == (1, 7)           # same values, token-major memory
    assert feature_major_operand(x[:, :1]).stride() == x[:, :1].stride()


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
    checked, failures = _check_every_call(eng, model, "prefill",
                                          lambda parts: [(ids, cache, t) for cache, ids, t in parts])
    rows = random_rows([6, 3, 17, 4, 9, 2])
    tasks = [names[0], names[1], None, names[3], names[0], names[2]]
    results = eng.generate(rows, tasks, greedy(3))
    assert not failures, failures[0]
    assert all(r.ok for r in results) and max(checked) > 1 and len(checked) > 1
