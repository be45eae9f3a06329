"""The compiled CPU paged-attention kernel against the reference backend on fresh random inputs
(own tokens in scattered pages, prefixes in scattered blocks; one query per row and causal packed
queries), its input checks, its off-switch and build fallback. The CPU decoder's steps and
prefills through it are checked against the HF forward in test_engine_cpu_decode.py."""
import os
import random
import time

import pytest
import torch

from softprompt.kernels import prefix_attention
from softprompt.engine import cpu_kernel
from softprompt.engine.cpu_decode import CpuDecoder
from softprompt.engine.cpu_kernel import PagedAttention
from test_engine_cpu_decode import CASES, _problem
from test_engine_common import attach, engine, setup

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None,
                                reason=f"compiled kernel unavailable: {cpu_kernel.unavailable_reason()}")


def _paged(seed, k, v, own, page_size):
    """Row b's last ``own[b]`` keys of ``k, v [B, Hkv, Skv, D]`` (right-aligned) written in token
    order into pages scattered over a token-major pool ``[slots, Hkv, D]``; its page table."""
    B, Hkv, Skv, D = k.shape
    per_row = [-(-int(n) // page_size) for n in own]
    order = list(range(1, sum(per_row) + 3))               # page 0 and two more stay unused
    random.Random(seed).shuffle(order)
    table = torch.zeros(B, max(per_row), dtype=torch.long)
    pool_k = torch.randn((len(order) + 1) * page_size, Hkv, D)  # garbage outside the written slots
    pool_v = torch.randn_like(pool_k)
    at = 0
    for b, n in enumerate(own.tolist()):
        table[b, :per_row[b]] = torch.tensor(order[at:at + per_row[b]])
        at += per_row[b]
        for t in range(n):
            slot = int(table[b, t // page_size]) * page_size + t % page_size
            pool_k[slot] = k[b, :, Skv - n + t]
            pool_v[slot] = v[b, :, Skv - n + t]
    return pool_k, pool_v, table


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, page_size, window, seed):
    c = CASES[name]
    q, k, v, pk, pv, table, lens, tids, own = _problem(seed, **c)
    B, Hq, Hkv, Skv, D = c["B"], c["Hq"], c["Hkv"], c["Skv"], c["D"]
    scale = D ** -0.5
    pool_k, pool_v, pages = _paged(seed, k, v, own, page_size)
    table = table.clamp_min(0)                             # unused columns: any valid block
    common = dict(causal=False, scale=scale, kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), window=window,
                  backend="reference")
    for threads in (1, 3):
        kernel = PagedAttention(pages, own, page_size, tids, table, lens, c["block_size"], num_kv_heads=Hkv,
                                   group_size=Hq // Hkv, head_dim=D, scale=scale, window=window, num_threads=threads)
        got = kernel(q.view(B, Hkv, Hq // Hkv, D), pool_k, pool_v, pk, pv)
        want = prefix_attention(q, k, v, pk, pv, table, lens, tids, **common)
        torch.testing.assert_close(got.reshape(B, Hq, 1, D), want, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{name} (seed {seed}, window {window}, threads {threads}): {m}")
    no_prefix = PagedAttention(pages, own, page_size, None, table, lens, c["block_size"], num_kv_heads=Hkv,
                                  group_size=Hq // Hkv, head_dim=D, scale=scale, window=window)
    got = no_prefix(q.view(B, Hkv, Hq // Hkv, D), pool_k, pool_v, pk, pv)
    want = prefix_attention(q, k, v, pk, pv, table[:1, :0], lens[:1] * 0, tids * 0, **common)
    torch.testing.assert_close(got.reshape(B, Hq, 1, D), want, atol=2e-5, rtol=1e-4)


def test_kernel_long_rows_and_large_scores(seed):
    """Rows of hundreds of keys over many pages, scores far from zero (the exp range reduction)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Skv, D = 3, 8, 2, 300, 32
    q = torch.randn(B, Hq, 1, D, generator=g) * 4
    k = torch.randn(B, Hkv, Skv, D, generator=g) * 4
    v = torch.randn(B, Hkv, Skv, D, generator=g)
    own = torch.tensor([300, 1, 157])
    pool_k, pool_v, pages = _paged(seed, k, v, own, 16)
    pk = torch.randn(3, Hkv, 16, D, generator=g)
    table, lens, tids = torch.tensor([[1, 2]]), torch.tensor([20]), torch.zeros(B, dtype=torch.long)
    kernel = PagedAttention(pages, own, 16, tids, table, lens, 16, num_kv_heads=Hkv, group_size=Hq // Hkv,
                               head_dim=D, scale=D ** -0.5)
    got = kernel(q.view(B, Hkv, Hq // Hkv, D), pool_k, pool_v, pk, pk * 0.5)
    want = prefix_attention(q, k, v, pk, pk * 0.5, table, lens, tids, causal=False, scale=D ** -0.5,
                            kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), backend="reference")
    torch.testing.assert_close(got.reshape(B, Hq, 1, D), want, atol=2e-5, rtol=1e-4)


def test_kernel_rejects_bad_inputs():
    pages, own = torch.tensor([[1], [2]]), torch.tensor([3, 4])
    table, lens = torch.tensor([[1]]), torch.tensor([4])
    kw = dict(num_kv_heads=1, group_size=2, head_dim=8, scale=1.0)
    with pytest.raises(ValueError, match="own tokens"):
        PagedAttention(pages, torch.tensor([3, 5]), 4, None, table, lens, 4, **kw)       # 5 > one page of 4
    with pytest.raises(ValueError, match="own tokens"):
        PagedAttention(pages, torch.tensor([0, 2]), 4, None, table, lens, 4, **kw)       # no new token
    with pytest.raises(ValueError, match="task_ids"):
        PagedAttention(pages, own, 4, torch.tensor([0, 1]), table, lens, 4, **kw)        # task 1 of 1
    with pytest.raises(ValueError, match="integer"):
        PagedAttention(pages.float(), own, 4, None, table, lens, 4, **kw)
    with pytest.raises(ValueError, match="block_table"):
        PagedAttention(pages, own, 4, None, table[0], lens, 4, **kw)
    kernel = PagedAttention(pages, own, 4, torch.tensor([0, 0]), table, lens, 4, **kw)
    q, pool, prefix = torch.zeros(2, 1, 2, 8), torch.zeros(12, 1, 8), torch.zeros(2, 1, 4, 8)
    assert kernel(q, pool, pool, prefix, prefix).shape == (2, 1, 2, 8)
    with pytest.raises(ValueError, match="pools hold"):
        kernel(q, pool[:8], pool[:8], prefix, prefix)                    # page 2 is slots 8..11
    with pytest.raises(ValueError, match="prefix pools hold"):
        kernel(q, pool, pool, prefix[:1], prefix[:1])                    # block 1 is missing
    with pytest.raises(ValueError, match="fp32"):
        kernel(q, pool.double(), pool, prefix, prefix)
    with pytest.raises(ValueError, match="`q`"):
        kernel(q[:1], pool, pool, prefix, prefix)


def test_kernel_can_be_turned_off(monkeypatch):
    model, prefixes, _ = setup("llama")
    attach(model, prefixes)
    eng = engine(model)
    assert eng.cpu_decoder._use_kernel() and "compiled" in eng.stats()["forward_path"]
    assert not CpuDecoder(model, eng.store, eng.kv, compiled_attention=False)._use_kernel()
    eng.cpu_decoder.compiled_attention = False
    assert "torch ops (compiled kernel: turned off)" in eng.stats()["forward_path"]
    assert "HF forward" in engine(model, cpu_decoder=False).stats()["forward_path"]
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_op", None)
    monkeypatch.setenv("SOFTPROMPT_CPU_KERNEL", "0")
    assert cpu_kernel.load() is None and "SOFTPROMPT_CPU_KERNEL" in cpu_kernel.unavailable_reason()
    assert not engine(model).cpu_decoder._use_kernel()                  # the torch path serves instead
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_reason", None)
    monkeypatch.delenv("SOFTPROMPT_CPU_KERNEL")
    assert cpu_kernel.load() is not None


@pytest.mark.parametrize("window", [None, 4])
def test_kernel_causal_queries_match_reference(window, seed):
    """Prefill-style: every new token of every row is a query seeing its row's prefix and own
    tokens up to itself (rows with earlier tokens cached, one row without a prefix)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, Sq, page_size = 4, 6, 2, 16, 5, 4
    past = torch.tensor([0, 3, 7, 1])
    new = torch.tensor([5, 2, 5, 1])
    Skv = int((past + new).max())
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, D, generator=g)
    own = past + new
    pool_k, pool_v, pages = _paged(seed, k, v, own, page_size)
    prefix_k, prefix_v = torch.randn(6, Hkv, 4, D, generator=g), torch.randn(6, Hkv, 4, D, generator=g)
    table, lens = torch.tensor([[1, 2], [3, 0], [4, 5]]), torch.tensor([6, 3, 0])
    tasks = torch.tensor([0, 2, 1, 0])
    # reference: queries left-padded in Sq columns (the row's last new_b), own keys right-aligned
    want = prefix_attention(q, k, v, prefix_k, prefix_v, table, lens, tasks, causal=True, scale=D ** -0.5,
                            kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), window=window,
                            backend="reference")                               # [B, Hq, Sq, D]
    rows = torch.cat([torch.full((int(n),), b) for b, n in enumerate(new)])
    cols = torch.cat([torch.arange(Sq - int(n), Sq) for n in new])
    visible = torch.cat([torch.arange(int(p) + 1, int(p) + int(n) + 1) for p, n in zip(past, new)])
    packed_q = q[rows, :, cols].reshape(-1, Hkv, Hq // Hkv, D)
    # row 1's task 2 has an empty prefix in the reference; the kernel gets -1 (no prefix) for it
    task_ids = torch.where(tasks == 2, -1, tasks)
    attention = PagedAttention(pages, visible, page_size, task_ids, table, lens, 4, query_rows=rows, num_kv_heads=Hkv,
                               group_size=Hq // Hkv, head_dim=D, scale=D ** -0.5, window=window, num_threads=2)
    got = attention(packed_q, pool_k, pool_v, prefix_k, prefix_v)
    torch.testing.assert_close(got.reshape(-1, Hq, D), want[rows, :, cols], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="query_rows"):
        PagedAttention(pages, visible, page_size, task_ids, table, lens, 4, num_kv_heads=Hkv, group_size=Hq // Hkv,
                       head_dim=D, scale=1.0)


@pytest.mark.parametrize("failure", ["no compiler", "compile error", "stale lock"])
def test_failed_build_falls_back_with_a_reason(failure, monkeypatch, tmp_path):
    """Whatever stops the build, the engine runs the torch path and says why; a lock left by a
    killed build (torch's lock has no timeout) is reported instead of waited on forever."""
    for name, value in (("_tried", False), ("_op", None), ("_reason", None)):     # restored afterwards
        monkeypatch.setattr(cpu_kernel, name, value)
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path))        # not the cached real build
    expected = {"no compiler": "false", "compile error": "softprompt-test-broken-source", "stale lock": "build lock"}
    if failure == "no compiler":
        monkeypatch.setenv("CXX", "false")                              # a "compiler" that always fails
    elif failure == "compile error":
        broken = tmp_path / "paged_attention.cpp"
        broken.write_text("#error softprompt-test-broken-source\n")
        monkeypatch.setattr(cpu_kernel, "SOURCE", broken)
    else:
        name = cpu_kernel.extension_name(cpu_kernel.SOURCE.read_bytes(), cpu_kernel.compile_flags())
        lock = tmp_path / "torch_extensions" / name / "lock"
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (time.time() - 2 * cpu_kernel.STALE_LOCK_S,) * 2)
    assert cpu_kernel.load() is None
    reason = cpu_kernel.unavailable_reason()
    assert "could not build" in reason and expected[failure] in reason, reason
    with pytest.raises(RuntimeError, match="unavailable"):
        PagedAttention(torch.tensor([[1]]), torch.tensor([1]), 4, None, torch.tensor([[1]]), torch.tensor([4]), 4,
                       num_kv_heads=1, group_size=1, head_dim=8, scale=1.0)
    model, prefixes, _ = setup("llama")
    attach(model, prefixes)
    assert not engine(model).cpu_decoder._use_kernel()                  # the engine runs the torch path


def test_builds_of_other_sources_flags_or_cpus_get_their_own_name():
    """Each build lives in its own cache folder: a changed source or flag set (another CPU's
    -mavx2) never rebuilds, serves or deletes the .so another process may have loaded."""
    flags = cpu_kernel.compile_flags()
    name = cpu_kernel.extension_name(b"source", flags)
    assert name == cpu_kernel.extension_name(b"source", list(flags))
    assert name != cpu_kernel.extension_name(b"source 2", flags)
    assert name != cpu_kernel.extension_name(b"source", [f for f in flags if f != "-mavx2"] + ["-mno-avx2"])


def _op_args():
    """A valid direct call of the op: two rows of 3 and 4 own tokens in pages 1 and 2 of a
    12-slot pool (page size 4), both on task 0 whose 4-token prefix is block 1 of 2."""
    return dict(q=torch.randn(2, 1, 2, 8), pool_k=torch.randn(12, 1, 8), pool_v=torch.randn(12, 1, 8),
                page_table=torch.tensor([[1], [2]]), visible=torch.tensor([3, 4]), query_rows=None, page_size=4,
                prefix_k=torch.randn(2, 1, 4, 8), prefix_v=torch.randn(2, 1, 4, 8), block_table=torch.tensor([[1]]),
                prefix_lens=torch.tensor([4]), task_ids=torch.tensor([0, 0]), scale=0.5, window=0, num_threads=2)


OP_MISUSES = {    # argument -> (bad value from the valid one, the error it must give)
    "q dtype": ("q", lambda t: t.double(), r"`q` must be Float; got Double"),
    "q device": ("q", lambda t: t.to("meta"), r"`q` must be a CPU tensor; got meta"),
    "pool_k layout": ("pool_k", lambda t: torch.cat([t, t], -1)[..., ::2], r"`pool_k` must be contiguous"),
    "pool_v shape": ("pool_v", lambda t: t[..., :4].contiguous(), r"`pool_k` and `pool_v` must both be \[slots"),
    "prefix_k rank": ("prefix_k", lambda t: t[0], r"`prefix_k` must have 4 dimensions"),
    "page_table dtype": ("page_table", lambda t: t.int(), r"`page_table` must be Long; got Int"),
    "visible range": ("visible", lambda t: torch.tensor([3, 5]), r"`visible`\[1\] = 5; expected 1 \.\. 4"),
    "page id": ("page_table", lambda t: torch.tensor([[1], [3]]), r"page_table\[1, 0\] = 3 is read but the pools hold"),
    "negative page id": ("page_table", lambda t: torch.tensor([[-1], [2]]), r"page_table\[0, 0\] = -1 is read"),
    "block id": ("block_table", lambda t: torch.tensor([[2]]), r"block_table\[0, 0\] = 2 is read but the prefix pools"),
    "prefix_lens range": ("prefix_lens", lambda t: torch.tensor([5]), r"`prefix_lens`\[0\] = 5; expected 0 \.\. 4"),
    "task id": ("task_ids", lambda t: torch.tensor([0, 1]), r"`task_ids`\[1\] = 1; expected -1 \.\. 0"),
    "query_rows range": ("query_rows", lambda t: torch.tensor([0, 2]), r"`query_rows`\[1\] = 2; expected 0 \.\. 1"),
    "rows without query_rows": ("visible", lambda t: torch.tensor([3, 4, 4]), r"`visible` must be \[N=2\]"),
    "page_size": ("page_size", lambda t: 0, r"`page_size` must be >= 1"),
}


@pytest.mark.parametrize("misuse", list(OP_MISUSES))
def test_op_checks_its_arguments(misuse):
    """The C++ side is a second line of defence behind PagedAttention's ValueErrors: a direct call
    of torch.ops.softprompt.paged_attention with a wrong dtype, device, layout, shape or an index
    it would read out of bounds is a clear error, never a read of foreign memory (page and block ids
    are checked inside the parallel loop: the error crosses back from the worker threads)."""
    args = _op_args()
    assert torch.ops.softprompt.paged_attention(**args).shape == (2, 1, 2, 8)
    name, bad, message = OP_MISUSES[misuse]
    args[name] = bad(args[name])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.softprompt.paged_attention(**args)


def test_kernel_ignores_junk_in_unused_table_entries_and_rejects_bad_used_ones(seed):
    """Only the entries of pages / blocks a query reads must be ids: the rest of a row (pages not
    written yet, -1, stale ids) used to be taken into the pool-size check (a valid step rejected),
    while a negative id that *is* read passed unchecked (an out-of-bounds read in C)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Skv, D = 3, 4, 2, 9, 8
    q, k, v = torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g), \
        torch.randn(B, Hkv, Skv, D, generator=g)
    own = torch.tensor([9, 2, 5])
    pool_k, pool_v, pages = _paged(seed, k, v, own, 4)
    pk, pv = torch.randn(4, Hkv, 4, D, generator=g), torch.randn(4, Hkv, 4, D, generator=g)
    table, lens, tids = torch.tensor([[2, 0], [3, 1]]), torch.tensor([6, 3]), torch.tensor([0, 1, 0])
    junk_pages, junk_table = pages.clone(), table.clone()
    junk_pages[1, 1:], junk_table[1, 1] = -1, 10 ** 6                   # row 1: one page; task 1: one block
    kw = dict(num_kv_heads=Hkv, group_size=Hq // Hkv, head_dim=D, scale=D ** -0.5)
    kernel = PagedAttention(junk_pages, own, 4, tids, junk_table, lens, 4, **kw)
    got = kernel(q.view(B, Hkv, Hq // Hkv, D), pool_k, pool_v, pk, pv)
    want = prefix_attention(q, k, v, pk, pv, table, lens, tids, causal=False, scale=D ** -0.5,
                            kv_starts=Skv - own, kv_lens=torch.full_like(own, Skv), backend="reference")
    torch.testing.assert_close(got.reshape(B, Hq, 1, D), want, atol=2e-5, rtol=1e-4)
    read_page, read_block = pages.clone(), table.clone()
    read_page[0, 1] = -2                                                 # row 0 reads all its pages
    read_block[0, 1] = -1                                                # task 0 reads 2 blocks
    with pytest.raises(ValueError, match="page_table"):
        PagedAttention(read_page, own, 4, tids, table, lens, 4, **kw)
    with pytest.raises(ValueError, match="block_table"):
        PagedAttention(pages, own, 4, tids, read_block, lens, 4, **kw)
    with pytest.raises(ValueError, match="prefix_lens"):
        PagedAttention(pages, own, 4, tids, table, torch.tensor([6, 9]), 4, **kw)   # 9 > 2 blocks x 4


ZERO_SIZE_SCRIPT = r"""
import torch
from softprompt.engine.cpu_kernel import PagedAttention
pages, own = torch.tensor([[0], [1]]), torch.tensor([3, 4])
table, lens, tids = torch.tensor([[0]]), torch.tensor([2]), torch.tensor([0, 0])
for page_size, block_size in ((4, 0), (0, 4)):
    try:
        PagedAttention(pages, own, page_size, tids, table, lens, block_size, num_kv_heads=1, group_size=2,
                       head_dim=8, scale=1.0)(torch.zeros(2, 1, 2, 8), torch.zeros(8, 1, 8), torch.zeros(8, 1, 8),
                                              torch.zeros(1, 1, max(block_size, 1), 8), torch.zeros(1, 1, max(block_size, 1), 8))
    except ValueError as err:
        assert "size" in str(err), err
    else:
        raise SystemExit("no error")
print("ok")
"""


def test_zero_page_or_block_size_is_a_value_error_not_a_crash():
    """The C kernel divides by page_size and block_size: 0 raised SIGFPE in the process."""
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", ZERO_SIZE_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])
