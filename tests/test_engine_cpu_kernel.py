"""The compiled backend (the C++ op ``softprompt::prefix_paged_attention``) in the engine's shapes,
through plan/run against the reference backend on fresh random inputs: decode steps and causal
prefills with own tokens in scattered pages, prefixes in scattered blocks, tasks with many rows
(several prefix tiles), long rows; its off-switch and build fallback; the op's own checks. The CPU
decoder's steps and prefills through it are checked against the HF forward in
test_engine_cpu_decode.py."""
import os
import time

import pytest
import torch

from paging import paged
from softprompt.engine.cpu_decode import CpuDecoder
from softprompt.kernels import compiled_build, plan_prefix_attention, prefix_attention
from test_engine_common import attach, engine, setup

pytestmark = pytest.mark.skipif(compiled_build.load() is None,
                                reason=f"compiled backend unavailable: {compiled_build.unavailable_reason()}")
TOL = dict(atol=2e-5, rtol=1e-4)


def _problem(seed, *, B, T, Hq, Hkv, D, Sq, past, new, prefix_lens, block_size, tasks, scale=1.0):
    """Rows with ``past[b]`` cached and ``new[b]`` new tokens (queries first in the batch layout),
    their task prefixes in shuffled blocks. Returns (q, k, v, prefix_k, prefix_v, table, lens, tasks), kw."""
    g = torch.Generator().manual_seed(seed)
    past, new = torch.tensor(past), torch.tensor(new)
    kv_lens = past + new
    Skv = int(kv_lens.max())
    blocks = [-(-p // block_size) for p in prefix_lens]
    order = torch.randperm(sum(blocks) + 2, generator=g)
    table = torch.full((T, max(blocks + [1])), -1, dtype=torch.long)
    at = 0
    for t, n in enumerate(blocks):
        table[t, :n] = order[at:at + n]
        at += n
    randn = lambda *shape: torch.randn(*shape, generator=g) * scale      # noqa: E731
    args = (randn(B, Hq, Sq, D), randn(B, Hkv, Skv, D), randn(B, Hkv, Skv, D),
            randn(len(order), Hkv, block_size, D), torch.randn(len(order), Hkv, block_size, D, generator=g),
            table, torch.tensor(prefix_lens), torch.tensor(tasks))
    return args, dict(causal=True, q_lens=new, kv_lens=kv_lens)


def _check(args, kw, page_size, seed, **plan_kw):
    """The compiled backend over paged own keys against the reference backend over dense ones."""
    q, k, v, pk, pv = args[:5]
    (kpool, vpool), pages = paged(k, v, kw["kv_lens"], page_size, seed, junk_tail=True)
    plan = plan_prefix_attention(*args[5:], **kw, **plan_kw, num_q_heads=q.shape[1], num_kv_heads=k.shape[1],
                                 head_dim=q.shape[3], q_len=q.shape[2], kv_len=k.shape[2], num_blocks=pk.shape[0],
                                 block_size=pk.shape[2], own_page_table=pages, own_page_size=page_size,
                                 own_num_pages=kpool.shape[0], backend="compiled")
    want = prefix_attention(*args, **kw, **plan_kw, backend="reference")
    torch.testing.assert_close(plan.run(q, kpool, vpool, pk, pv), want, **TOL)


ENGINE_SHAPES = {
    # one query per row: tasks unsorted, an empty prefix, rows of 1..11 own tokens
    "decode": dict(B=9, T=4, Hq=6, Hkv=2, D=16, Sq=1, past=[4, 0, 10, 2, 7, 3, 0, 5, 9], new=[1] * 9,
                   prefix_lens=[5, 0, 9, 5], block_size=4, tasks=[2, 0, 1, 3, 2, 0, 3, 1, 2]),
    # a step's prefills: rows with earlier tokens cached, new tokens counting up (causal)
    "prefill": dict(B=4, T=3, Hq=6, Hkv=2, D=13, Sq=5, past=[0, 3, 7, 1], new=[5, 2, 5, 1],
                    prefix_lens=[6, 3, 0], block_size=4, tasks=[0, 2, 1, 0]),
}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("shape", list(ENGINE_SHAPES))
def test_engine_shaped_steps_match_reference(shape, page_size, window, threads, seed):
    args, kw = _problem(seed, **ENGINE_SHAPES[shape])
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(args, kw, page_size, seed, window=window, scale=args[0].shape[-1] ** -0.5)
    finally:
        torch.set_num_threads(saved)


def test_tasks_of_many_rows_long_prefixes_and_large_scores(seed):
    """Tasks whose rows span several prefix tiles (64 query rows each), prefixes of hundreds of
    rows over many blocks, own rows over many pages, scores far from zero (the exp range reduction)."""
    B = 40
    past = [(7 * b) % 150 for b in range(B)]
    args, kw = _problem(seed, B=B, T=3, Hq=8, Hkv=2, D=32, Sq=1, past=past, new=[1] * B,
                        prefix_lens=[300, 17, 0], block_size=16, tasks=[b % 3 if b < 30 else 0 for b in range(B)],
                        scale=3.0)
    _check(args, kw, 16, seed)
    prefill, kw = _problem(seed, B=3, T=2, Hq=4, Hkv=1, D=8, Sq=40, past=[3, 0, 11], new=[40, 33, 7],
                           prefix_lens=[200, 9], block_size=8, tasks=[0, 0, 1])
    _check(prefill, kw, 8, seed)


def test_kernel_can_be_turned_off(monkeypatch):
    model, prefixes, _ = setup("llama")
    attach(model, prefixes)
    eng = engine(model)
    assert eng.cpu_decoder._use_kernel() and "compiled" in eng.stats()["forward_path"]
    assert not CpuDecoder(model, eng.store, eng.kv, compiled_attention=False)._use_kernel()
    eng.cpu_decoder.compiled_attention = False
    assert "torch ops (compiled kernel: turned off)" in eng.stats()["forward_path"]
    assert "HF forward" in engine(model, cpu_decoder=False).stats()["forward_path"]
    monkeypatch.setattr(compiled_build, "_tried", False)
    monkeypatch.setattr(compiled_build, "_op", None)
    monkeypatch.setenv("SOFTPROMPT_CPU_KERNEL", "0")
    assert compiled_build.load() is None and "SOFTPROMPT_CPU_KERNEL" in compiled_build.unavailable_reason()
    assert not engine(model).cpu_decoder._use_kernel()                  # the torch backend serves instead
    monkeypatch.setattr(compiled_build, "_tried", False)
    monkeypatch.setattr(compiled_build, "_reason", None)
    monkeypatch.delenv("SOFTPROMPT_CPU_KERNEL")
    assert compiled_build.load() is not None


@pytest.mark.parametrize("failure", ["no compiler", "compile error", "stale lock"])
def test_failed_build_falls_back_with_a_reason(failure, monkeypatch, tmp_path):
    """Whatever stops the build, the plan says why for backend 'compiled' and the engine runs the
    torch backend; a lock left by a killed build (torch's lock has no timeout) is reported instead
    of waited on forever."""
    for name, value in (("_tried", False), ("_op", None), ("_reason", None)):     # restored afterwards
        monkeypatch.setattr(compiled_build, name, value)
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path))        # not the cached real build
    expected = {"no compiler": "false", "compile error": "softprompt-test-broken-source", "stale lock": "build lock"}
    if failure == "no compiler":
        monkeypatch.setenv("CXX", "false")                              # a "compiler" that always fails
    elif failure == "compile error":
        broken = tmp_path / "prefix_paged_attention.cpp"
        broken.write_text("#error softprompt-test-broken-source\n")
        monkeypatch.setattr(compiled_build, "SOURCE", broken)
    else:
        name = compiled_build.extension_name(compiled_build.SOURCE.read_bytes(), compiled_build.compile_flags())
        lock = tmp_path / "torch_extensions" / name / "lock"
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (time.time() - 2 * compiled_build.STALE_LOCK_S,) * 2)
    assert compiled_build.load() is None
    reason = compiled_build.unavailable_reason()
    assert "could not build" in reason and expected[failure] in reason, reason
    args, kw = _problem(0, **ENGINE_SHAPES["decode"])
    with pytest.raises(ValueError, match="`backend` 'compiled' cannot run on cpu: could not build"):
        prefix_attention(*args, **kw, backend="compiled")
    model, prefixes, _ = setup("llama")
    attach(model, prefixes)
    assert not engine(model).cpu_decoder._use_kernel()                  # the engine runs the torch backend


def test_builds_of_other_sources_flags_or_cpus_get_their_own_name():
    """Each build lives in its own cache folder: a changed source or flag set (another CPU's
    -mavx2) never rebuilds, serves or deletes the .so another process may have loaded."""
    flags = compiled_build.compile_flags()
    name = compiled_build.extension_name(b"source", flags)
    assert name == compiled_build.extension_name(b"source", list(flags))
    assert name != compiled_build.extension_name(b"source 2", flags)
    assert name != compiled_build.extension_name(b"source", [f for f in flags if f != "-mavx2"] + ["-mno-avx2"])


def _op_args():
    """A valid direct call of the op: two rows of 3 and 4 own tokens (one query each) in pages 1
    and 2 of a 3-page pool (page size 4), both on task 0 whose 4-token prefix is block 1 of 2."""
    return dict(q=torch.randn(2, 1, 2, 8), k_pages=torch.randn(3, 4, 1, 8), v_pages=torch.randn(3, 4, 1, 8),
                page_table=torch.tensor([[1], [2]]), q_lens=torch.tensor([1, 1]), kv_lens=torch.tensor([3, 4]),
                kv_starts=torch.tensor([0, 0]), prefix_k=torch.randn(2, 1, 4, 8), prefix_v=torch.randn(2, 1, 4, 8),
                block_table=torch.tensor([[1]]), prefix_lens=torch.tensor([4]), task_ids=torch.tensor([0, 0]),
                prefix_queries=torch.tensor([0, 1]), tiles=torch.tensor([[0, 0, 2]]), causal=True, scale=0.5,
                window=0, num_threads=2)


OP_MISUSES = {    # argument -> (bad value from the valid one, the error it must give)
    "q dtype": ("q", lambda t: t.double(), r"`q` must be Float; got Double"),
    "q device": ("q", lambda t: t.to("meta"), r"`q` must be a CPU tensor; got meta"),
    "k_pages layout": ("k_pages", lambda t: torch.cat([t, t], -1)[..., ::2], r"`k_pages` must be contiguous"),
    "v_pages shape": ("v_pages", lambda t: t[..., :4].contiguous(), r"`k_pages` and `v_pages` must both be"),
    "zero page size": ("k_pages", lambda t: t[:, :0].contiguous(), r"page_size >= 1"),
    "zero block size": ("prefix_k", lambda t: t[:, :, :0].contiguous(), r"block_size >= 1"),
    "prefix_k rank": ("prefix_k", lambda t: t[0], r"`prefix_k` must have 4 dimensions"),
    "page_table dtype": ("page_table", lambda t: t.int(), r"`page_table` must be Long; got Int"),
    "kv_lens range": ("kv_lens", lambda t: torch.tensor([3, 5]), r"`kv_lens`\[1\] = 5; expected 0 \.\. 4"),
    "page id": ("page_table", lambda t: torch.tensor([[1], [3]]), r"page_table\[1, 0\] = 3 is read but the page pools"),
    "negative page id": ("page_table", lambda t: torch.tensor([[-1], [2]]), r"page_table\[0, 0\] = -1 is read"),
    "block id": ("block_table", lambda t: torch.tensor([[2]]), r"block_table\[0, 0\] = 2 is read but the prefix pools"),
    "prefix_lens range": ("prefix_lens", lambda t: torch.tensor([5]), r"`prefix_lens`\[0\] = 5; expected 0 \.\. 4"),
    "task id": ("task_ids", lambda t: torch.tensor([0, 1]), r"`task_ids`\[1\] = 1; expected 0 \.\. 0"),
    "query left out": ("tiles", lambda t: torch.tensor([[0, 0, 1]]), r"query 0 of row 1 .* is in no tile"),
    "query twice": ("prefix_queries", lambda t: torch.tensor([0, 0]), r"`prefix_queries`\[1\] = 0 is not"),
    "tile range": ("tiles", lambda t: torch.tensor([[0, 0, 3]]), r"`tiles`\[0\] = \(0, 0, 3\)"),
    "q_lens rows": ("q_lens", lambda t: torch.tensor([1, 1, 1]), r"`q_lens` must be \[B=2\]"),
}


@pytest.mark.parametrize("misuse", list(OP_MISUSES))
def test_op_checks_its_arguments(misuse):
    """The C++ side is a second line of defence behind the plan's ValueErrors: a direct call of the
    op with a wrong dtype, device, layout, shape or an index it would read out of bounds is a clear
    error, never a read of foreign memory or a division by zero (page and block ids are checked
    inside the parallel loops: the error crosses back from the worker threads)."""
    args = _op_args()
    assert torch.ops.softprompt.prefix_paged_attention(**args).shape == (2, 1, 2, 8)
    name, bad, message = OP_MISUSES[misuse]
    args[name] = bad(args[name])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.softprompt.prefix_paged_attention(**args)


def test_plan_rejects_bad_used_entries_and_ignores_junk_in_unused_ones(seed):
    """Only the entries of pages / blocks a query reads must be ids: the rest of a row (pages not
    written yet, -1, stale ids) may hold anything; a bad id that is read is a ValueError."""
    args, kw = _problem(seed, **ENGINE_SHAPES["decode"])
    _check(args, kw, 4, seed)                                 # junk tails (paged(junk_tail=True))
    q, k, v, pk, pv = args[:5]
    (kpool, vpool), pages = paged(k, v, kw["kv_lens"], 4, seed)
    sizes = dict(num_q_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[3], q_len=1, kv_len=k.shape[2],
                 num_blocks=pk.shape[0], block_size=4, own_page_size=4, own_num_pages=kpool.shape[0],
                 backend="compiled")
    bad_pages = pages.clone()
    bad_pages[2, 1] = -2                                      # row 2 has 11 tokens: it reads page 1
    with pytest.raises(ValueError, match="own_page_table"):
        plan_prefix_attention(*args[5:], **kw, **sizes, own_page_table=bad_pages)
    bad_blocks = args[5].clone()
    bad_blocks[2, 1] = -1                                     # task 2's 9 rows read block 1
    with pytest.raises(ValueError, match="block_table"):
        plan_prefix_attention(bad_blocks, *args[6:], **kw, **sizes, own_page_table=pages)
