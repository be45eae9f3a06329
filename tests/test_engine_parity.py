"""Greedy engine outputs of mixed-task batches equal, token for token, each request generated alone
through the attached model's generate() and the PEFT-style reference (tiny random fp32 models)."""
import pytest
import torch

from softprompt.engine import cpu_kernel

from test_engine_common import (attach, engine, greedy, one_thread, peft_reference, random_rows, setup,
                                solo_generate)

_threads = pytest.fixture(autouse=True)(one_thread)

ROWS = [6, 3, 5, 4, 7, 2, 5]
NEW = 6


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt_neox", "gpt2", "gemma2"])
def test_mixed_task_batch_equals_solo_generate_and_peft_reference(family):
    model, prefixes, names = setup(family)
    tasks = [names[0], names[1], None, names[1], names[2], names[0], None]
    rows = random_rows(ROWS)
    peft = peft_reference(model, rows, tasks, prefixes, NEW)
    store = attach(model, prefixes)
    solo = solo_generate(model, store, rows, tasks, NEW)
    eng = engine(model)
    # Llama-family decode steps run through the engine's own CPU decoder, the rest through HF
    assert (eng.cpu_decoder is not None) == (family in ("llama", "qwen2", "mistral"))
    if eng.cpu_decoder is not None and cpu_kernel.load() is not None:   # and their attention through the kernel
        assert eng.stats()["forward_path"] == "CPU decoder, compiled paged attention"
    results = eng.generate(rows, tasks, greedy(NEW))
    for b, res in enumerate(results):
        assert res.ok and res.finish_reason == "length", res.error
        assert res.token_ids == solo[b], f"{family} row {b} (task {tasks[b]}) vs solo generate"
        assert res.token_ids == peft[b], f"{family} row {b} (task {tasks[b]}) vs PEFT-style reference"
    assert eng.kv.pages_used == 0                       # every finished sequence gave its pages back
    if family != "gemma2":                              # gemma2 soft-capping takes the dense path by design
        assert store.calls["mask"] == 0 and store.calls["dense"] == 0 and store.calls["lengths"] > 0


def test_prefix_is_read_in_place_not_copied():
    """The engine's KV pool holds only own tokens: pages used = ceil(own tokens / page) per sequence."""
    model, prefixes, names = setup("llama", lengths=[16, 9])
    attach(model, prefixes)
    eng = engine(model, page_size=4)
    rows = random_rows([5, 8])
    rids = [eng.add_request(r, t, greedy(3)) for r, t in zip(rows, names)]
    eng.step()                                          # prefill: own tokens only
    assert [len(eng.kv.pages(eng._seqs[i])) for i in rids] == [2, 2]     # ceil(5/4), ceil(8/4) (+0 prefix)
    while eng.has_unfinished():
        eng.step()


def test_generate_accepts_task_names_and_single_task():
    model, prefixes, names = setup("llama")
    attach(model, prefixes)
    eng = engine(model)
    rows = random_rows([4, 5])
    both = eng.generate(rows, names[0], greedy(4))
    one = [eng.generate([r], [names[0]], greedy(4))[0] for r in rows]
    assert [r.token_ids for r in both] == [r.token_ids for r in one]
