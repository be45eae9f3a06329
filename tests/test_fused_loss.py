"""The fused LM loss of training steps (softprompt/fused_loss.py): the chunked linear cross-entropy
against torch's ``cross_entropy(linear(...))`` (values and gradients, ignored targets, bias,
several chunks), and attached models on every decoder family against their own head and loss
(``fused_loss=False``), mixed tasks and both paddings."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import softprompt.fused_loss as fl
from softprompt import PrefixTuning, PromptTuning, PTuningV1, SoftPromptModel
from test_integration_common import DECODERS, VOCAB, make_model


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 23), H=st.integers(1, 9), V=st.integers(2, 40), rows=st.integers(1, 7),
       bias=st.booleans(), ignored=st.floats(0, 1), items=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_chunked_linear_cross_entropy_matches_torch(N, H, V, rows, bias, ignored, items, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -100
    targets[0] = 0 if targets.eq(-100).all() else targets[0]
    num = int(targets.ne(-100).sum()) + 3 if items else None
    old = fl.BUFFER_BYTES, fl.MIN_ROWS
    fl.BUFFER_BYTES, fl.MIN_ROWS = rows * V * 4, 1     # chunks of `rows` rows
    try:
        got = fl.chunked_linear_cross_entropy(hidden, weight, b, targets, num)
    finally:
        fl.BUFFER_BYTES, fl.MIN_ROWS = old
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets, ignore_index=-100,
                          reduction="mean" if num is None else "sum")
    ref = ref if num is None else ref / num
    assert got.dtype == torch.float32                   # as transformers' loss: logits upcast/cast to fp32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    (gg,) = torch.autograd.grad(3.0 * got, hidden)
    (rg,) = torch.autograd.grad(3.0 * ref, hidden)
    torch.testing.assert_close(gg, rg, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected \\[N, H\\] and \\[N\\]"):
        fl.chunked_linear_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 4), None, torch.zeros(2, dtype=torch.long))


def _attached(family, fused):
    model = make_model(family, seed=7)
    spm = SoftPromptModel(model, fused_loss=fused)
    spm.add_task("pt", PromptTuning(num_virtual_tokens=4))
    spm.add_task("v1", PTuningV1(template="[P] {x} [P] [P]"))
    spm.add_task("deep", PrefixTuning(num_virtual_tokens=3))
    spm.train()
    return spm


def _loss_and_grads(spm, batch):
    out = spm(**batch)
    params = spm.trainable_parameters()
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("tasks", [["deep"] * 4, ["pt", "deep", "v1", "pt"]])
def test_fused_loss_matches_the_model_head(family, side, tasks):
    g = torch.Generator().manual_seed(hash((family, side, tuple(tasks))) % 2**31)
    ids = torch.randint(4, VOCAB, (4, 6), generator=g)
    lens = torch.tensor([6, 3, 5, 1])
    pos = torch.arange(6)
    mask = ((pos >= 6 - lens[:, None]) if side == "left" else (pos < lens[:, None])).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 2] = -100
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, tasks=tasks)
    fused_spm, plain_spm = _attached(family, True), _attached(family, False)
    plain_spm.load_state_dict(fused_spm.state_dict())
    fused_head = fl.head_for_fused_loss(fused_spm.model)
    out, grads = _loss_and_grads(fused_spm, batch)
    ref, ref_grads = _loss_and_grads(plain_spm, batch)
    if family == "gemma2":                  # soft-capped logits: its own head, logits returned
        assert fused_head is None and out.logits is not None
    else:
        assert fused_head is not None and out.logits is None, f"{family}: the loss was not fused"
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(x.abs().sum()) > 0 for x in grads)


def test_without_gradients_or_labels_the_logits_come_back():
    spm = _attached("llama", True)
    ids = torch.randint(4, VOCAB, (2, 5))
    with torch.no_grad():
        assert spm(input_ids=ids, labels=ids, tasks=["deep", "pt"]).logits.shape == (2, 5, VOCAB)
    assert spm(input_ids=ids, tasks=["deep", "pt"]).logits.shape == (2, 5, VOCAB)
    spm.eval()
    assert spm(input_ids=ids, labels=ids, tasks="deep").logits is None     # eval with gradients: still fused
    assert fl.head_for_fused_loss(spm.model) is spm.model.get_output_embeddings()       # the head is back
