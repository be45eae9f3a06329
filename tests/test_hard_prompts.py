"""Hard prompts through the prefix store: ``[hard-prompt task] + input`` == ``text + input`` through
the stock model, on every decoder family, in mixed batches with soft tasks and other prefix lengths.

References are computed on the stock eager model before it is attached: the text's token ids pasted
in front of the row (hard tasks), the soft prefix in a pre-filled ``DynamicCache`` (soft tasks,
PEFT-style), both (a hard prompt stacked after a soft one). Inputs are fresh random draws.
"""
import json

import pytest
import torch

from softprompt import SoftPromptModel
from softprompt.engine import Engine, SamplingParams
from softprompt.methods import HardPrompt, PromptTuning, PTuningV2, text_prefix
from test_integration_common import (DECODERS, VOCAB, left_pad, make_model, random_prefixes, random_rows,
                                     reference_generate, reference_logits)

ATOL = 1e-5
TEXTS = {"h7": 7, "h3": 3}                  # hard tasks of different lengths
SOFT_P = 5
ROWS = [6, 4, 5, 3, 7, 2]
TASKS = ["h7", "soft", "h3", "hs", "h3"]    # hs: the text of h3 stacked after soft
ENGINE_TASKS = TASKS + [None]               # None: no prompt (the engine's own empty task)
NEW = 6
EOS = 3                                     # the same EOS (suppressed until NEW tokens) for every generator


def _draw(seed):
    g = torch.Generator().manual_seed(seed)
    texts = {n: torch.randint(4, VOCAB, (L,), generator=g) for n, L in TEXTS.items()}
    rows = [torch.randint(4, VOCAB, (n,), generator=g) for n in ROWS]
    return texts, rows


def _reference(model, texts, soft, rows, tasks):
    """Per row: the stock model's logits ``[S, V]`` for the row's tokens, with its prompt pasted /
    pre-filled in front."""
    out = []
    with torch.no_grad():
        for row, task in zip(rows, tasks):
            if task is None:
                out.append(reference_logits(model, row))
            elif task == "soft":
                out.append(reference_logits(model, row, *soft))
            elif task == "hs":
                text = texts["h3"]
                out.append(reference_logits(model, torch.cat([text, row]), *soft)[len(text):])
            else:
                text = texts[task]
                out.append(reference_logits(model, torch.cat([text, row]))[len(text):])
    return out


def _reference_generate(model, texts, soft, rows, tasks, new):
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    out = []
    with torch.no_grad():
        for row, task in zip(rows, tasks):
            text = {"hs": texts["h3"], None: row[:0], "soft": row[:0]}.get(task, texts.get(task))
            ids = torch.cat([text, row])
            if task in ("soft", "hs"):
                toks = reference_generate(model, ids, *soft, **gen)
            else:
                toks = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), **gen)[0, len(ids):]
            out.append(toks.tolist())
    return out


def _model_with_tasks(family, texts, soft, seed=0):
    """The model wrapped, with the hard tasks, a P-tuning v2 task holding ``soft`` and a stacked task."""
    model = make_model(family, seed=seed)
    spm = SoftPromptModel(model, block_size=4)
    for name, text in texts.items():
        spm.add_task(name, HardPrompt(text=text.tolist()))
    spm.add_task("soft", PTuningV2(num_virtual_tokens=SOFT_P)).start_from(*soft)
    spm.add_text("hs", texts["h3"], after="soft")
    return spm.eval()


@pytest.mark.parametrize("family", DECODERS)
def test_hard_prompt_equals_pasted_text(family):
    seed = torch.randint(0, 2**31, ()).item()
    texts, rows = _draw(seed)
    stock = make_model(family)
    soft = random_prefixes(stock, [SOFT_P], seed=seed + 1)["task0"]
    ref = _reference(stock, texts, soft, rows[:len(TASKS)], TASKS)
    ref_tokens = _reference_generate(stock, texts, soft, rows[:len(TASKS)], TASKS, NEW)

    spm = _model_with_tasks(family, texts, soft)
    assert [spm.store.prefix_len(n) for n in ("h7", "h3", "soft", "hs")] == [7, 3, SOFT_P, SOFT_P + 3]
    ids, mask = left_pad(rows[:len(TASKS)], family)
    with torch.no_grad():
        logits = spm(input_ids=ids, attention_mask=mask, tasks=TASKS).logits
    for b, (row, t) in enumerate(zip(rows, TASKS)):
        err = (logits[b, -len(row):] - ref[b]).abs().max().item()
        assert err < ATOL, f"{family} seed {seed} row {b} ({t}): logits differ by {err}"

    # greedy generation of the same left-padded mixed batch
    out = spm.generate(ids, attention_mask=mask, tasks=TASKS, max_new_tokens=NEW, min_new_tokens=NEW,
                       do_sample=False, pad_token_id=0, eos_token_id=EOS)[:, ids.shape[1]:].tolist()
    assert out == ref_tokens, f"{family} seed {seed}"


def test_stacking_after_a_compiled_prompt_tuning_task():
    seed = torch.randint(0, 2**31, ()).item()
    texts, rows = _draw(seed)
    model = make_model("llama")
    spm = SoftPromptModel(model, block_size=4).eval()
    spm.add_task("pt", PromptTuning(num_virtual_tokens=4))
    spm.add_text("inst", texts["h7"], after="pt")
    with torch.no_grad():
        for row in rows[:3]:
            want = spm(input_ids=torch.cat([texts["h7"], row])[None], tasks="pt").logits[0, len(texts["h7"]):]
            got = spm(input_ids=row[None], tasks="inst").logits[0]
            assert (got - want).abs().max().item() < ATOL, f"seed {seed}"
    # a changed soft prompt makes the stacked task recompute its text K/V
    with torch.no_grad():
        spm.prompts["pt"].embedding.weight.mul_(0.5)
        want = spm(input_ids=torch.cat([texts["h7"], rows[0]])[None], tasks="pt").logits[0, len(texts["h7"]):]
        got = spm(input_ids=rows[0][None], tasks="inst").logits[0]
    assert (got - want).abs().max().item() < ATOL
    with pytest.raises(ValueError, match="stacked after 'pt'"):
        spm.remove_task("pt")


def test_engine_serves_hard_tasks_like_soft_ones():
    seed = torch.randint(0, 2**31, ()).item()
    texts, rows = _draw(seed)
    for family in ("llama", "gpt2"):               # the CPU decoder and the HF-forward runner
        stock = make_model(family)
        soft = random_prefixes(stock, [SOFT_P], seed=seed + 1)["task0"]
        ref = _reference_generate(stock, texts, soft, rows, ENGINE_TASKS, NEW)
        spm = _model_with_tasks(family, texts, soft)
        engine = Engine(spm.model, page_size=4, eos_token_id=EOS)
        res = engine.generate([r.tolist() for r in rows], tasks=ENGINE_TASKS,
                              sampling=SamplingParams(max_new_tokens=NEW, min_new_tokens=NEW))
        assert all(r.ok for r in res), [r.error for r in res]
        assert [list(r.token_ids) for r in res] == ref, f"{family} seed {seed} ({engine.forward_path()})"
        engine.close()


def test_text_prefix_on_a_plain_model_and_a_bare_store():
    import softprompt
    model = make_model("qwen2")
    text, row = random_rows([6, 4], seed=9)
    with torch.no_grad():
        want = model(torch.cat([text, row])[None]).logits[0, len(text):]
    k, v = text_prefix(model, text.tolist())               # not attached: the plain model's cache
    assert k.shape[2] == v.shape[2] == len(text)
    store = softprompt.attach(model, block_size=4)
    store.add("inst", k, v)
    with torch.no_grad():
        got = model(row[None], task_ids=store.task_ids(["inst"])).logits[0]
    assert (got - want).abs().max().item() < ATOL


def test_save_and_load_round_trip(tmp_path):
    seed = torch.randint(0, 2**31, ()).item()
    texts, rows = _draw(seed)
    stock = make_model("gpt_neox")
    soft = random_prefixes(stock, [SOFT_P], seed=seed + 1)["task0"]
    spm = _model_with_tasks("gpt_neox", texts, soft)
    spm.save(tmp_path)
    manifest = json.loads((tmp_path / "softprompt.json").read_text())
    entry = next(t for t in manifest["tasks"] if t["name"] == "hs")
    assert entry["method"] == "hard_prompt" and entry["config"]["after"] == "soft"
    assert entry["config"]["token_ids"] == texts["h3"].tolist()
    from safetensors.torch import load_file
    assert not any(k.startswith("tasks.h") for k in load_file(tmp_path / manifest["weights"]))  # recomputed

    loaded = SoftPromptModel.load(make_model("gpt_neox"), tmp_path, block_size=8).eval()
    assert loaded.tasks == spm.tasks
    ids, mask = left_pad(rows[:len(TASKS)], "gpt_neox")
    with torch.no_grad():
        a = spm(input_ids=ids, attention_mask=mask, tasks=TASKS).logits
        b = loaded(input_ids=ids, attention_mask=mask, tasks=TASKS).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    for name in ("h7", "hs"):
        for x, y in zip(spm.store.get(name), loaded.store.get(name)):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=1e-5)

    # a stacked task saved without its soft task loads only where that task exists
    spm.save(tmp_path / "only", tasks=["hs"])
    with pytest.raises(ValueError, match="stacked after 'soft'"):
        SoftPromptModel.load(make_model("gpt_neox"), tmp_path / "only")
    other = _model_with_tasks("gpt_neox", texts, soft)
    other.remove_task("hs")
    assert other.load_tasks(tmp_path / "only") == ["hs"]
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids, attention_mask=mask, tasks="hs").logits,
                                   spm(input_ids=ids, attention_mask=mask, tasks="hs").logits, atol=ATOL, rtol=1e-5)


def test_sliding_window_is_exact_inside_and_refused_outside():
    model = make_model("mistral", sliding_window=8)
    text, row, long_row = random_rows([5, 3, 4], seed=11)
    with torch.no_grad():
        want = model(torch.cat([text, row])[None]).logits[0, len(text):]     # 8 tokens: all in the window
    spm = SoftPromptModel(model, block_size=4).eval()
    spm.add_text("inst", text)
    with torch.no_grad():
        got = spm(input_ids=row[None], tasks="inst").logits[0]
        assert (got - want).abs().max().item() < ATOL
        with pytest.raises(ValueError, match="sliding window 8"):
            spm(input_ids=long_row[None], tasks="inst")
        with pytest.raises(ValueError, match="sliding window 8"):
            spm.generate(row[None], tasks="inst", max_new_tokens=3)
    with pytest.raises(ValueError, match="sliding window of 8"):
        spm.add_text("long", list(range(4, 12)))
    assert "long" not in spm.tasks


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bidirectional_families_are_refused(family):
    spm = SoftPromptModel(make_model(family))
    with pytest.raises(ValueError, match="bidirectional"):
        spm.add_text("inst", [5, 6, 7])
    assert spm.tasks == [] and "inst" not in spm.store


def test_encoder_decoders_are_refused():
    from encdec_common import make_model as make_encdec
    spm = SoftPromptModel(make_encdec("t5"))
    with pytest.raises(ValueError, match="bidirectional"):
        spm.add_text("inst", [5, 6, 7])


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        HardPrompt(text="Classify the tweet.")
    with pytest.raises(ValueError, match="no tokens"):
        HardPrompt(text=[])
    with pytest.raises(ValueError, match="`text` of type float"):
        HardPrompt(text=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        HardPrompt(text=[3, -1])
    with pytest.raises(ValueError, match="token_ids"):
        HardPrompt(text=[3, 4], token_ids=[3, 5])
    spm = SoftPromptModel(make_model("llama"))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        spm.add_text("inst", [VOCAB])
    with pytest.raises(ValueError, match="not a task"):
        spm.add_text("inst", [5], after="missing")
    spm.add_task("p1", PromptTuning(num_virtual_tokens=2, init="random"))
    spm.add_task("soft", PTuningV2(num_virtual_tokens=2))
    spm.add_text("hs", [5, 6], after="soft")
    spm.train()
    with pytest.raises(ValueError, match="for inference"):
        spm(input_ids=torch.tensor([[5, 6]]), tasks="hs")
    spm.add_text("plain", [5, 6])
    out = spm(input_ids=torch.tensor([[5, 6]]), tasks=["plain"], labels=torch.tensor([[5, 6]]))
    assert torch.isfinite(out.loss)                  # a plain hard prompt is a constant prefix in training


def test_tokenizer_text_and_name_are_kept():
    class Tok:
        name_or_path = "tiny-tok"

        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [4 + ord(c) % 90 for c in text]}

    cfg = HardPrompt(text="Hi there", tokenizer=Tok())
    assert cfg.token_ids == [4 + ord(c) % 90 for c in "Hi there"]
    saved = cfg.to_dict()
    assert saved["text"] == "Hi there" and saved["tokenizer_name"] == "tiny-tok" and "tokenizer" not in saved
    again = HardPrompt.from_dict(saved)               # no tokenizer needed: the ids are saved
    assert again.token_ids == cfg.token_ids
