"""Input-level prompts in training: the LM head projects only the positions whose logits are used
(softprompt/sliced_logits.py). Same loss, caller logits and prompt gradients as the full logits,
on every decoder family, mixed tasks (prompt tuning, P-tuning v1 with soft tokens after the input,
prefix tuning), both paddings."""
import pytest
import torch

from softprompt import PrefixTuning, PromptTuning, PTuningV1, SoftPromptModel
from softprompt.sliced_logits import kept_positions
from test_integration_common import DECODERS, VOCAB, make_model


def _attached(family):
    model = make_model(family, seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    spm = SoftPromptModel(model, fused_loss=False)     # the fused loss would take over (test_fused_loss.py)
    spm.add_task("pt", PromptTuning(num_virtual_tokens=5))
    spm.add_task("v1", PTuningV1(template="[P] [P] {x} [P]"))
    spm.add_task("deep", PrefixTuning(num_virtual_tokens=3))
    spm.train()
    return spm


def _run(spm, batch, sliced: bool, **kwargs):
    spm.__dict__.pop("_slices_logits", None)           # sliced: looked up from the model again
    if not sliced:
        spm.__dict__["_slices_logits"] = False
    seen = []
    hook = spm.model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape[-2]))
    try:
        out = spm(**batch, **kwargs)
    finally:
        hook.remove()
    params = spm.trainable_parameters()
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], seen[0]


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_sliced_logits_match_the_full_head(family, side):
    g = torch.Generator().manual_seed(hash((family, side)) % 2**31)
    spm = _attached(family)
    B, S = 5, 7
    ids = torch.randint(4, VOCAB, (B, S), generator=g)
    lens = torch.tensor([7, 4, 6, 2, 5])
    pos = torch.arange(S)
    mask = (pos >= S - lens[:, None]) if side == "left" else (pos < lens[:, None])
    mask = mask.long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100                                  # an unlabelled real token
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, tasks=["pt", "v1", "deep", "pt", "v1"])

    full, full_grads, full_rows = _run(spm, batch, sliced=False)
    out, grads, rows = _run(spm, batch, sliced=True)
    assert rows < full_rows, f"{family}: the LM head still projected {rows} positions (of {full_rows})"
    torch.testing.assert_close(out.loss, full.loss, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    assert out.logits.shape == full.logits.shape == (B, S, VOCAB)
    torch.testing.assert_close(out.logits[real], full.logits[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


def test_num_items_in_batch_reaches_the_loss():
    spm = _attached("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 6), generator=g)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(), tasks=["pt", "pt", "v1"])
    n = torch.tensor(40)
    full, _, _ = _run(spm, batch, sliced=False, num_items_in_batch=n)
    out, _, rows = _run(spm, batch, sliced=True, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, full.loss, atol=1e-5, rtol=1e-5)


def test_kept_positions_are_the_used_ones():
    # row 0: 2 soft tokens, 3 real (labelled); row 1: padding, soft token, 2 real with the first unlabelled
    source = torch.tensor([[-1, -1, 0, 1, 2], [-2, -1, 0, 1, -2]])
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, -100, -100, 8, -100]])
    kept = kept_positions(source, labels, per_row=True)
    assert kept.index.tolist() == [[1, 2, 3, 4], [2, 3, 3, 3]]     # 1: the last soft token predicts the first real one
    assert kept.valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert kept.targets(labels).tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]
    assert kept.where(5).gather(1, torch.tensor([[2, 3], [2, 3]])).tolist() == [[1, 2], [0, 1]]
    shared = kept_positions(source, labels, per_row=False)
    assert shared.argument.tolist() == [1, 2, 3, 4]
    assert shared.targets(labels).tolist() == [[5, 6, 7, -100], [-100, 8, -100, -100]]
    assert kept_positions(torch.tensor([[0, 1]]), torch.tensor([[4, 5]])) is None


@pytest.mark.parametrize("per_row", [True, False])
def test_both_slicings_give_the_full_loss(per_row, monkeypatch):
    import softprompt.sliced_logits as sl
    monkeypatch.setattr(sl, "PER_ROW", per_row)
    spm = _attached("qwen2")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), tasks=["pt", "pt", "pt"])
    full, full_grads, full_rows = _run(spm, batch, sliced=False)
    out, grads, rows = _run(spm, batch, sliced=True)
    assert rows < full_rows
    torch.testing.assert_close(out.loss, full.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[mask.bool()], full.logits[mask.bool()], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
