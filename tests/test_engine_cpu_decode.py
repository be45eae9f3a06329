"""The engine's CPU decode path: DecodeAttention against the reference backend on fresh random
inputs, CpuDecoder's decode step against the HF forward of the same step, and which models it takes."""
import random

import pytest
import torch

from softprompt.kernels import prefix_attention
from softprompt.engine import cpu_kernel
from softprompt.engine.cpu_decode import CpuDecoder, unsupported_reason
from softprompt.engine.decode_attention import DecodeAttention, split_by_length
from test_engine_common import attach, engine, greedy, one_thread, random_rows, setup

_threads = pytest.fixture(autouse=True)(one_thread)


def _problem(seed, *, B, T, Hq, Hkv, Skv, D, block_size, lens, tasks=None):
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    blocks = [-(-p // block_size) for p in lens]
    order = list(range(sum(blocks) + 2))
    rnd.shuffle(order)                                    # each task's blocks scattered in the pool
    table = torch.full((T, max(blocks + [1])), -1, dtype=torch.long)
    at = 0
    for t, n in enumerate(blocks):
        table[t, :n] = torch.tensor(order[at:at + n])
        at += n
    pool_k = torch.randn(len(order), Hkv, block_size, D, generator=g)
    pool_v = torch.randn(len(order), Hkv, block_size, D, generator=g)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, D, generator=g)
    task_ids = torch.tensor(tasks if tasks is not None else [rnd.randrange(T) for _ in range(B)])
    own = torch.tensor([rnd.randint(1, Skv) for _ in range(B)])
    return q, k, v, pool_k, pool_v, table, torch.tensor(lens), task_ids, own


CASES = {
    # tasks unsorted, an empty prefix, two tasks of one length (stacked into one call)
    "mixed": dict(B=9, T=4, Hq=6, Hkv=2, Skv=11, D=16, block_size=4, lens=[5, 0, 9, 5]),
    # rows sorted by task in equal groups: the prefix rows are a slice, not a gather
    "sorted_groups": dict(B=8, T=3, Hq=4, Hkv=1, Skv=7, D=8, block_size=3, lens=[4, 7, 4],
                          tasks=[0, 0, 2, 2, 1, 1, 1, 1]),
    "mha_odd_dim": dict(B=5, T=2, Hq=3, Hkv=3, Skv=6, D=13, block_size=2, lens=[3, 1]),
    "every_row_own_task": dict(B=4, T=4, Hq=4, Hkv=2, Skv=5, D=8, block_size=4, lens=[2, 6, 1, 3],
                               tasks=[3, 1, 0, 2]),
}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_attention_matches_reference(name, window, seed):
    c = CASES[name]
    q, k, v, pk, pv, table, lens, tids, own = _problem(seed, **c)
    B, Hq, Hkv, Skv, D = c["B"], c["Hq"], c["Hkv"], c["Skv"], c["D"]
    scale = D ** -0.5
    want = prefix_attention(q, k, v, pk, pv, table, lens, tids, causal=False, scale=scale,
                            kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), window=window,
                            backend="reference")                               # [B, Hq, 1, D]
    token_major = [t.transpose(1, 2).reshape(B, Skv, Hkv * D) for t in (k, v)]   # the gathered layout
    # one part, and the rows split by length into two (right-aligned in their own widths)
    splits = [None, split_by_length(own, Skv, min_saving=0.0)]
    for parts in splits:
        attention = DecodeAttention(tids, table, lens, c["block_size"], own, Skv, num_kv_heads=Hkv,
                                    group_size=Hq // Hkv, scale=scale, window=window, parts=parts)
        own_kv = [token_major] if parts is None else \
            [[t.index_select(0, rows)[:, Skv - width:] for t in token_major] for rows, width in parts]
        got = attention(q.view(B, Hkv, Hq // Hkv, D), own_kv, pk, pv)
        torch.testing.assert_close(got.reshape(B, Hq, 1, D), want, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{name} (seed {seed}, window {window}, parts {parts}): {m}")
    no_prefix = DecodeAttention(None, table, lens, c["block_size"], own, Skv, num_kv_heads=Hkv,
                                group_size=Hq // Hkv, scale=scale, window=window)
    want = prefix_attention(q, k, v, pk, pv, table[:1, :0], lens[:1] * 0, tids * 0, causal=False, scale=scale,
                            kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), window=window,
                            backend="reference")
    got = no_prefix(q.view(B, Hkv, Hq // Hkv, D), [token_major], pk, pv)
    torch.testing.assert_close(got.reshape(B, Hq, 1, D), want, atol=2e-5, rtol=1e-4)


def test_split_by_length_parts_cover_every_row_once():
    own = torch.tensor([3, 40, 5, 38, 4, 2, 39, 6])
    parts = split_by_length(own, 40)
    assert len(parts) == 2
    rows = torch.cat([r for r, _ in parts]).sort().values
    assert rows.tolist() == list(range(8))
    (short, width), (long_, full) = parts
    assert full == 40 and width == int(own[short].max()) == 6 and set(long_.tolist()) == {1, 3, 6}
    assert split_by_length(torch.tensor([38, 40, 39]), 40) == [(None, 40)]      # too little to save


def test_decode_attention_rejects_rows_without_own_keys():
    with pytest.raises(ValueError, match="own_lens"):
        DecodeAttention(None, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4,
                        torch.tensor([0, 3]), 3, num_kv_heads=1, group_size=1, scale=1.0)


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
    through the compiled kernel and through torch ops (DecodeAttention)."""
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
