"""Property-based fuzzing of the prefix store: random sequences of add / replace / remove / reserve /
compact / swap_pools, with the whole store checked against a plain model after every step.

Checked after every step: every live task's ``get()`` is exactly what was last written (cast to the
pool dtype), the block bookkeeping is consistent (no block used twice, used + free = total, table
rows match the tasks), ids are never reused and ids of removed tasks are refused, and
``prefix_attention`` through ``store.layer(i)`` with live ids matches attention over the prefixes
materialised by hand. Run deep with ``--hypothesis-profile=long``.
"""
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softprompt.kernels import prefix_attention
from softprompt.integration.families import FAMILIES
from softprompt.integration.store import ModelPrefixStore

L, H, D, HQ = 2, 2, 4, 4
NAMES = "abcde"
POISON = {"nan": float("nan"), "big": 1e5}          # 1e5 is finite in float32, inf in float16


def tensors(P: int, seed: int, poison=None):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(L, H, P, D, generator=g), torch.randn(L, H, P, D, generator=g)
    if poison is not None and P:
        k[seed % L, 0, seed % P, seed % D] = POISON[poison]
    return k, v


lengths = st.integers(0, 9)
seeds = st.integers(0, 2 ** 16)
names = st.sampled_from(NAMES)
ops = st.one_of(
    st.tuples(st.just("add"), names, lengths, seeds, st.sampled_from([None, None, None, "nan", "big"])),
    st.tuples(st.just("replace"), names, lengths, seeds),
    st.tuples(st.just("remove"), names),
    st.tuples(st.just("reserve"), st.integers(0, 24)),
    st.tuples(st.just("compact"), st.integers(0, 3)),
    st.tuples(st.just("swap")),
)


class Model:
    """What the store should hold: live tasks' prefixes and ids, and every id ever given."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.live = {}            # name -> (id, k, v) as stored (cast to the pool dtype)
        self.issued = []          # ids in the order given

    @property
    def dead(self):
        live = {t for t, _, _ in self.live.values()}
        return [t for t in self.issued if t not in live]


def refused(store, fn, match):
    """``fn`` raises ValueError and changes nothing observable."""
    before = (store.names, store.memory_stats(), store.block_table.clone())
    with pytest.raises(ValueError, match=match):
        fn()
    after = (store.names, store.memory_stats(), store.block_table)
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])


def apply(store, model, op):
    kind = op[0]
    if kind == "add":
        _, name, P, seed, poison = op
        k, v = tensors(P, seed, poison)
        if name in model.live:
            return refused(store, lambda: store.add(name, k, v), "`name`")
        if P and (poison == "nan" or (poison == "big" and model.dtype == torch.float16)):
            return refused(store, lambda: store.add(name, k, v), "`k`")
        task = store.add(name, k, v)
        assert task not in model.issued, "a task id is never given twice"
        model.issued.append(task)
        model.live[name] = (task, k.to(model.dtype), v.to(model.dtype))
    elif kind == "replace":
        _, name, P, seed = op
        k, v = tensors(P, seed)
        if name not in model.live:
            return refused(store, lambda: store.replace(name, k, v), "`name`")
        task = model.live[name][0]
        assert store.replace(name, k, v) == task, "replace keeps the id"
        model.live[name] = (task, k.to(model.dtype), v.to(model.dtype))
    elif kind == "remove":
        name = op[1]
        if name not in model.live:
            return refused(store, lambda: store.remove(name), "`name`")
        store.remove(name)
        del model.live[name]
    elif kind == "reserve":
        before = store.num_blocks
        store.reserve(op[1])
        assert store.num_blocks == max(before, op[1])
    elif kind == "compact":
        before, used = store.num_blocks, store.memory_stats()["blocks_used"]
        store.compact(spare=op[1])
        assert store.num_blocks == min(before, used + op[1]), "compact cuts to used + spare, never grows"
        in_use = sorted(int(b) for t, _, _ in model.live.values() for b in _blocks_of(store, t))
        assert in_use == list(range(used)), "compact moves the blocks in use to the front"
    elif kind == "swap":
        if store.trainable:
            return refused(store, lambda: store.swap_pools(store.k_blocks.detach().clone(),
                                                           store.v_blocks.detach().clone()), "trainable")
        k, v = store.k_blocks.clone(), store.v_blocks.clone()
        store.swap_pools(k, v)                      # later writes and reads go to the swapped pools
        assert store.k_blocks is k and store.v_blocks is v


def _blocks_of(store, task):
    n = -(-int(store.prefix_lens[task]) // store.block_size)
    return store.block_table[task, :n].tolist()


def check(store, model, data):
    # lookups and contents
    by_id = sorted((t, n) for n, (t, _, _) in model.live.items())
    assert store.names == [n for _, n in by_id] and len(store) == len(model.live)
    for name, (task, k, v) in model.live.items():
        assert store.task_id(name) == task and store.task_name(task) == name and store.prefix_len(name) == k.shape[2]
        gk, gv = store.get(name)
        assert gk.dtype == model.dtype and torch.equal(gk, k) and torch.equal(gv, v), f"task {name!r} changed"

    # block bookkeeping
    stats = store.memory_stats()
    table, lens = store.block_table, store.prefix_lens
    assert table.shape[0] == lens.shape[0] == len(model.issued), "one table row per id ever given"
    used = []
    for name, (task, k, _) in model.live.items():
        blocks = _blocks_of(store, task)
        assert len(blocks) == math.ceil(k.shape[2] / store.block_size) == stats["tasks"][name]["blocks"]
        assert int(lens[task]) == k.shape[2] and (table[task, len(blocks):] == -1).all()
        used += blocks
    free = list(store._free_blocks)
    assert len(set(used)) == len(used), "no block is used by two tasks (or twice by one)"
    assert sorted(used + free) == list(range(store.num_blocks)), "used + free = all blocks, once each"
    assert stats["blocks_used"] == len(used) and stats["blocks_free"] == len(free)
    assert stats["blocks_total"] == store.num_blocks == stats["blocks_used"] + stats["blocks_free"]
    assert stats["bytes_used"] == stats["bytes_per_block"] * len(used)
    assert stats["prefix_rows"] == sum(k.shape[2] for _, k, _ in model.live.values())

    # ids of removed tasks: refused, and their rows are empty
    for task in model.dead:
        assert int(lens[task]) == 0 and (table[task] == -1).all()
        live_ids = [t for t, _, _ in model.live.values()]
        with pytest.raises(ValueError, match="`task_ids` naming removed tasks"):
            store.check_task_ids(torch.tensor(live_ids + [task]))
        with pytest.raises(ValueError, match="`task_ids` naming removed tasks"):
            store.resolve_task_ids(torch.tensor([task] + live_ids))
        with pytest.raises(ValueError, match="`task`"):
            store.task_name(task)

    attention_matches(store, model, data, "torch")


def attention_matches(store, model, data, backend, device="cpu"):
    """``prefix_attention`` through ``store.layer(i)`` for a batch of live tasks == attention over
    the tasks' last written prefixes materialised by hand."""
    if not model.live:
        return
    rows = data.draw(st.lists(st.sampled_from(sorted(model.live)), min_size=1, max_size=4), label="rows")
    layer = data.draw(st.integers(0, L - 1), label="layer")
    g = torch.Generator().manual_seed(len(model.issued))
    B, S = len(rows), 3
    q = torch.randn(B, HQ, S, D, generator=g)
    own_k, own_v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    pk, pv, bt, pl = store.layer(layer)
    ids = store.resolve_task_ids(rows, batch=B)
    on = [t.to(device) for t in (q, own_k, own_v, pk.detach().float(), pv.detach().float(), bt, pl, ids)]
    out = prefix_attention(*on, causal=True, backend=backend).cpu()
    for b, name in enumerate(rows):
        _, k, v = model.live[name]
        torch.testing.assert_close(out[b], dense_causal(q[b], own_k[b], own_v[b], k[layer].float(), v[layer].float()),
                                   atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}, row {b} ({name!r}): {m}")


def dense_causal(q, k, v, pk, pv):
    """One sequence ``q [Hq, S, D]``: softmax over [prefix (all visible) ; own keys (causal)]."""
    G, S, P = q.shape[0] // k.shape[0], q.shape[1], pk.shape[1]
    keys = torch.cat([pk, k], 1).repeat_interleave(G, 0)
    vals = torch.cat([pv, v], 1).repeat_interleave(G, 0)
    scores = q @ keys.transpose(-1, -2) * D ** -0.5
    own_hidden = torch.ones(S, S, dtype=torch.bool).triu(1)
    scores[:, :, P:] = scores[:, :, P:].masked_fill(own_hidden, float("-inf"))
    return torch.softmax(scores, -1) @ vals


@given(block_size=st.sampled_from([1, 2, 3, 5]), dtype=st.sampled_from([torch.float32, torch.float16]),
       trainable=st.booleans(), num_blocks=st.integers(0, 4), steps=st.lists(ops, min_size=1, max_size=30),
       data=st.data())
def test_random_store_histories_keep_every_invariant(block_size, dtype, trainable, num_blocks, steps, data):
    store = ModelPrefixStore(L, H, D, family=FAMILIES["gpt2"], block_size=block_size, dtype=dtype,
                             trainable=trainable)
    store.reserve(num_blocks)
    model = Model(dtype)
    for op in steps:
        apply(store, model, op)
        check(store, model, data)
    # the Triton kernels read the same table once per history (the CPU interpreter is slow)
    if torch.cuda.is_available():
        attention_matches(store, model, data, "triton", "cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        attention_matches(store, model, data, "triton")


id_specs = st.one_of(
    st.integers(-3, 8), st.booleans(), st.none(), st.floats(allow_nan=True), st.text(max_size=3),
    st.lists(st.one_of(st.integers(-3, 8), st.sampled_from(NAMES), st.booleans()), max_size=4),
    st.lists(st.sampled_from(NAMES + "xy"), min_size=1, max_size=4).map(tuple),
    st.tuples(st.lists(st.integers(-3, 8), max_size=4), st.sampled_from([torch.long, torch.int32, torch.float32,
                                                                          torch.bool, torch.uint8])).map(
        lambda x: torch.tensor(x[0], dtype=x[1]) if x[1] != torch.bool else torch.tensor(x[0]) > 0),
)


@given(spec=id_specs, batch=st.one_of(st.none(), st.integers(1, 4)), removed=st.sets(st.sampled_from(NAMES)))
def test_resolve_task_ids_returns_live_ids_or_a_value_error(spec, batch, removed):
    """Whatever a caller passes as ``task_ids``: live ids of the right length, or a ValueError."""
    store = ModelPrefixStore(L, H, D, family=FAMILIES["llama"], block_size=2)
    for i, name in enumerate(NAMES):
        store.add(name, *tensors(i % 3, i))
    for name in removed:
        store.remove(name)
    try:
        ids = store.resolve_task_ids(spec, batch=batch)
    except ValueError as exc:
        assert "task_ids" in str(exc) or "`name" in str(exc)
        return
    live = {store.task_id(n) for n in store.names}
    assert ids.dtype == torch.long and ids.dim() == 1 and set(ids.tolist()) <= live
    assert batch is None or ids.shape == (batch,)
