"""The integration on the ``triton`` backend (Triton interpreter on the CPU; CUDA when present):
same logits, prefix gradients and greedy tokens as the ``torch`` backend."""
import pytest
import torch

import softprompt
from softprompt.kernels import available_backends
from test_integration_common import (left_pad, make_model, positions_from_mask, random_prefixes, random_rows,
                                     right_pad)

TASKS = [0, 1, 2, 1]


def _run(family, backend, pad, **overrides):
    model = make_model(family, **overrides)
    prefixes = random_prefixes(model, [5, 2, 0])
    store = softprompt.attach(model, backend=backend, block_size=4, trainable=True)
    for n, (k, v) in prefixes.items():
        store.add(n, k, v)
    ids, mask = pad(random_rows([6, 3, 5, 4]), family)
    out = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), task_ids=torch.tensor(TASKS))
    real = mask.bool()
    out.logits[real].pow(2).sum().backward()
    grads = [store.prefix_grad(n) for n in prefixes]
    return out.logits.detach()[real], grads, dict(store.calls)


@pytest.mark.parametrize("family,pad,overrides", [("llama", left_pad, {}), ("llama", right_pad, {}),
                                                  ("mistral", left_pad, {"sliding_window": 3})])
def test_triton_backend_matches_torch_backend(family, pad, overrides):
    if "triton" not in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("triton backend unavailable (needs a GPU or TRITON_INTERPRET=1)")
    ref, ref_grads, _ = _run(family, "torch", pad, **overrides)
    got, grads, calls = _run(family, "triton", pad, **overrides)
    assert calls["lengths" if pad is left_pad else "mask"] > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for (gk, gv), (rk, rv) in zip(grads, ref_grads):
        torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gv, rv, atol=1e-5, rtol=1e-4)


def test_triton_backend_generate_matches_torch_backend():
    if "triton" not in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("triton backend unavailable (needs a GPU or TRITON_INTERPRET=1)")
    outs = []
    for backend in ("torch", "triton"):
        model = make_model("llama")
        store = softprompt.attach(model, backend=backend, block_size=4)
        for n, (k, v) in random_prefixes(model, [5, 2, 0], scale=2.0).items():
            store.add(n, k, v)
        ids, mask = left_pad(random_rows([6, 3, 5, 4]), "llama")
        outs.append(model.generate(ids, attention_mask=mask, task_ids=torch.tensor(TASKS), max_new_tokens=3,
                                   min_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=3))
    assert torch.equal(outs[0], outs[1])
