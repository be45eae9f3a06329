"""Bad requests error alone; seeded sampling is reproducible; stop strings / EOS end a request early
and free its pages; streaming yields the same tokens as generate()."""
import pytest
import torch

from softprompt.engine import SamplingParams
from softprompt.integration.attach import attached_store
from test_engine_common import (EOS, CharTokenizer, attach, engine, greedy, one_thread, random_rows, setup,
                                solo_generate)

_threads = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, prefixes, names = setup("llama")
    store = attach(model, prefixes)
    return model, store, names


def test_bad_requests_error_alone(tiny):
    model, store, names = tiny
    rows = random_rows([5, 4, 6])
    solo = solo_generate(model, store, rows, [names[0], names[1], None], 4)
    eng = engine(model, tokenizer=CharTokenizer(96))
    prompts = [rows[0], "nonsense", rows[1], [], rows[2], [1] * 200, rows[0], rows[0], [500], ""]
    tasks = [names[0], "no-such-task", names[1], names[0], None, None, names[0], names[0], None, None]
    sampling = [greedy(4)] * 6 + [SamplingParams(temperature=-1.0), SamplingParams(top_p=0.0),
                                  greedy(4), greedy(4)]
    res = eng.generate(prompts, tasks, sampling)
    assert [r.token_ids for r in (res[0], res[2], res[4])] == solo
    for i, pattern in [(1, "unknown task 'no-such-task'"), (3, "empty"), (5, "too long"),
                       (6, "temperature"), (7, "top_p"), (8, "out of range"), (9, "prompt")]:
        assert res[i].finish_reason == "error" and not res[i].ok and pattern in res[i].error, (i, res[i].error)
        assert res[i].token_ids == []
    for bad in (SamplingParams(max_new_tokens=0), SamplingParams(top_k=-1), SamplingParams(seed=-3),
                SamplingParams(min_new_tokens=40, max_new_tokens=4), SamplingParams(stop=("",))):
        with pytest.raises(ValueError):
            bad.validate()
    with pytest.raises(ValueError, match="tasks"):
        eng.generate([rows[0], rows[1]], [names[0]])


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    model, store, names = tiny
    rows = random_rows([5, 7, 3], seed=4)
    eng = engine(model)
    params = [SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=s) for s in (1, 2, 3)]
    first = [r.token_ids for r in eng.generate(rows, [names[0], names[1], None], params)]
    again = [r.token_ids for r in eng.generate(rows, [names[0], names[1], None], params)]
    alone = eng.generate([rows[1]], [names[1]], [params[1]])[0].token_ids
    assert first == again and first[1] == alone
    other_seed = eng.generate([rows[1]], [names[1]], [SamplingParams(max_new_tokens=8, temperature=0.9, seed=99)])
    assert other_seed[0].token_ids != first[1]
    # top_k=1 sampling is greedy
    g = eng.generate([rows[0]], [names[0]], [greedy(6)])[0].token_ids
    k1 = eng.generate([rows[0]], [names[0]], [SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=1.5,
                                                             top_k=1, seed=7)])[0].token_ids
    assert g == k1


def test_eos_and_stop_strings_end_early_and_free_pages(tiny):
    model, store, names = tiny
    tok = CharTokenizer(96)
    rows = random_rows([5, 6], seed=9)
    eng = engine(model, tokenizer=tok, eos_token_id=[])
    full = eng.generate(rows, names[:2], [SamplingParams(max_new_tokens=10)] * 2)
    tokens, text = full[0].token_ids, full[0].text
    assert len(tokens) == 10 and text == tok.decode(tokens)

    # EOS: the 4th greedy token of row 0 is declared EOS; the run stops there (token kept)
    eos_eng = engine(model, tokenizer=tok, eos_token_id=tokens[3])
    rid0 = eos_eng.add_request(rows[0], names[0], SamplingParams(max_new_tokens=10))
    rid1 = eos_eng.add_request(rows[1], names[1], SamplingParams(max_new_tokens=10, ignore_eos=True))
    seq0 = eos_eng._seqs[rid0]
    while eos_eng.take_result(rid0) is None:
        eos_eng.step()
    assert not eos_eng.kv.holds(seq0) and eos_eng.has_unfinished()     # freed while row 1 still runs
    assert seq0.output_ids == tokens[: tokens.index(tokens[3]) + 1] and seq0.finish_reason == "eos"
    while eos_eng.has_unfinished():
        eos_eng.step()
    assert eos_eng.take_result(rid1).token_ids == full[1].token_ids    # ignore_eos keeps going

    # stop string: cut from the text, the request ends at the token that completed it
    stop = text[5:7]
    first = text.find(stop)
    res = eng.generate([rows[0], rows[1]], names[:2], [SamplingParams(max_new_tokens=10, stop=(stop,)),
                                                       SamplingParams(max_new_tokens=10)])
    assert res[0].finish_reason == "stop" and res[0].text == text[:first]
    assert res[0].token_ids == tokens[: first + len(stop)]
    assert res[1].token_ids == full[1].token_ids and eng.kv.pages_used == 0

    # stop token ids end the request too
    res = eng.generate([rows[0]], [names[0]], [SamplingParams(max_new_tokens=10, stop_token_ids=(tokens[2],))])
    assert res[0].finish_reason == "stop" and res[0].token_ids == tokens[: tokens.index(tokens[2]) + 1]


def test_min_new_tokens_suppresses_eos(tiny):
    model, store, names = tiny
    rows = random_rows([5], seed=9)
    base = engine(model, eos_token_id=[]).generate(rows, [names[0]], [SamplingParams(max_new_tokens=6)])[0]
    eng = engine(model, eos_token_id=base.token_ids[0])
    res = eng.generate(rows, [names[0]], [SamplingParams(max_new_tokens=6, min_new_tokens=3)])[0]
    assert res.token_ids[0] != base.token_ids[0] and len(res.token_ids) >= 3


def test_stream_yields_tokens_as_generate(tiny):
    model, store, names = tiny
    tok = CharTokenizer(96)
    rows = random_rows([5, 3, 6], seed=5)
    tasks = [names[0], None, names[1]]
    eng = engine(model, tokenizer=tok)
    expected = eng.generate(rows, tasks, greedy(5))
    seen = {0: [], 1: [], 2: []}
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for ev in eng.stream(rows, tasks, greedy(5)):
        assert ev.index not in finished
        if ev.token_id is not None:
            seen[ev.index].append(ev.token_id)
        texts[ev.index] += ev.text
        if ev.finished:
            finished.add(ev.index)
    assert finished == {0, 1, 2}
    assert [seen[i] for i in range(3)] == [r.token_ids for r in expected]
    assert [texts[i] for i in range(3)] == [r.text for r in expected]
    errors = list(eng.stream([rows[0], []], [names[0], names[0]], greedy(2)))
    assert any(e.error and e.finished and e.index == 1 for e in errors)
    assert len([e for e in errors if e.index == 0 and e.token_id is not None]) == 2


# ---------------------------------------------------------------- hardening: one bad request never
# loses the batch or poisons the engine

V = 96                                                   # the tiny models' vocabulary


def _good(names):
    rows = random_rows([5, 4, 6], seed=21)
    return rows, [names[0], None, names[1]]


def _assert_idle_and_usable(eng, model, names):
    """No pages or sequences left behind, and the next good generate() gives a fresh engine's tokens."""
    assert eng.kv.pages_used == 0 and not eng.has_unfinished() and not eng._seqs
    rows, tasks = _good(names)
    fresh = [r.token_ids for r in engine(model).generate(rows, tasks, greedy(4))]
    again = eng.generate(rows, tasks, greedy(4))
    assert all(r.ok for r in again) and [r.token_ids for r in again] == fresh


@pytest.mark.parametrize("bad, pattern", [
    (SamplingParams(min_new_tokens=1, stop_token_ids=(10 ** 6,)), "stop_token_ids"),
    (SamplingParams(temperature=1e-300), "temperature"),
    (SamplingParams(temperature=1e300), "temperature"),
    (SamplingParams(temperature=1.0, seed=1, min_new_tokens=2, stop_token_ids=tuple(range(V))), "no token is left"),
    (SamplingParams(min_new_tokens=2, stop_token_ids=tuple(range(V))), "no token is left"),   # greedy: was token 0
    (SamplingParams(min_new_tokens=1, stop_token_ids=tuple(t for t in range(V) if t != EOS)), "no token is left"),
], ids=["stop-id-out-of-vocab", "tiny-temperature", "huge-temperature", "sampled-all-suppressed",
        "greedy-all-suppressed", "stop-ids-and-eos-cover-vocab"])
def test_sampling_checked_against_the_model_at_add_time(tiny, bad, pattern):
    """These passed validation, then raised inside step(), losing the whole batch and leaving the
    engine unable to serve the next request (greedy with everything suppressed silently emitted
    token 0; temperature 1e300 is inf in float32: uniform sampling, NaN once a token is suppressed)."""
    model, store, names = tiny
    rows, tasks = _good(names)
    eng = engine(model)
    fresh = [r.token_ids for r in engine(model).generate(rows, tasks, greedy(4))]
    res = eng.generate(rows + [rows[0]], tasks + [names[0]], [greedy(4)] * 3 + [bad])
    assert [r.token_ids for r in res[:3]] == fresh and all(r.ok for r in res[:3])
    assert res[3].finish_reason == "error" and pattern in res[3].error and res[3].token_ids == []
    _assert_idle_and_usable(eng, model, names)


def test_stop_ids_leaving_one_token_are_accepted(tiny):
    """The check rejects only when nothing is left: with one token free, greedy must pick it."""
    model, store, names = tiny
    only = 50
    res = engine(model).generate([random_rows([5])[0]], [names[0]], SamplingParams(
        max_new_tokens=3, min_new_tokens=3, stop_token_ids=tuple(t for t in range(V) if t != only)))[0]
    assert res.ok and res.token_ids == [only] * 3


@pytest.mark.parametrize("mutate, pattern", [
    (dict(stop_token_ids=(10 ** 6,)), "out of bounds"),                 # min_new_tokens=4 suppresses it
    (dict(temperature=1e-300), "sampling failed"),
    (dict(stop_token_ids=tuple(range(V))), "every token is suppressed"),
], ids=["stop-id-out-of-vocab", "tiny-temperature", "all-suppressed"])
def test_step_fails_only_the_request_whose_row_cannot_be_sampled(tiny, mutate, pattern):
    """step() itself is fault-isolating: the reproductions above, slipped past add-time validation
    (the running request's params changed), end that request with an error; the batch goes on."""
    model, store, names = tiny
    rows, tasks = _good(names)
    fresh = [r.token_ids for r in engine(model).generate(rows + [rows[0]], tasks + [names[0]], greedy(4))]
    eng = engine(model)
    rids = [eng.add_request(r, t, greedy(4)) for r, t in zip(rows, tasks)]
    bad = eng.add_request(rows[0], names[0], SamplingParams(max_new_tokens=4, min_new_tokens=4, temperature=1.0,
                                                            top_k=1, seed=0))    # top_k=1: greedy's tokens
    eng.step()                                                         # prefill: one token each
    seq = eng._seqs[bad]
    for key, value in mutate.items():
        setattr(seq.sampling, key, value)
    while eng.has_unfinished():
        eng.step()
    res = eng.take_result(bad)
    assert res.finish_reason == "error" and pattern in res.error and bad in res.error, res.error
    assert res.token_ids == fresh[3][:1] and not eng.kv.holds(seq)     # the token made before it failed
    assert [eng.take_result(r).token_ids for r in rids] == fresh[:3]
    _assert_idle_and_usable(eng, model, names)


def _poison(monkeypatch, eng, model, bad_task_id, phase):
    """Make the engine's model forwards raise, as a model bug or an out-of-memory error would, in
    every forward of `phase` ("prefill" / "decode") that holds a row of store task `bad_task_id`
    (None: every forward of that phase)."""
    def check(task_ids, is_prefill):
        hit = bad_task_id is None or (task_ids is not None and bool((task_ids == bad_task_id).any()))
        if hit and is_prefill == (phase == "prefill"):
            raise RuntimeError("injected forward failure")

    if eng.cpu_decoder is not None:
        dec = eng.cpu_decoder
        step, prefill = dec.step, dec.prefill

        def bad_step(token_ids, cache, task_ids):
            check(task_ids, False)
            return step(token_ids, cache, task_ids)

        def bad_prefill(parts):
            for _, _, task_ids in parts:
                check(task_ids, True)
            return prefill(parts)

        monkeypatch.setattr(dec, "step", bad_step)
        monkeypatch.setattr(dec, "prefill", bad_prefill)
    else:
        forward = model.forward

        def bad_forward(*args, **kw):
            check(kw.get("task_ids"), kw["input_ids"].shape[1] > 1)          # the prompts have >= 2 tokens
            return forward(*args, **kw)

        monkeypatch.setattr(model, "forward", bad_forward)


@pytest.mark.parametrize("cpu_decoder", [True, False], ids=["cpu-decoder", "hf-forward"])
@pytest.mark.parametrize("phase, everyone", [("prefill", False), ("decode", False), ("decode", True)],
                         ids=["prefill-one-task", "decode-one-task", "decode-every-row"])
def test_a_failing_forward_fails_only_its_rows(tiny, monkeypatch, cpu_decoder, phase, everyone):
    """A batched forward that raises is retried on halves of its rows: only the rows that fail on
    their own end with the error (pages freed), the others get their fresh-engine tokens, and the
    engine serves the next request as a fresh one would."""
    model, store, names = tiny
    rows = random_rows([5, 4, 6, 3, 7, 2], seed=23)
    tasks = [names[0], names[1], None, names[1], names[2], names[0]]
    fresh = [r.token_ids for r in engine(model, cpu_decoder=cpu_decoder).generate(rows, tasks, greedy(4))]
    eng = engine(model, cpu_decoder=cpu_decoder)
    assert (eng.cpu_decoder is not None) == cpu_decoder
    with monkeypatch.context() as patch:
        _poison(patch, eng, model, None if everyone else int(store.task_ids([names[1]])[0]), phase)
        res = eng.generate(rows, tasks, greedy(4))
    failed = [b for b, t in enumerate(tasks) if everyone or t == names[1]]
    for b, r in enumerate(res):
        if b in failed:
            assert r.finish_reason == "error" and "injected forward failure" in r.error, (b, r)
            assert r.token_ids == (fresh[b][:1] if phase == "decode" else [])
        else:
            assert r.ok and r.token_ids == fresh[b], b
    assert eng.stats()["errors"] == len(failed)
    _assert_idle_and_usable(eng, model, names)


def test_sampling_may_be_a_dict_of_its_fields(tiny):
    model, store, names = tiny
    rows, tasks = _good(names)
    eng = engine(model)
    want = [r.token_ids for r in eng.generate(rows, tasks, greedy(4))]
    as_dict = dict(max_new_tokens=4, min_new_tokens=4)
    assert [r.token_ids for r in eng.generate(rows, tasks, as_dict)] == want
    rid = eng.add_request(rows[0], tasks[0], sampling=as_dict)
    while eng.has_unfinished():
        eng.step()
    assert eng.take_result(rid).token_ids == want[0]
    res = eng.generate(rows[:1], tasks[:1], [dict(max_new_tokens=4, temprature=0.5)])[0]
    assert res.finish_reason == "error" and "`sampling` keys ['temprature']" in res.error
    res = eng.generate(rows[:1], tasks[:1], [42])[0]
    assert res.finish_reason == "error" and "`sampling` of type int" in res.error


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_model_len=-5), "max_model_len"), (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=1.5), "max_model_len"), (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_batch_size=True), "max_batch_size"), (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (dict(page_size=0), "page_size"), (dict(num_pages=0), "num_pages"), (dict(max_pages=2), "max_pages"),
    (dict(prefill_padding=-0.5), "prefill_padding"), (dict(prefill_padding=float("nan")), "prefill_padding"),
    (dict(chunked_prefill="no"), "chunked_prefill"), (dict(cpu_decoder=1), "cpu_decoder"),
    (dict(small_gemm_rows=-1), "small_gemm_rows"), (dict(eos_token_id=10 ** 6), "eos_token_id"),
    (dict(eos_token_id=[3, -1]), "eos_token_id"), (dict(eos_token_id="3"), "eos_token_id"),
])
def test_engine_rejects_bad_arguments_before_attaching(kwargs, name):
    model, _, _ = setup("llama")
    with pytest.raises(ValueError, match=f"`{name}`"):
        engine(model, **kwargs)
    assert attached_store(model) is None                # a rejected Engine leaves the model as it was


def test_abort_unknown_running_and_finished_ids(tiny):
    model, store, names = tiny
    rows, tasks = _good(names)
    eng = engine(model)
    with pytest.raises(KeyError, match="'no-such-id'"):
        eng.abort("no-such-id")
    running = eng.add_request(rows[0], tasks[0], greedy(6))
    quick = eng.add_request(rows[1], tasks[1], greedy(1))
    eng.step()
    seq = eng._seqs[running]
    assert eng.abort(running) is True and not eng.kv.holds(seq)
    assert eng.abort(quick) is False                      # finished in the prefill step: result kept as is
    aborted, done = eng.take_result(running), eng.take_result(quick)
    assert aborted.finish_reason == "aborted" and len(aborted.token_ids) == 1
    assert done.ok and done.finish_reason == "length"
    with pytest.raises(KeyError, match=repr(quick)):      # its result was taken: no longer held
        eng.abort(quick)
    assert eng.kv.pages_used == 0 and not eng.has_unfinished()


@pytest.mark.parametrize("kwargs", [dict(max_pages=3), dict(max_pages=5, max_num_batched_tokens=4),
                                    dict(chunked_prefill=False, max_num_batched_tokens=6),
                                    dict(chunked_prefill=False, max_num_batched_tokens=6, max_pages=8)])
def test_requests_the_engine_cannot_hold_are_rejected_or_cut_not_stuck(tiny, kwargs):
    """A prompt larger than the capped KV pool or (without chunked prefill) the step's token budget
    used to wait forever at the head of the queue (generate() never returned, the queue behind it
    stalled); now it is rejected at add time, and a sequence that reaches the cap ends with "length"."""
    model, store, names = tiny
    eng = engine(model, page_size=4, **kwargs)
    long_rid = eng.add_request(random_rows([20], seed=3)[0], None, greedy(4))
    ok_rid = eng.add_request(random_rows([4], seed=3)[0], None, greedy(12))
    results = {}
    for _ in range(60):                                   # bounded: the old engine never finished
        eng.step()
        results.update({rid: eng.take_result(rid) for rid in (long_rid, ok_rid) if rid not in results})
        results = {k: v for k, v in results.items() if v is not None}
        if len(results) == 2:
            break
    assert len(results) == 2 and not eng.has_unfinished()
    assert results[long_rid].finish_reason == "error" and "too long" in results[long_rid].error
    ok = results[ok_rid]
    assert ok.ok and 1 <= len(ok.token_ids) <= 12
    if len(ok.token_ids) < 12:
        assert ok.finish_reason == "length" and "max_pages" in kwargs    # cut at the pool's cap


def test_stream_reports_a_failed_forward_in_its_final_event(tiny, monkeypatch):
    model, store, names = tiny
    rows, tasks = _good(names)                              # tasks: names[0], None, names[1]
    fresh = [r.token_ids for r in engine(model).generate(rows, tasks, greedy(4))]
    eng = engine(model)
    _poison(monkeypatch, eng, model, int(store.task_ids([names[1]])[0]), "decode")
    seen, final = {0: [], 1: [], 2: []}, {}
    for ev in eng.stream(rows, tasks, greedy(4)):
        if ev.token_id is not None:
            seen[ev.index].append(ev.token_id)
        if ev.finished:
            final[ev.index] = ev
    assert [seen[0], seen[1]] == fresh[:2] and seen[2] == fresh[2][:1]
    assert final[2].finish_reason == "error" and "injected forward failure" in final[2].error
    assert final[0].error is None and final[1].error is None and eng.kv.pages_used == 0
