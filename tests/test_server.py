"""``softprompt serve`` in this process on a tiny random Llama: the real ``openai`` client and ``httpx``
against a real uvicorn server on 127.0.0.1. Greedy tokens over HTTP equal ``Engine.generate``."""
import asyncio
import json
import os

import httpx
import openai
import pytest
import torch

from test_server_common import API_KEY, TASKS, Served, char_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPTS = ["hello world", "ab", "The quick brown fox", "x1", "soft prompts, many tasks"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)                 # tiny models: steadier on a busy machine
    s = Served(tmp_path_factory.mktemp("served"))
    yield s
    s.stop()
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def greedy(n, **kw):
    return dict(max_new_tokens=n, temperature=0.0, **kw)


def test_models_lists_the_base_model_and_every_task(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", *TASKS]


def test_completions_equal_the_offline_engine(served, client):
    tasks = ["task0", "task1", "tiny", "task3", "task2"]
    out = [client.completions.create(model=m, prompt=p, max_tokens=7, temperature=0) for p, m in zip(PROMPTS, tasks)]
    ref = served.offline(PROMPTS, [None if m == "tiny" else m for m in tasks], greedy(7))
    for o, r, prompt in zip(out, ref, PROMPTS):
        choice = o.choices[0]
        assert choice.model_extra["token_ids"] == r.token_ids
        assert choice.text == r.text
        assert choice.finish_reason == ("length" if r.finish_reason == "length" else "stop")
        assert o.usage.prompt_tokens == len(prompt) and o.usage.completion_tokens == len(r.token_ids)
        assert o.usage.total_tokens == o.usage.prompt_tokens + o.usage.completion_tokens


def test_chat_uses_the_chat_template_and_equals_the_offline_engine(served, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    out = client.chat.completions.create(model="task1", messages=messages, max_tokens=6, temperature=0)
    tok = char_tokenizer()
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    (ref,) = served.offline([ids], ["task1"], greedy(6))
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].model_extra["token_ids"] == ref.token_ids
    assert out.usage.prompt_tokens == len(ids)


def test_streaming_gives_the_same_tokens_then_usage(served, client):
    stream = client.completions.create(model="task2", prompt="streaming works", max_tokens=9, temperature=0,
                                       stream=True)
    chunks = list(stream)
    (ref,) = served.offline(["streaming works"], ["task2"], greedy(9))
    tokens = [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]]
    assert tokens == ref.token_ids
    assert "".join(ch.text for c in chunks for ch in c.choices) == ref.text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_streaming_deltas(served, client):
    messages = [{"role": "user", "content": "stream me"}]
    chunks = list(client.chat.completions.create(model="task0", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    out = client.chat.completions.create(model="task0", messages=messages, max_tokens=5, temperature=0)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_a_concurrent_burst_over_all_tasks_equals_the_offline_engine(served):
    models = ["task0", "task1", "task2", "task3", "tiny"] * 3
    prompts = [f"{p} #{i}" for i, p in enumerate(PROMPTS * 3)]

    async def one(c, model, prompt, i):
        body = {"model": model, "prompt": prompt, "max_tokens": 6 + i % 4, "temperature": 0}
        if i % 2:
            body["stream"] = True
            tokens, finish = [], None
            async with c.stream("POST", "/v1/completions", json=body, headers=auth()) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            tokens += ch["token_ids"]
                            finish = ch["finish_reason"] or finish
            return tokens
        r = await c.post("/v1/completions", json=body, headers=auth())
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    async def burst():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            return await asyncio.gather(*(one(c, m, p, i) for i, (m, p) in enumerate(zip(models, prompts))))

    got = asyncio.run(burst())
    ref = served.offline(prompts, [None if m == "tiny" else m for m in models],
                         [greedy(6 + i % 4) for i in range(len(prompts))])
    assert got == [r.token_ids for r in ref]


def test_n_choices_and_seeded_sampling(client):
    kw = dict(model="task3", prompt="sample", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in a.choices] == [c.model_extra["token_ids"] for c in b.choices]
    assert a.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in a.choices)


def test_stop_strings_cut_the_text(served, client):
    (ref,) = served.offline(["stop here"], ["task0"], greedy(12))
    stop = ref.text[3:5]
    out = client.completions.create(model="task0", prompt="stop here", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == ref.text[:ref.text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def _wait_idle(served, timeout=15.0):
    import time
    deadline = time.monotonic() + timeout
    while True:
        state = served.state()
        if state["running"] == 0 and state["waiting"] == 0 and state["kv_pages_used"] == 0:
            return state
        assert time.monotonic() < deadline, f"the engine is not idle: {state}"
        time.sleep(0.05)


def _finished(served, reason):
    text = httpx.get(served.url + "/metrics", headers=auth()).text
    lines = [line for line in text.splitlines()
             if line.startswith(f'softprompt_requests_finished_total{{finish_reason="{reason}"}}')]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_client_that_disconnects_mid_stream_frees_its_pages(served):
    aborted = _finished(served, "aborted")
    body = {"model": "task1", "prompt": "a long one", "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body, headers=auth()) as r:
            chunks = 0
            lines = r.iter_lines()      # held: a dropped iterator closes the connection (httpcore) before we look
            for line in lines:
                chunks += line.startswith("data: {")
                if chunks == 3:
                    break
            state = served.state()
            assert state["running"] == 1 and state["kv_pages_used"] > 0, state
    _wait_idle(served)
    assert _finished(served, "aborted") == aborted + 1


def test_bad_requests_get_openai_errors_naming_the_field(served):
    with httpx.Client(base_url=served.url, timeout=30, headers=auth()) as c:
        r = c.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": "hot"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "bogus": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": [500]})
        assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 0.0001})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * (2 << 20)})
        assert r.status_code == 413
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "y" * 5000})
        assert r.status_code == 400 and "max-prompt-tokens" in r.json()["error"]["message"]
    _wait_idle(served)


def test_every_endpoint_needs_the_api_key(served):
    for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                         ("POST", "/v1/completions"), ("POST", "/v1/load_adapter")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, served.url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_in_prometheus_format(served, client):
    client.completions.create(model="task0", prompt="count me", max_tokens=4, temperature=0)
    text = httpx.get(served.url + "/metrics", headers=auth()).text
    for name in ("softprompt_requests_waiting", "softprompt_requests_running", "softprompt_kv_pages_used",
                 "softprompt_kv_pages_free", "softprompt_prefix_store_bytes", "softprompt_generation_tokens_per_second",
                 "softprompt_time_to_first_token_seconds_bucket", "softprompt_inter_token_latency_seconds_bucket",
                 "softprompt_generation_tokens_total"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("softprompt_time_to_first_token_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    s = Served(tmp_path, max_waiting=1, max_batch_size=1)
    try:
        async def burst():
            body = {"model": "task0", "prompt": "busy", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
            async with httpx.AsyncClient(base_url=s.url, timeout=60, headers=auth()) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))
        replies = asyncio.run(burst())
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        r429 = next(r for r in replies if r.status_code == 429)
        assert r429.headers["retry-after"] == "1" and r429.json()["error"]["type"] == "rate_limit_error"
        ok = [r.json() for r in replies if r.status_code == 200]
        assert all(len(o["choices"][0]["token_ids"]) == 60 for o in ok)
    finally:
        s.stop()


def test_load_and_unload_adapters_during_a_burst(tmp_path):
    from safetensors.torch import save_file
    root = tmp_path / "root"
    root.mkdir()
    s = Served(tmp_path, adapter_root=root, enable_adapter_loading=True)
    try:
        k, v = s.tasks["task1"]                         # the same prefix under a new name
        save_file({"k": k.contiguous(), "v": v.contiguous()}, str(root / "extra.safetensors"))
        (root / "sub").mkdir()
        os.symlink(tmp_path / "tasks" / "task0.safetensors", root / "sub" / "escape.safetensors")

        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, timeout=60, headers=auth()) as c:
                body = {"model": "task0", "prompt": "in flight", "max_tokens": 40, "temperature": 0,
                        "ignore_eos": True}
                flight = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(4)]
                await asyncio.sleep(0.05)
                loaded = await c.post("/v1/load_adapter", json={"path": "extra.safetensors"})
                unloaded = await c.post("/v1/unload_adapter", json={"name": "task0"})
                after = await c.post("/v1/completions", json=body)
                extra = await c.post("/v1/completions", json={**body, "model": "extra", "max_tokens": 8})
                return loaded, unloaded, after, extra, await asyncio.gather(*flight)

        loaded, unloaded, after, extra, flight = asyncio.run(scenario())
        assert loaded.status_code == 200 and loaded.json()["loaded"] == ["extra"]
        assert unloaded.status_code in (200, 202)
        assert after.status_code == 404                      # refused from the moment it was unloaded
        assert all(r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 40 for r in flight)
        (ref,) = s.offline(["in flight"], ["task1"], dict(max_new_tokens=8, temperature=0.0, ignore_eos=True))
        assert extra.json()["choices"][0]["token_ids"] == ref.token_ids
        _wait_idle(s)
        assert s.state()["tasks"] == ["task1", "task2", "task3", "extra"]
        with httpx.Client(base_url=s.url, timeout=30, headers=auth()) as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny", "task1", "task2", "task3", "extra"]
            for bad in ("../tasks/task0.safetensors", str(tmp_path / "tasks" / "task0.safetensors"),
                        "sub/escape.safetensors"):
                r = c.post("/v1/load_adapter", json={"path": bad, "name": "evil"})
                assert r.status_code == 400 and r.json()["error"]["param"] == "path", (bad, r.text)
            r = c.post("/v1/load_adapter", json={"path": "extra.safetensors", "name": "../x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "name"
            r = c.post("/v1/load_adapter", json={"path": "extra.safetensors"})
            assert r.status_code == 409
            r = c.post("/v1/load_adapter", json={"path": "missing.safetensors", "name": "m"})
            assert r.status_code == 404
            r = c.post("/v1/unload_adapter", json={"name": "task0"})
            assert r.status_code == 404
            assert c.post("/v1/unload_adapter", json={"name": "extra"}).json()["status"] == "unloaded"
    finally:
        s.stop()


def test_adapter_loading_is_off_unless_enabled(served):
    r = httpx.post(served.url + "/v1/load_adapter", json={"path": "x.safetensors"}, headers=auth())
    assert r.status_code == 403 and "--enable-adapter-loading" in r.json()["error"]["message"]
