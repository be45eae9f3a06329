"""The Triton backend with paged own keys: the decode kernel reads own keys in place through the
page table out of token-major page pools ``[num_pages, page_size, Hkv, D]``; prefill and training
get them gathered. Checked against ``reference`` on the dense own keys, in the Triton interpreter
(tiny shapes, fp32 tight, fp16 looser). Pages are shuffled in the pool; every slot a row may not
read (past its length, before its start, spare pages, unused table entries) holds NaN, so a read
of one shows up as NaN."""
import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton / kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from softprompt.kernels import (available_backends, plan_prefix_attention, prefix_attention,  # noqa: E402
                                validate_inputs)
from softprompt.kernels.inputs import check_layer_tensors  # noqa: E402
from softprompt.kernels.triton_backend import OwnPages, triton_attention  # noqa: E402
from softprompt.kernels.triton_decode import decode_attention  # noqa: E402
from test_triton_decode import TOL, make_problem, new_seed  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="Triton interpreter not available")


def paged(k, v, kv_starts, kv_lens, page_size, seed):
    """``OwnPages`` holding rows' own keys ``[kv_starts, kv_lens)`` in shuffled token-major pages;
    everything else NaN (unused table entries point at a NaN spare page)."""
    g = torch.Generator().manual_seed(seed)
    B, H, S, D = k.shape
    per_row = max(1, -(-S // page_size))
    n = B * per_row + 2
    order = torch.randperm(n, generator=g)
    table = order[:B * per_row].view(B, per_row).clone()
    spare = int(order[-1])
    pools = [torch.full((n, page_size, H, D), float("nan"), dtype=k.dtype) for _ in range(2)]
    for b in range(B):
        lo, hi = int(kv_starts[b]), int(kv_lens[b])
        for p in range(per_row):
            if p * page_size >= hi:
                table[b, p] = spare
                continue
            for j in range(max(lo, p * page_size), min(hi, (p + 1) * page_size)):
                for pool, src in zip(pools, (k, v)):
                    pool[table[b, p], j - p * page_size] = src[b, :, j]
    return OwnPages(pools[0], pools[1], table.to(torch.int32), page_size)


def on_pages(x, pages):
    """``x`` with its own keys replaced by the shape stand-ins of ``pages``."""
    stand_in = pages.shape_of(x.batch, x.kv_len)
    return dataclasses.replace(x, k=stand_in, v=stand_in)


def lengths(kw, B, S):
    starts = kw.get("kv_starts", torch.zeros(B, dtype=torch.long))
    return starts, kw.get("kv_lens", torch.full((B,), S))


@pytest.mark.parametrize("path", ["grouped", "per_sequence"])
@pytest.mark.parametrize("Sq,page_size,splits", [(1, 4, None), (3, 3, 3), (1, 5, 2)])
def test_decode_reads_pages_in_place(path, Sq, page_size, splits):
    seed = new_seed()
    args, kw = make_problem(seed, B=5, T=3, Hq=4, Hkv=2, Sq=Sq, Skv=13, D=16, window=5 if Sq == 3 else None)
    q, k, v = args[:3]
    pages = paged(k, v, *lengths(kw, 5, 13), page_size, seed)
    x = validate_inputs(*args, **kw)
    x = on_pages(x, pages)
    got = decode_attention(x, path=path, num_splits=splits, own_pages=pages)
    want = prefix_attention(*args, backend="reference", **kw)
    assert torch.isfinite(got).all(), f"a slot no row may read was read (seed={seed})"
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed={seed} {path}: {m}")


@pytest.mark.parametrize("path", ["grouped", "per_sequence"])
def test_decode_paged_fp16_gqa_no_prefix_task(path):
    seed = new_seed()
    args, kw = make_problem(seed, B=4, T=2, Hq=6, Hkv=2, Sq=1, Skv=9, D=8, prefix_lens=[0, 6], dtype=torch.float16)
    pages = paged(*args[1:3], *lengths(kw, 4, 9), 4, seed)
    x = validate_inputs(*args, **kw)
    x = on_pages(x, pages)
    got = decode_attention(x, path=path, own_pages=pages)
    want = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float16], msg=lambda m: f"seed={seed}: {m}")


def test_prefill_and_gradients_gather_the_pages():
    """Sq > 16 or a gradient: the prefill kernels, on own keys gathered out of the pools; the
    pools' gradient equals the reference's own-key gradient scattered into their pages."""
    seed = new_seed()
    args, kw = make_problem(seed, B=3, T=2, Hq=2, Hkv=1, Sq=3, Skv=7, D=8, ragged=False)
    q, k, v = (t.clone().requires_grad_() for t in args[:3])
    pages = paged(k.detach(), v.detach(), *lengths(kw, 3, 7), 4, seed)
    pages = OwnPages(torch.nan_to_num(pages.k).requires_grad_(), torch.nan_to_num(pages.v).requires_grad_(),
                     pages.table, pages.page_size)
    x = validate_inputs(q, k, v, *args[3:], **kw)
    x = on_pages(x, pages)
    got = triton_attention(x, own_pages=pages)
    want = prefix_attention(q, k, v, *args[3:], backend="reference", **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed))
    gk, gv = torch.autograd.grad((got * w).sum(), (pages.k, pages.v))
    rk, rv = torch.autograd.grad((want * w).sum(), (k, v))
    torch.testing.assert_close(pages.gather(gk, 7), rk, **TOL[torch.float32])
    torch.testing.assert_close(pages.gather(gv, 7), rv, **TOL[torch.float32])


def plan_pools(pages: OwnPages):
    """The pools as ``plan.run`` takes them: the contract's token-major ``[num_pages, page_size, Hkv, D]``."""
    return pages.k, pages.v


@pytest.mark.parametrize("Sq", [1, 2])
def test_plan_run_with_paged_own_keys(Sq):
    """Through ``plan_prefix_attention(..., own_page_table=...).run``: the decode kernel in place."""
    seed = new_seed()
    args, kw = make_problem(seed, B=4, T=3, Hq=4, Hkv=2, Sq=Sq, Skv=10, D=8)
    pages = paged(*args[1:3], *lengths(kw, 4, 10), 3, seed)
    shapes = check_layer_tensors(*args[:5])
    plan = plan_prefix_attention(*args[5:], backend="triton", own_page_table=pages.table, own_page_size=3,
                                 own_num_pages=pages.k.shape[0], **kw, **shapes)
    got = plan.run(args[0], *plan_pools(pages), *args[3:5])
    want = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed={seed}: {m}")
