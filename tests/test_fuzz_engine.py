"""Property-based fuzzing of the engine (hypothesis): random mixes of valid and invalid requests,
arriving at random steps, on engines with random limits (batch size, token budget, page size, a
capped KV pool, chunked prefill on/off, CPU decoder or HF forward), some requests aborted, some
whose forwards fail (an injected fault, as a model bug or out-of-memory error would raise).

Properties:
- an invalid request is rejected when added (finish_reason "error", a message naming what is
  wrong, no tokens) and a reused request id raises ValueError;
- a request whose forward fails ends with an error, having made a prefix of its tokens;
- every other valid greedy request (and top_k=1 sampling, which is greedy) produces the tokens it
  produces alone on an idle engine, cut only by the engine's documented limits; other sampled
  requests finish with tokens in the vocabulary;
- nothing is left behind (no pages, no sequences), and the engine serves the next request as an
  idle one does.

Greedy tokens are compared exactly, except where two tokens' logits tie within float
reassociation error (batched and lone forwards sum in different orders): there the check
recomputes the logits and accepts either token, and the rest of that request is not compared.
"""
import functools

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from test_engine_common import EOS, attach, engine, one_thread, setup

_threads = pytest.fixture(autouse=True)(one_thread)

V = 96                      # the tiny model's vocabulary
POSITIONS = 128             # its max_position_embeddings
TIE = 1e-4                  # logits closer than this may swap places between batched and lone forwards


@functools.lru_cache(maxsize=None)
def _tiny():
    torch.set_num_threads(1)
    model, prefixes, names = setup("llama")
    store = attach(model, prefixes)
    return model, store, names


@functools.lru_cache(maxsize=None)
def _idle_engine():
    return engine(_tiny()[0])


@functools.lru_cache(maxsize=4096)
def _alone(prompt, task, params):
    """The tokens of one request run alone on an idle engine with default limits."""
    eng = _idle_engine()
    res = eng.generate([list(prompt)], [task], [dict(params)])[0]
    assert res.ok and eng.kv.pages_used == 0, res.error
    return tuple(res.token_ids)


def _tie(prompt, task, made, a, b) -> bool:
    """Whether tokens a and b have logits within TIE after prompt + made (a plain attached forward)."""
    model, store, _ = _tiny()
    ids = torch.tensor([list(prompt) + list(made)])
    kw = {} if task is None else {"task_ids": store.task_ids([task])}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0, -1]
    return abs(float(logits[a] - logits[b])) <= TIE


def _check_tokens(got, want, prompt, task, whole: bool) -> None:
    """``got`` equals ``want`` (``whole``) or a prefix of it, up to a near-tie (after which the
    sequences may differ: both continuations are right)."""
    for t, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert _tie(prompt, task, want[:t], a, b), f"token {t}: {a} != {b}, not a tie ({got} vs {want})"
            event("a near-tie swapped two tokens")
            return
    if whole:
        assert list(got) == list(want), (got, want)
    else:
        assert len(got) <= len(want), (got, want)


# ---------------------------------------------------------------- strategies

tokens = st.integers(0, V - 1)
tasks = st.sampled_from(["t0", "t1", "t2", None])      # index into the store's names (None: no prompt)


@st.composite
def valid_requests(draw):
    new = draw(st.integers(1, 5))
    params = dict(max_new_tokens=new, min_new_tokens=draw(st.integers(0, new)),
                  stop_token_ids=tuple(draw(st.lists(tokens, max_size=2))), ignore_eos=draw(st.booleans()))
    kind = draw(st.sampled_from(["greedy", "greedy", "top_k=1", "sampled", "stop-everything"]))
    if kind == "top_k=1":
        params.update(temperature=draw(st.floats(0.5, 2.0)), top_k=1, seed=draw(st.integers(0, 2 ** 20)))
    elif kind == "sampled":
        params.update(temperature=draw(st.floats(0.3, 3.0)), top_k=draw(st.integers(0, 20)),
                      top_p=draw(st.floats(0.2, 1.0)), seed=draw(st.integers(0, 2 ** 20)))
    elif kind == "stop-everything":                  # valid: min_new_tokens=0, the first token stops
        params.update(min_new_tokens=0, stop_token_ids=tuple(range(V)))
    prompt = draw(st.lists(tokens, min_size=1, max_size=12))
    form = draw(st.sampled_from(["list", "tuple", "tensor"]))
    return dict(kind=kind, prompt=prompt, form=form, task=draw(tasks), params=params,
                poison=draw(st.sampled_from([None] * 6 + ["first", "later"])))


# (prompt, task, sampling, words the error must contain)
INVALID = [
    ([], None, {}, "empty"),
    ("hello", None, {}, "tokenizer"),
    ([1] * POSITIONS, None, {}, "too long"),
    ([1] * (POSITIONS - 3), "t0", {}, "too long"),         # fits the model, not with the task's prefix
    ([5, V], None, {}, "out of range"),
    ([5, -1], None, {}, "out of range"),
    ([5, True], None, {}, "prompt"),
    (torch.tensor([1.0, 2.0]), None, {}, "prompt"),
    (torch.ones(2, 2, dtype=torch.long), None, {}, "prompt"),
    (3.5, None, {}, "prompt"),
    ([5, 6], "no-such-task", {}, "unknown task"),
    ([5, 6], 7, {}, "task"),
    ([5, 6], None, dict(temperature=-1.0), "temperature"),
    ([5, 6], None, dict(temperature=float("nan")), "temperature"),
    ([5, 6], None, dict(temperature=float("inf")), "temperature"),
    ([5, 6], None, dict(temperature=1e-300), "temperature"),
    ([5, 6], None, dict(temperature=1e300), "temperature"),
    ([5, 6], None, dict(top_p=0.0), "top_p"),
    ([5, 6], None, dict(top_p=1.5), "top_p"),
    ([5, 6], None, dict(top_k=-1), "top_k"),
    ([5, 6], None, dict(max_new_tokens=0), "max_new_tokens"),
    ([5, 6], None, dict(max_new_tokens=2, min_new_tokens=3), "min_new_tokens"),
    ([5, 6], None, dict(seed=-1), "seed"),
    ([5, 6], None, dict(stop_token_ids=(V,)), "stop_token_ids"),
    ([5, 6], None, dict(stop_token_ids=(10 ** 6,), min_new_tokens=1), "stop_token_ids"),
    ([5, 6], None, dict(stop_token_ids=7), "stop_token_ids"),
    ([5, 6], None, dict(stop_token_ids=tuple(t for t in range(V) if t != EOS), min_new_tokens=1), "no token is left"),
    ([5, 6], None, dict(stop=("ab",)), "tokenizer"),
    ([5, 6], None, dict(stop=("",)), "stop"),
    ([5, 6], None, dict(temprature=0.5), "`sampling` keys"),
    ([5, 6], None, "greedy", "`sampling` of type str"),
]

engine_limits = st.fixed_dictionaries({
    "max_batch_size": st.integers(1, 8),
    "max_num_batched_tokens": st.integers(4, 48),
    "page_size": st.sampled_from([2, 4, 8]),
    "max_pages": st.sampled_from([None, 4, 6, 8, 12]),
    "chunked_prefill": st.booleans(),
    "cpu_decoder": st.booleans(),
})


def _cap(limits, prompt_len, prefix_len):
    """The documented bound on a request's own tokens (prompt + generated) under ``limits``:
    None when the prompt is rejected as too long."""
    cap = POSITIONS - prefix_len
    budget = limits["max_num_batched_tokens"]
    if limits["max_pages"] is not None:
        cap = min(cap, (limits["max_pages"] - 2) * limits["page_size"] + 1)
        if not limits["chunked_prefill"]:
            cap = min(cap, budget + 1)
    if prompt_len >= cap or (not limits["chunked_prefill"] and prompt_len > budget):
        return None
    return cap


# ---------------------------------------------------------------- the property

@given(limits=engine_limits, valid=st.lists(valid_requests(), min_size=1, max_size=6),
       invalid=st.lists(st.sampled_from(range(len(INVALID))), max_size=3),
       arrivals=st.lists(st.integers(0, 3), min_size=9, max_size=9),
       aborts=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 4)), max_size=2),
       reuse_id=st.booleans())
def test_random_request_mixes(limits, valid, invalid, arrivals, aborts, reuse_id):
    model, store, names = _tiny()
    task_name = {"t0": names[0], "t1": names[1], "t2": names[2], None: None}
    eng = engine(model, **limits)
    poisoned = {}                       # request id -> its forwards fail while it has no token ("first") / after
    execute = eng.runner.execute

    def faulty_execute(plan):
        rows = [row for batch in plan.batches for row in batch.rows]
        if any(poisoned.get(s.request_id) == ("later" if s.output_ids else "first") for s, _ in rows):
            raise RuntimeError("injected forward failure")
        return execute(plan)

    eng.runner.execute = faulty_execute

    requests = []                                           # (arrival step, spec)
    for spec in valid:
        task = task_name[spec["task"]]
        prompt = spec["prompt"]
        form = {"list": list, "tuple": tuple, "tensor": torch.tensor}[spec["form"]]
        requests.append(dict(spec, task=task, given=form(prompt)))
    for i in invalid:
        prompt, task, sampling, words = INVALID[i]
        requests.append(dict(kind="invalid", given=prompt, task=task_name.get(task, task), params=sampling,
                             words=words, poison=None))
    for n, req in enumerate(requests):
        req["arrival"] = arrivals[n]

    rids, aborted, steps = {}, {}, 0
    while steps < 400:
        for n, req in enumerate(requests):
            if req["arrival"] == steps and n not in rids:
                rid = eng.add_request(req["given"], req["task"], req["params"])
                rids[n] = rid
                if req["poison"]:
                    poisoned[rid] = req["poison"]
                if reuse_id:
                    with pytest.raises(ValueError, match="request_id"):
                        eng.add_request([5], None, None, request_id=rid)
        for which, at in aborts:
            if at == steps and which in rids and which not in aborted:
                aborted[which] = eng.abort(rids[which])
        if len(rids) == len(requests) and not eng.has_unfinished():
            break
        eng.step()
        steps += 1
    assert not eng.has_unfinished(), "the engine did not finish its requests within 400 steps"
    assert eng.kv.pages_used == 0 and not eng._seqs
    if eng.stats()["preemptions"]:
        event("preemption")

    for n, req in enumerate(requests):
        res = eng.take_result(rids[n])
        assert res is not None and res.request_id == rids[n]
        if req["kind"] == "invalid":
            assert res.finish_reason == "error" and req["words"] in res.error and res.token_ids == [], res
            continue
        prompt, task, params = req["prompt"], req["task"], req["params"]
        assert all(0 <= t < V for t in res.token_ids)
        cap = _cap(limits, len(prompt), store.prefix_len(task) if task else 0)
        if cap is None:
            assert res.finish_reason == "error" and "too long" in res.error and res.token_ids == [], res
            continue
        exact = req["kind"] != "sampled"
        want = _alone(tuple(prompt), task, tuple(sorted(params.items()))) if exact else None
        if want is not None:
            want = want[: cap - len(prompt)]
        event(f"valid request: {res.finish_reason}" + (f", {req['poison']} forward poisoned" if req["poison"] else ""))
        if aborted.get(n):                                      # stopped while queued or running
            assert res.finish_reason == "aborted"
            if exact:
                _check_tokens(res.token_ids, want, prompt, task, whole=False)
            continue
        if res.finish_reason == "error":
            assert req["poison"] and "injected forward failure" in res.error, res
            if exact:
                _check_tokens(res.token_ids, want, prompt, task, whole=False)
            assert (res.token_ids == []) == (req["poison"] == "first"), res
            continue
        assert res.ok and 1 <= len(res.token_ids) <= params["max_new_tokens"], res
        assert req["poison"] != "first", "a request whose first forward fails cannot finish well"
        if req["poison"] == "later":
            assert len(res.token_ids) == 1                  # it ended with the token of its first forward
        if exact:
            _check_tokens(res.token_ids, want, prompt, task, whole=True)

    # the engine is as usable as an idle one
    eng.runner.execute = execute
    prompt, task, params = [7, 8, 9], names[1], dict(max_new_tokens=3, min_new_tokens=3)
    res = eng.generate([prompt], [task], [params])[0]
    assert res.ok
    cap = _cap(limits, len(prompt), store.prefix_len(task))
    assert cap is not None                                  # every engine limit drawn above fits 3 tokens
    want = _alone(tuple(prompt), task, tuple(sorted(params.items())))[: cap - len(prompt)]
    _check_tokens(res.token_ids, want, prompt, task, whole=True)
    assert eng.kv.pages_used == 0
