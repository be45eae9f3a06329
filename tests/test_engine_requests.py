"""Bad requests error alone; seeded sampling is reproducible; stop strings / EOS end a request early
and free its pages; streaming yields the same tokens as generate()."""
import pytest
import torch

from softprompt.engine import SamplingParams
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
