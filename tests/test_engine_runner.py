"""The engine's forward behind one runner interface: which runner serves an engine and why, the
two runners agreeing on the same plans without touching any sequence's bookkeeping, the training-
mode fallback, and no engine module reading another object's private fields."""
import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from softprompt.engine.runner import CpuDecoderRunner, HFRunner, cpu_decoder_unfit
from test_engine_common import attach, engine, greedy, one_thread, random_rows, setup

_threads = pytest.fixture(autouse=True)(one_thread)

ENGINE = Path(__file__).resolve().parent.parent / "softprompt" / "engine"


def test_the_runner_is_chosen_once_and_says_why():
    model, prefixes, _ = setup("llama")
    attach(model, prefixes)
    eng = engine(model)
    assert isinstance(eng.runner, CpuDecoderRunner) and eng.cpu_decoder is eng.runner.decoder
    assert eng.stats()["forward_path"].startswith("CPU decoder, ")
    hf = engine(model, cpu_decoder=False)
    assert isinstance(hf.runner, HFRunner) and hf.cpu_decoder is None
    assert "HF forward" in hf.forward_path() and "cpu_decoder=False" in hf.forward_path()

    gpt2, prefixes, _ = setup("gpt2")
    attach(gpt2, prefixes)
    path = engine(gpt2).stats()["forward_path"]
    assert "HF forward" in path and "GPT2LMHeadModel is not one of" in path, path

    cpu = torch.device("cpu")
    assert "'triton'" in cpu_decoder_unfit(model, SimpleNamespace(backend="triton"), cpu, True)
    assert "on cuda" in cpu_decoder_unfit(model, SimpleNamespace(backend=None), torch.device("cuda"), True)
    assert cpu_decoder_unfit(model, SimpleNamespace(backend="torch"), cpu, True) is None


def test_runners_agree_on_every_plan_and_change_no_bookkeeping():
    """Every plan an engine runs (prefill groups, a chunked prompt, decode batches) gives the same
    logits through the CPU decoder runner and the HF runner; neither changes a sequence."""
    model, prefixes, names = setup("llama", lengths=[5, 2, 0, 7])
    attach(model, prefixes)
    eng = engine(model, max_num_batched_tokens=24, prefill_padding=0.0)      # chunks and several groups
    hf = HFRunner(model)
    execute, seen = eng.runner.execute, []

    def both(plan):
        rows = [(s, n) for batch in plan.batches for s, n in batch.rows]
        before = [(s.num_computed, list(s.output_ids), s.finish_reason) for s, _ in rows]
        ref = hf.execute(plan)
        out = execute(plan)
        assert [(s.num_computed, s.output_ids, s.finish_reason) for s, _ in rows] == before
        assert ref.forwards == len(plan.batches) and out.forwards == 1
        assert ref.padded_tokens == sum(b.padding for b in plan.batches) and out.padded_tokens == 0
        for got, want in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        seen.append((plan.prefill, len(plan.batches)))
        return out

    eng.runner.execute = both
    rows = random_rows([6, 3, 17, 4, 9, 2])
    tasks = [names[0], names[1], None, names[3], names[0], names[2]]
    assert all(r.ok for r in eng.generate(rows, tasks, greedy(3)))
    assert any(prefill and n > 1 for prefill, n in seen) and (False, 1) in seen


def test_cpu_decoder_runner_uses_the_hf_forward_while_the_model_trains():
    model, prefixes, names = setup("llama")
    attach(model, prefixes)
    rows, tasks = random_rows([5, 3]), [names[0], None]
    want = [r.token_ids for r in engine(model).generate(rows, tasks, greedy(3))]
    eng = engine(model)

    def unused(*args, **kw):
        raise AssertionError("the CPU decoder ran while the model was in training mode")

    eng.cpu_decoder.step = eng.cpu_decoder.prefill = unused
    model.train()                   # the tiny models have no dropout: the same tokens
    try:
        assert "training mode" in eng.forward_path()
        got = eng.generate(rows, tasks, greedy(3))
    finally:
        model.eval()
    assert [r.token_ids for r in got] == want and all(r.ok for r in got)
    assert eng.forward_path().startswith("CPU decoder, ")


PRIVATE = re.compile(r"_[a-z]")


def _private_reads(path: Path):
    """``x._name`` where ``x`` is not ``self`` / ``cls``: a read of another object's private field."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and PRIVATE.match(node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            yield f"{path.name}:{node.lineno}: {ast.unparse(node)}"


def test_engine_modules_read_no_private_fields_of_other_objects():
    files = sorted(ENGINE.glob("*.py"))
    assert len(files) >= 10
    assert [hit for path in files for hit in _private_reads(path)] == []
