"""The Triton decode kernels (``kernels/triton_decode.py``) against the ``reference`` backend.

Runs on the CPU through the Triton interpreter (tiny shapes; fp32 tight, fp16 looser — the
interpreter's ``tl.dot`` on bf16 is wrong, bf16 is checked by ``benchmarks/gpu_decode.py`` on a
GPU). Every test draws fresh random inputs; the seed is in each assertion message and
``SOFTPROMPT_SEED=<seed>`` reproduces a failure.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton / kernels are imported

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from softprompt.kernels import available_backends, prefix_attention, validate_inputs  # noqa: E402
from softprompt.kernels import triton_decode  # noqa: E402
from softprompt.kernels.triton_decode import choose_path, decode_attention  # noqa: E402

PATHS = ["grouped", "per_sequence"]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def new_seed() -> int:
    pinned = os.environ.get("SOFTPROMPT_SEED")
    return int(pinned) if pinned else random.SystemRandom().randrange(2 ** 31)


def make_problem(seed, *, B=6, T=4, Hq=4, Hkv=2, Sq=1, Skv=23, D=16, block_size=4,
                 prefix_lens=None, task_ids=None, ragged=True, window=None, causal=True,
                 dtype=torch.float32, pool_layout="plain"):
    """``(args, kwargs)`` for ``prefix_attention``: shuffled blocks, uneven lengths, kv_starts > 0."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    lens = prefix_lens if prefix_lens is not None else [rnd.randint(0, 13) for _ in range(T)]
    per_task = [-(-p // block_size) for p in lens]
    num_blocks = sum(per_task) + 2
    perm = list(range(num_blocks))
    rnd.shuffle(perm)
    table = torch.full((T, max(per_task + [1]) + 1), -1, dtype=torch.long)   # a spare column
    at = 0
    for t, n in enumerate(per_task):
        table[t, :n] = torch.tensor(perm[at:at + n], dtype=torch.long)
        at += n

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = randn(B, Hq, Sq, D)
    k = randn(B, Hkv, Skv, D)
    v = randn(B, Hkv, Skv, D)
    if pool_layout == "plain":
        pk = randn(num_blocks, Hkv, block_size, D)
        pv = randn(num_blocks, Hkv, block_size, D)
    else:   # token-major pool [num_blocks, block_size, Hkv, D] viewed as [num_blocks, Hkv, bs, D]
        pk = randn(num_blocks, block_size, Hkv, D).transpose(1, 2)
        pv = randn(num_blocks, block_size, Hkv, D).transpose(1, 2)
    if task_ids is None:
        task_ids = [rnd.randrange(T) for _ in range(B)]
    kw = dict(causal=causal, window=window)
    if ragged:
        kv_lens = [rnd.randint(0, Skv) for _ in range(B)]
        kv_lens[0] = Skv                                    # one full-length cache
        q_lens = [rnd.randint(0, min(Sq, kvl)) if kvl else rnd.randint(0, Sq) for kvl in kv_lens]
        q_lens[0] = Sq
        kv_starts = [rnd.randint(0, max(0, kvl - q)) for kvl, q in zip(kv_lens, q_lens)]
        kw.update(q_lens=torch.tensor(q_lens), kv_lens=torch.tensor(kv_lens),
                  kv_starts=torch.tensor(kv_starts))
    args = (q, k, v, pk, pv, table, torch.tensor(lens, dtype=torch.long),
            torch.tensor(task_ids, dtype=torch.long))
    return args, kw


def check(seed, args, kw, **decode_kw):
    """Decode kernels == reference for the given problem; returns the Triton output."""
    ref = prefix_attention(*args, backend="reference", **kw)
    x = validate_inputs(*args, **kw)
    got = decode_attention(x, **decode_kw)
    info = f"seed={seed} decode_kw={decode_kw} kw={ {k: v for k, v in kw.items()} }"
    assert got.dtype == args[0].dtype and got.shape == ref.shape, info
    assert torch.isfinite(got).all(), f"NaN/inf in output ({info})"
    torch.testing.assert_close(got, ref, **TOL[args[0].dtype],
                               msg=lambda m: f"decode differs from reference ({info}): {m}")
    return got


# ---- both paths, the contract's features --------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("Sq", [1, 4])
def test_many_tasks_uneven_groups_gqa(path, Sq):
    """5 tasks, group sizes 4/0/2/0/1 (+1 more on a random task), one present task with P=0."""
    seed = new_seed()
    task_ids = [0, 0, 2, 0, 4, 2, 0, random.Random(seed).randrange(5)]
    args, kw = make_problem(seed, B=8, T=5, Hq=6, Hkv=2, Sq=Sq, Skv=21, D=16, block_size=4,
                            prefix_lens=[11, 6, 0, 9, 5], task_ids=task_ids)
    check(seed, args, kw, path=path)


def test_grouped_many_tasks_in_table():
    """T = 1100 table rows (more than one 1024-task chunk of the setup kernel), 4 present."""
    seed = new_seed()
    rnd = random.Random(seed)
    task_ids = [3, 1050, 1050, 1099, 3, rnd.choice([700, 3, 1099])]
    args, kw = make_problem(seed, B=6, T=1100, Hq=2, Hkv=1, Sq=2, Skv=9, D=8, block_size=8,
                            task_ids=task_ids)
    check(seed, args, kw, path="grouped")


@pytest.mark.parametrize("path", PATHS)
def test_window_and_kv_starts(path):
    seed = new_seed()
    args, kw = make_problem(seed, B=5, T=3, Hq=4, Hkv=1, Sq=4, Skv=19, window=5, block_size=3)
    check(seed, args, kw, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_split_kv_and_split_prefix(path):
    """Forced flash-decoding splits: partial states merged by the fp32 merge kernel."""
    seed = new_seed()
    args, kw = make_problem(seed, B=4, T=2, Hq=4, Hkv=2, Sq=2, Skv=40, D=8, block_size=8,
                            prefix_lens=[37, 20])
    check(seed, args, kw, path=path, num_splits=3, prefix_splits=2)


def test_overlap_variant_merges_after_own_phase():
    """``overlap=True``: the own phase writes a partial slot and the merge kernel combines it with
    the prefix slots (on a GPU the prefix phase then runs on a side stream)."""
    seed = new_seed()
    args, kw = make_problem(seed, B=5, T=2, Hq=4, Hkv=2, Sq=2, Skv=15, D=16, block_size=4,
                            task_ids=[0, 1, 1, 0, 1])
    check(seed, args, kw, path="grouped", overlap=True, prefix_splits=2)


def test_split_prefix_only_fused_merge():
    """Grouped path with a split prefix phase and an unsplit own phase: merged inside the own kernel."""
    seed = new_seed()
    args, kw = make_problem(seed, B=5, T=2, Hq=2, Hkv=2, Sq=1, Skv=17, D=16, block_size=5,
                            prefix_lens=[33, 12], task_ids=[0, 1, 0, 0, 1])
    check(seed, args, kw, path="grouped", num_splits=1, prefix_splits=3)


@pytest.mark.parametrize("path", PATHS)
def test_fp16(path):
    seed = new_seed()
    args, kw = make_problem(seed, B=6, T=3, Hq=4, Hkv=2, Sq=4, Skv=29, D=32, window=9,
                            dtype=torch.float16)
    check(seed, args, kw, path=path, num_splits=2)


@pytest.mark.parametrize("path", PATHS)
def test_not_causal_odd_head_dim_strided_pool(path):
    """Non-causal, D=13 (padded to 16 with masks), a token-major pool and strided q/k/v views."""
    seed = new_seed()
    args, kw = make_problem(seed, B=4, T=3, Hq=3, Hkv=3, Sq=3, Skv=11, D=13, causal=False,
                            pool_layout="token_major")
    q, k, v = args[:3]
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # [B,S,H,D] memory
    assert not any(t.is_contiguous() for t in strided)
    check(seed, (*strided, *args[3:]), kw, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_sq16_rows_span_several_tiles(path):
    """Sq = 16 with G = 2: 32 stacked rows per sequence, more than one 16-row tile (interpreter)."""
    seed = new_seed()
    args, kw = make_problem(seed, B=3, T=2, Hq=2, Hkv=1, Sq=16, Skv=20, D=8, block_size=4,
                            task_ids=[1, 0, 1], window=7)
    check(seed, args, kw, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_unused_memory_is_never_read(path):
    """NaN in padding queries, own keys outside [kv_starts, kv_lens), unused pool blocks and pool
    rows past a prefix's end: the output must equal the reference on the clean inputs."""
    seed = new_seed()
    args, kw = make_problem(seed, B=5, T=3, Hq=4, Hkv=2, Sq=3, Skv=17, block_size=4,
                            prefix_lens=[6, 0, 9])
    q, k, v, pk, pv, table, lens, tids = args
    ref = prefix_attention(*args, backend="reference", **kw)
    q, k, v, pk, pv = (t.clone() for t in (q, k, v, pk, pv))
    nan = float("nan")
    for b in range(q.shape[0]):
        q[b, :, int(kw["q_lens"][b]):] = nan
        k[b, :, :int(kw["kv_starts"][b])] = nan
        v[b, :, :int(kw["kv_starts"][b])] = nan
        k[b, :, int(kw["kv_lens"][b]):] = nan
        v[b, :, int(kw["kv_lens"][b]):] = nan
    used = torch.zeros(pk.shape[0], pk.shape[2], dtype=torch.bool)     # [block, row] holding a prefix row
    for t, n in enumerate(lens.tolist()):
        for r in range(n):
            used[table[t, r // pk.shape[2]], r % pk.shape[2]] = True
    pk[~used[:, None, :, None].expand_as(pk)] = nan
    pv[~used[:, None, :, None].expand_as(pv)] = nan
    got = decode_attention(validate_inputs(q, k, v, pk, pv, table, lens, tids, **kw), path=path)
    assert torch.isfinite(got).all(), f"NaN leaked from unused memory (seed={seed})"
    torch.testing.assert_close(got, ref, **TOL[torch.float32], msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_prefix_zero_everywhere_and_empty_rows(path):
    """No prefix rows at all; padding queries and rows that see nothing are exactly zero."""
    seed = new_seed()
    args, kw = make_problem(seed, B=4, T=2, Hq=2, Hkv=1, Sq=2, Skv=9, prefix_lens=[0, 0], ragged=False)
    kw.update(q_lens=torch.tensor([2, 0, 1, 2]), kv_lens=torch.tensor([9, 9, 4, 3]),
              kv_starts=torch.tensor([0, 0, 4, 3]))          # seq 2, 3: no own key visible
    got = check(seed, args, kw, path=path)
    assert (got[1] == 0).all() and (got[2, :, 1] == 0).all() and (got[3] == 0).all(), f"seed={seed}"


@pytest.mark.parametrize("path", PATHS)
def test_no_own_keys(path):
    """Skv = 0: prefix only (and zeros for sequences whose task has no prefix)."""
    seed = new_seed()
    args, kw = make_problem(seed, B=3, T=2, Sq=2, Skv=0, prefix_lens=[7, 0], task_ids=[0, 1, 0],
                            ragged=False, causal=False)
    got = check(seed, args, kw, path=path)
    assert (got[1] == 0).all(), f"seed={seed}"


@pytest.mark.parametrize("path", PATHS)
def test_no_prefix_storage_at_all(path):
    """A block table with no columns and an empty pool (zero-size tensors reach no launch)."""
    seed = new_seed()
    args, kw = make_problem(seed, B=3, T=2, Sq=2, Skv=6, prefix_lens=[0, 0])
    q, k, v, pk, pv, table, lens, tids = args
    check(seed, (q, k, v, pk[:0], pv[:0], table[:, :0], lens, tids), kw, path=path)


def test_empty_batch():
    seed = new_seed()
    args, kw = make_problem(seed, B=0, T=2, Sq=1, Skv=5, task_ids=[], ragged=False)
    for path in PATHS:
        out = decode_attention(validate_inputs(*args, **kw), path=path)
        assert out.shape == (0, 4, 1, 16)


# ---- the heuristic, the switches, the dispatcher --------------------------------------------

def test_choose_path_heuristic():
    seed = new_seed()
    many, kw = make_problem(seed, B=8, T=2, ragged=False)                     # 4 sequences per task
    assert choose_path(validate_inputs(*many, **kw)) == "grouped"
    own, kw = make_problem(seed, B=4, T=4, task_ids=[0, 1, 2, 3], ragged=False)   # one each
    assert choose_path(validate_inputs(*own, **kw)) == "per_sequence"
    few, kw = make_problem(seed, B=4, T=9, task_ids=[5, 5, 2, 2], ragged=False)   # T > B, 2 present
    assert choose_path(validate_inputs(*few, **kw)) == "grouped"
    none, kw = make_problem(seed, B=4, T=2, prefix_lens=[0, 0], ragged=False)    # no prefix storage
    none = (*none[:5], none[5][:, :0], *none[6:])
    assert choose_path(validate_inputs(*none, **kw)) == "per_sequence"


def test_env_forces_path(monkeypatch):
    seed = new_seed()
    args, kw = make_problem(seed, B=3, T=3, task_ids=[0, 1, 2], Sq=1, Skv=7)
    calls = []
    real = triton_decode._grouped_prefix_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_decode, "_grouped_prefix_kernel", Spy())
    monkeypatch.setenv(triton_decode.ENV_PATH, "grouped")
    check(seed, args, kw)
    assert len(calls) == 1, "SOFTPROMPT_DECODE_PATH=grouped did not take the grouped path"
    monkeypatch.setenv(triton_decode.ENV_PATH, "per_sequence")
    check(seed, args, kw)
    assert len(calls) == 1, "SOFTPROMPT_DECODE_PATH=per_sequence took the grouped path"
    monkeypatch.setenv(triton_decode.ENV_PATH, "bogus")
    with pytest.raises(ValueError, match="path"):
        decode_attention(validate_inputs(*args, **kw))


def test_dispatcher_routes_decode_calls():
    """``triton_backend.triton_attention`` sends Sq <= 16, no-grad, mask-free calls here."""
    from softprompt.kernels import triton_backend
    seed = new_seed()
    args, kw = make_problem(seed, B=6, T=2, Hq=4, Hkv=2, Sq=3, Skv=13)
    assert triton_backend.wants_decode_path(validate_inputs(*args, **kw))
    with torch.no_grad():
        got = triton_backend.triton_attention(validate_inputs(*args, **kw))
    ref = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(got, ref, **TOL[torch.float32], msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.skipif("triton" not in available_backends("cpu"),
                    reason="backend='triton' is not offered yet (kernels/triton_prefill.py missing)")
def test_public_entry_point_backend_triton():
    seed = new_seed()
    args, kw = make_problem(seed, B=7, T=3, Hq=4, Hkv=2, Sq=4, Skv=17, window=6)
    with torch.no_grad():
        got = prefix_attention(*args, backend="triton", **kw)
    ref = prefix_attention(*args, backend="reference", **kw)
    torch.testing.assert_close(got, ref, **TOL[torch.float32], msg=lambda m: f"seed={seed}: {m}")


def test_rejects_unsupported_inputs():
    seed = new_seed()
    args, kw = make_problem(seed, B=2, T=1, D=8, Sq=1, Skv=3, ragged=False)
    x = validate_inputs(*args, **kw)
    with pytest.raises(ValueError, match="path"):
        decode_attention(x, path="sideways")
    big, kw = make_problem(seed, B=1, T=1, Hq=1, Hkv=1, D=260, Sq=1, Skv=2, ragged=False)
    with pytest.raises(ValueError, match="head dimension"):
        decode_attention(validate_inputs(*big, **kw))


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:                                   # noqa: BLE001 - no CUDA toolchain in this triton
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend / ptxas is not available")
def test_kernels_compile_for_sm90():
    """The interpreter is lenient; compile the GPU launch configs ahead of time (no GPU needed)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_decode.py"), "--compile-check", "--quick"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"sm_90 compile failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "all decode kernel configurations compile" in r.stdout


@pytest.mark.parametrize("path", PATHS)
def test_keys_masked_for_some_queries_of_a_tile_never_reach_them(path):
    """Window- and causal-masked keys of a tile (NaN / inf) reached every query of the tile
    (0 x NaN in p @ v) and a visible inf prefix row gave 0 instead of NaN. Now only the queries
    that see a poisoned key are NaN; junk in unused block-table entries is never read."""
    from dataclasses import replace

    from cases import masked_key_poison_case
    seed = new_seed()
    clean, poisoned, kw, sees = masked_key_poison_case(seed)
    want = prefix_attention(*clean, backend="reference", **kw)
    for num_splits in (None, 3):
        got = decode_attention(validate_inputs(*poisoned, **kw), path=path, num_splits=num_splits)
        assert got[:, :, sees].isnan().all() and torch.isfinite(got[:, :, ~sees]).all(), f"seed={seed}"
        torch.testing.assert_close(got[:, :, ~sees], want[:, :, ~sees], **TOL[torch.float32])
    junk = clean[5].clone()
    junk[1, 1] = 10 ** 9
    got = decode_attention(replace(validate_inputs(*clean, **kw), block_table=junk), path=path)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("path", PATHS)
def test_a_visible_non_finite_prefix_row_makes_its_queries_nan(path):
    seed = new_seed()
    args, kw = make_problem(seed, B=4, T=2, Sq=2, Skv=5, prefix_lens=[3, 6], task_ids=[0, 1, 0, 1],
                            ragged=False)
    pk = args[3].clone()
    pk[args[5][1, 1], :, 0] = float("inf")                 # task 1's row 4 (block 1, row 0)
    got = decode_attention(validate_inputs(*args[:3], pk, *args[4:], **kw), path=path)
    want = prefix_attention(*args, backend="reference", **kw)
    assert got[[1, 3]].isnan().all(), f"seed={seed}"
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], **TOL[torch.float32])
