"""Continuous batching: requests joining a running batch, queueing, chunked prefill and preemption
all give the tokens each request gets when run alone; the paged KV cache frees pages at once."""
import pytest
import torch

from softprompt.engine import PagedKVCache, cpu_kernel
from softprompt.engine.kv_cache import OutOfPages
from test_engine_common import attach, engine, greedy, one_thread, random_rows, setup, solo_generate

_threads = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model_and_solo():
    torch.set_num_threads(1)
    model, prefixes, names = setup("llama")
    store = attach(model, prefixes)
    rows = random_rows([6, 3, 9, 4, 7, 2, 5, 8], seed=11)
    tasks = [names[i % 3] if i % 4 != 3 else None for i in range(len(rows))]
    news = [5, 8, 3, 6, 4, 7, 2, 6]
    solo = [solo_generate(model, store, [r], [t], n)[0] for r, t, n in zip(rows, tasks, news)]
    return model, rows, tasks, news, solo


def test_requests_added_while_others_run(model_and_solo):
    model, rows, tasks, news, solo = model_and_solo
    eng = engine(model)
    if cpu_kernel.load() is not None:                   # joins go through the compiled CPU attention
        assert eng.stats()["forward_path"] == "CPU decoder, compiled paged attention"
    ids = {}
    for b in range(3):
        ids[b] = eng.add_request(rows[b], tasks[b], greedy(news[b]))
    for step in range(12):
        for b in range(3, len(rows)):               # late arrivals join at different steps
            if step == b - 2:
                ids[b] = eng.add_request(rows[b], tasks[b], greedy(news[b]))
        eng.step()
    while eng.has_unfinished():
        eng.step()
    for b, rid in ids.items():
        res = eng.take_result(rid)
        assert res.ok and res.token_ids == solo[b], f"row {b}"
    assert eng.kv.pages_used == 0


@pytest.mark.parametrize("limits", [dict(max_batch_size=2), dict(max_num_batched_tokens=4),
                                    dict(max_pages=9, num_pages=4, max_batch_size=8)])
def test_queueing_chunked_prefill_and_preemption_keep_tokens(model_and_solo, limits):
    model, rows, tasks, news, solo = model_and_solo
    eng = engine(model, **limits)
    results = eng.generate(rows, tasks, [greedy(n) for n in news])
    assert [r.token_ids for r in results] == solo
    st = eng.stats()
    if "max_batch_size" in limits and len(limits) == 1:
        assert st["mean_decode_batch"] <= 2
    if "max_num_batched_tokens" in limits:
        assert st["max_step_tokens"] == 4 and st["forwards"] > len(rows)     # prompts went in chunks
    if "max_pages" in limits:
        assert eng.kv.num_pages <= 9 and st["preemptions"] > 0
    assert eng.kv.pages_used == 0


def test_paged_cache_allocates_frees_and_grows():
    kv = PagedKVCache(2, 2, 8, page_size=4, num_pages=3)
    a, b = object(), object()
    kv.ensure(a, 5)                                  # 2 pages (page 0 is the null page)
    assert len(kv.pages(a)) == 2 and 0 not in kv.pages(a)
    kv.ensure(b, 9)                                  # 3 more pages: the pool grows
    assert kv.num_pages >= 6 and len(set(kv.pages(a)) | set(kv.pages(b))) == 5
    kv.k[:, 4 * kv.pages(a)[0]] = 1.0
    assert kv.free(a) == 2 and kv.pages_used == 3
    kv.ensure(b, 12)
    assert len(kv.pages(b)) == 3
    capped = PagedKVCache(1, 1, 4, page_size=2, num_pages=2, max_pages=3)
    capped.ensure(a, 4)
    with pytest.raises(OutOfPages):
        capped.ensure(b, 2)
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 1, 4, page_size=0)


def test_pool_that_cannot_grow_keeps_the_request_queued(model_and_solo, monkeypatch):
    """Admission takes a request off the queue only once its pages are granted: a pool growth that
    fails (out of memory) used to drop the request (no result ever, generate() looping forever)."""
    model, rows, tasks, news, solo = model_and_solo
    eng = engine(model, num_pages=2)                    # 1 usable page: admitting 6 tokens must grow it

    def no_memory(needed):
        raise RuntimeError("no memory for the KV pool")

    rid = eng.add_request(rows[0], tasks[0], greedy(news[0]))
    with monkeypatch.context() as patch:
        patch.setattr(eng.kv, "_grow", no_memory)
        with pytest.raises(RuntimeError, match="no memory"):
            eng.step()
    for _ in range(3 * news[0]):
        if not eng.has_unfinished():
            break
        eng.step()
    res = eng.take_result(rid)
    assert res is not None and res.ok and res.token_ids == solo[0]
    assert eng.kv.pages_used == 0
