"""PrefixStore: block bookkeeping, round trips, and layer() feeding prefix_attention."""
import pytest
import torch

from softprompt.kernels import prefix_attention
from softprompt import PrefixStore

L, H, D = 3, 2, 8


def prefix(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, P, D, generator=g), torch.randn(L, H, P, D, generator=g)


def dense_attention(q, k, v, pk, pv):
    """Plain attention over [prefix ; own] (non-causal), for one sequence: q [Hq,S,D]."""
    G = q.shape[0] // k.shape[0]
    keys = torch.cat([pk, k], 1).repeat_interleave(G, 0)
    vals = torch.cat([pv, v], 1).repeat_interleave(G, 0)
    return torch.softmax(q @ keys.transpose(-1, -2) * D ** -0.5, -1) @ vals


@pytest.mark.parametrize("block_size", [1, 4, 5, 16])
def test_round_trip_and_block_reuse(block_size):
    store = PrefixStore(L, H, D, block_size=block_size)
    a, b, c = prefix(7, 1), prefix(3, 2), prefix(0, 3)
    assert store.add("a", *a) == 0 and store.add("b", *b) == 1 and store.add("empty", *c) == 2
    for name, (k, v) in (("a", a), ("b", b), ("empty", c)):
        gk, gv = store.get(name)
        assert torch.equal(gk, k) and torch.equal(gv, v)
    used_before = store.memory_stats()["blocks_used"]
    store.remove("b")
    assert "b" not in store and store.names == ["a", "empty"]
    d = prefix(3, 4)
    assert store.add("d", *d) == 3, "a new task gets a new id, never the removed task's"
    assert store.memory_stats()["blocks_used"] == used_before, "freed blocks are reused"
    assert torch.equal(store.get("a")[0], a[0]), "other tasks are untouched"
    store.replace("a", *prefix(12, 5))
    assert store.prefix_len("a") == 12 and torch.equal(store.get("a")[1], prefix(12, 5)[1])
    assert torch.equal(store.get("d")[0], d[0])


def test_grows_and_accounts_memory():
    store = PrefixStore(L, H, D, block_size=4, num_blocks=2)
    for t in range(5):
        store.add(f"t{t}", *prefix(9, t))
    stats = store.memory_stats()
    assert stats["blocks_used"] == 15 and stats["blocks_total"] >= 15
    assert stats["bytes_used"] == 15 * 2 * L * H * 4 * D * 4
    assert stats["tasks"]["t3"] == {"id": 3, "prefix_len": 9, "blocks": 3, "bytes": 3 * stats["bytes_per_block"]}
    for t in range(5):
        assert torch.equal(store.get(f"t{t}")[0], prefix(9, t)[0])


def test_removing_large_tasks_shrinks_the_pools_and_keeps_the_rest():
    """A burst of long temporary prompts (few-shot evaluation) must not leave every later forward
    with a mostly empty pool to copy and differentiate."""
    store = PrefixStore(L, H, D, block_size=2)
    keep = {"a": prefix(5, 1), "b": prefix(0, 2), "c": prefix(3, 3)}
    store.add("a", *keep["a"])
    store.add("big", *prefix(300, 9))
    store.add("b", *keep["b"])
    store.add("c", *keep["c"])
    assert store.num_blocks >= 155
    store.remove("big")
    used = store.memory_stats()["blocks_used"]
    assert used == 5 and store.num_blocks == 2 * used, "the pools shrink to twice the blocks in use"
    assert store.names == ["a", "b", "c"] and store.task_id("c") == 3, "task ids are kept"
    for name, (k, v) in keep.items():
        gk, gv = store.get(name)
        assert torch.equal(gk, k) and torch.equal(gv, v)
    q = torch.randn(3, 4, 2, D)
    names = ["c", "a", "b"]
    own = torch.randn(3, H, 2, D)
    out = prefix_attention(q, own, own, *store.layer(1), store.task_ids(names), causal=False)
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i], dense_attention(q[i], own[i], own[i], keep[name][0][1], keep[name][1][1]))
    store.add("d", *prefix(4, 4))                      # the spare blocks are used before growing again
    assert store.num_blocks == 10 and torch.equal(store.get("d")[0], prefix(4, 4)[0])
    store.compact()
    assert store.num_blocks == 7 and torch.equal(store.get("a")[1], keep["a"][1])


def test_swap_pools_validates_and_returns_the_old_pair():
    store = PrefixStore(L, H, D, block_size=4)
    store.add("a", *prefix(5, 1))
    k, v = store.k_blocks.clone() + 1, store.v_blocks.clone()
    old = store.swap_pools(k, v)
    assert store.k_blocks is k and torch.equal(store.layer(0)[0], k[0])
    store.swap_pools(*old)
    assert torch.equal(store.get("a")[0], prefix(5, 1)[0])
    with pytest.raises(ValueError, match="like the pool"):
        store.swap_pools(k[:, :1], v)
    with pytest.raises(ValueError, match="trainable"):
        PrefixStore(L, H, D, trainable=True).swap_pools(k, v)


def test_layer_feeds_prefix_attention():
    store = PrefixStore(L, H, D, block_size=3)
    tasks = {"x": prefix(5, 1), "y": prefix(0, 2), "z": prefix(8, 3)}
    for name, (k, v) in tasks.items():
        store.add(name, k, v)
    names = ["z", "x", "y", "z"]
    B, Hq, S = len(names), 4, 6
    q, k, v = torch.randn(B, Hq, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    for layer in range(L):
        out = prefix_attention(q, k, v, *store.layer(layer), store.task_ids(names), causal=False)
        for b, name in enumerate(names):
            pk, pv = tasks[name][0][layer], tasks[name][1][layer]
            torch.testing.assert_close(out[b], dense_attention(q[b], k[b], v[b], pk, pv))


def test_to_dtype_moves_pools_and_keeps_tables():
    store = PrefixStore(L, H, D, block_size=4)
    store.add("a", *prefix(6))
    half = store.to(torch.float16)
    assert half.k_blocks.dtype == torch.float16 and half.block_table.dtype == torch.long
    torch.testing.assert_close(half.get("a")[0].float(), prefix(6)[0], atol=1e-2, rtol=1e-2)


def test_trainable_store_receives_gradients():
    store = PrefixStore(L, H, D, block_size=4, trainable=True)
    store.add("a", *prefix(6))
    assert isinstance(store.k_blocks, torch.nn.Parameter)
    q, k, v = torch.randn(2, H, 3, D), torch.randn(2, H, 3, D), torch.randn(2, H, 3, D)
    pk, pv, table, lens = store.layer(1)
    prefix_attention(q, k, v, pk, pv, table, lens, store.task_ids(["a", "a"])).sum().backward()
    assert store.k_blocks.grad[1].abs().sum() > 0 and store.k_blocks.grad[0].abs().sum() == 0


@pytest.mark.parametrize("call, match", [
    (lambda s: s.add("a", *prefix(2)), "`name`"),
    (lambda s: s.add("", *prefix(2)), "`name`"),
    (lambda s: s.add("n", torch.randn(L + 1, H, 2, D), torch.randn(L + 1, H, 2, D)), "`k`"),
    (lambda s: s.add("n", torch.randn(L, H, 2, D), torch.randn(L, H, 3, D)), "`v`"),
    (lambda s: s.add("n", torch.full((L, H, 2, D), float("nan")), torch.zeros(L, H, 2, D)), "NaN"),
    (lambda s: s.remove("missing"), "`name`"),
    (lambda s: s.replace("missing", *prefix(2)), "`name`"),
    (lambda s: s.task_ids(["a", "missing"]), "`name`"),
    (lambda s: s.layer(L), "`layer`"),
])
def test_bad_calls_raise_value_error(call, match):
    store = PrefixStore(L, H, D)
    store.add("a", *prefix(2))
    with pytest.raises(ValueError, match=match):
        call(store)
    assert store.names == ["a"] and torch.equal(store.get("a")[0], prefix(2)[0]), "store left untouched"


def test_constructor_validates():
    with pytest.raises(ValueError, match="`block_size`"):
        PrefixStore(L, H, D, block_size=0)
    with pytest.raises(ValueError, match="`num_layers`"):
        PrefixStore(0, H, D)


# ---------------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("dtype, big", [(torch.float16, 1e5), (torch.bfloat16, 3.4e38)])
def test_values_beyond_the_pool_dtype_are_refused_not_stored_as_inf(dtype, big):
    """The finiteness check runs after the cast to the pool dtype: a finite fp32 value that
    overflows the pool would be stored as inf and turn attention into NaN."""
    store = PrefixStore(L, H, D, dtype=dtype)
    store.add("a", *prefix(2))
    k = prefix(3)[0].clone()
    k[1, 0, 2, 3] = big
    with pytest.raises(ValueError, match=r"`k` with values up to .* range"):
        store.add("b", k, prefix(3)[1])
    with pytest.raises(ValueError, match=r"`v` with values up to .* range"):
        store.replace("a", prefix(3)[0], k)
    assert store.names == ["a"] and torch.isfinite(store.k_blocks).all() and torch.isfinite(store.v_blocks).all()
    torch.testing.assert_close(store.get("a")[0].float(), prefix(2)[0], atol=2e-2, rtol=1e-2)


def test_removed_task_ids_are_never_reused_and_are_refused():
    """A removed task's id must neither run silently with no prefix nor, after the next add(),
    silently mean another task."""
    store = PrefixStore(L, H, D, block_size=2)
    ids = {n: store.add(n, *prefix(P, i)) for i, (n, P) in enumerate((("a", 3), ("b", 5), ("c", 0)))}
    store.remove("b")
    stale = torch.tensor([ids["a"], ids["b"]])
    with pytest.raises(ValueError, match=r"`task_ids` naming removed tasks \(ids \[1\]\)"):
        store.check_task_ids(stale)
    new = store.add("d", *prefix(4, 9))
    assert new not in ids.values(), "the new task gets a fresh id"
    with pytest.raises(ValueError, match="`task_ids` naming removed tasks"):
        store.check_task_ids(stale)
    with pytest.raises(ValueError, match="`task`"):
        store.task_name(ids["b"])
    for bad in ([-1], [new + 1]):
        with pytest.raises(ValueError, match="`task_ids` with values"):
            store.check_task_ids(torch.tensor(bad))
    store.check_task_ids(store.task_ids(["a", "d", "c"]))
    # the kernels see the same table layout: the dead row is empty, the live ones are intact
    pk, pv, table, lens = store.layer(0)
    assert table.shape[0] == 4 and int(lens[ids["b"]]) == 0 and (table[ids["b"]] == -1).all()
    assert store.memory_stats()["table_rows"] == 4
    q, own = torch.randn(2, H, 3, D), torch.randn(2, H, 3, D)
    out = prefix_attention(q, own, own, pk, pv, table, lens, store.task_ids(["d", "a"]), causal=False)
    for b, (name, seed, P) in enumerate((("d", 9, 4), ("a", 0, 3))):
        k, v = prefix(P, seed)
        torch.testing.assert_close(out[b], dense_attention(q[b], own[b], own[b], k[0], v[0]))


def test_check_task_ids_is_memoised_per_tensor_and_store_change():
    store = PrefixStore(L, H, D)
    store.add("a", *prefix(2))
    store.add("b", *prefix(2))
    ids = torch.tensor([0, 1])
    store.check_task_ids(ids)
    store.remove("a")                       # the store changed: the same tensor is checked again
    with pytest.raises(ValueError, match="removed"):
        store.check_task_ids(ids)
    ok = torch.tensor([1, 1])
    store.check_task_ids(ok)
    ok[0] = 0                               # modified in place: checked again
    with pytest.raises(ValueError, match="removed"):
        store.check_task_ids(ok)
    with pytest.raises(ValueError, match="`task_ids` of type"):
        store.check_task_ids(torch.tensor([1.0]))


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("fp16", torch.float16),
                                         ("bfloat16", torch.bfloat16), ("torch.float64", torch.float64),
                                         ("bf16", torch.bfloat16), (torch.float16, torch.float16)])
def test_constructor_accepts_dtype_names(name, dtype):
    store = PrefixStore(L, H, D, dtype=name)
    store.add("a", *prefix(3))
    assert store.dtype == dtype and store.get("a")[0].dtype == dtype


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float33"), "`dtype` 'float33'"), (dict(dtype=torch.int32), "`dtype`"), (dict(dtype=3), "`dtype`"),
    (dict(device="nowhere"), "`device` 'nowhere'"), (dict(device=1.5), "`device`"),
    (dict(num_blocks=-1), "`num_blocks`"), (dict(num_blocks="2"), "`num_blocks`"),
    (dict(block_size=True), "`block_size`"), (dict(block_size=2.0), "`block_size`"),
    (dict(trainable="yes"), "`trainable`"),
])
def test_constructor_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixStore(L, H, D, **kwargs)
    for args in ((L, 0, D), (L, H, -1), ("3", H, D)):
        with pytest.raises(ValueError, match="a positive int"):
            PrefixStore(*args)


@pytest.mark.parametrize("bad", ["x", -1, 2.5, None, True])
def test_reserve_refuses_non_counts(bad):
    store = PrefixStore(L, H, D)
    with pytest.raises(ValueError, match="`num_blocks`"):
        store.reserve(bad)
    store.reserve(3)
    assert store.num_blocks == 3 and store.memory_stats()["blocks_free"] == 3


def test_task_ids_of_one_name_is_one_id_not_its_characters():
    store = PrefixStore(L, H, D)
    store.add("a", *prefix(1))
    store.add("ab", *prefix(2))
    assert store.task_ids("ab").tolist() == [1]
    assert store.task_ids(("ab", "a")).tolist() == [1, 0] and store.task_ids([]).shape == (0,)
    for bad in (5, torch.tensor([0]), None):
        with pytest.raises(ValueError, match="`names`"):
            store.task_ids(bad)
    with pytest.raises(ValueError, match="`name`"):
        store.task_ids(["a", 0])
    assert ["a"] not in store and 0 not in store and "ab" in store


def test_check_task_ids_of_inference_tensors_compares_values():
    """Inference tensors keep no version counter: an in-place change is found by value."""
    store = PrefixStore(L, H, D)
    store.add("a", *prefix(2))
    store.add("b", *prefix(2))
    store.remove("a")
    with torch.inference_mode():
        ids = torch.tensor([1, 1])
        store.check_task_ids(ids)
        store.check_task_ids(ids)
        ids[0] = 0
        with pytest.raises(ValueError, match="removed"):
            store.check_task_ids(ids)


def test_compact_never_grows_the_pools():
    store = PrefixStore(L, H, D, block_size=2)
    for name, P in (("a", 3), ("b", 2), ("c", 4)):
        store.add(name, *prefix(P))
    store.remove("b")                                 # a hole in the middle: compact moves blocks
    total = store.num_blocks
    store.compact(spare=50)
    assert store.num_blocks == total and store.memory_stats()["blocks_free"] == total - 4
    assert torch.equal(store.get("c")[0], prefix(4)[0])
    store.compact(spare=1)
    assert store.num_blocks == 5
