"""Bad input to the model integration: stale task ids, a detached model given task_ids, bad models."""
import copy
import inspect

import pytest
import torch

import softprompt
from softprompt.integration import attached_store
from test_integration_common import make_model, random_prefixes, random_rows


def _attached(family):
    model = make_model(family)
    store = softprompt.attach(model)
    for name, (k, v) in random_prefixes(model, [3, 2, 4]).items():
        store.add(name, k, v)
    return model, store


@pytest.mark.parametrize("family", ["llama", "gpt2"])       # rope; learned positions (offsets read lengths)
def test_ids_of_removed_tasks_are_refused_by_forward(family):
    """A removed task's id must not run silently with no prefix, nor later mean another task."""
    model, store = _attached(family)
    ids = random_rows([5])[0][None].expand(2, -1)
    stale = torch.tensor([store.task_id("task1"), store.task_id("task0")])
    store.remove("task1")
    for task_ids in (stale, stale.tolist(), int(stale[0])):
        with pytest.raises(ValueError, match="`task_ids` naming removed tasks"):
            model(ids, task_ids=task_ids)
    new = store.add("fresh", *random_prefixes(model, [2], seed=5)["task0"])
    assert new != int(stale[0])
    with pytest.raises(ValueError, match="`task_ids` naming removed tasks"):
        model(ids, task_ids=stale)
    with pytest.raises(ValueError, match=r"`task_ids` with values in \[-1, "):
        model(ids, task_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="`task_ids` with values"):
        model(ids, task_ids=[new + 1, 0])
    with torch.no_grad():
        by_id = model(ids, task_ids=torch.tensor([new, int(stale[1])])).logits
        by_name = model(ids, task_ids=["fresh", "task0"]).logits
    torch.testing.assert_close(by_id, by_name, atol=1e-5, rtol=1e-5)


def test_detached_model_refuses_task_ids_and_can_be_attached_again():
    """Stock transformers forwards take **kwargs: after detach, task_ids would be dropped silently."""
    model, store = _attached("llama")
    ids = random_rows([4])[0][None]
    with torch.no_grad():
        with_prefix = model(ids, task_ids=["task2"]).logits
    softprompt.detach(model)
    assert attached_store(model) is None
    with pytest.raises(ValueError, match="`task_ids` was given to a model detached"):
        model(ids, task_ids=["task2"])
    with pytest.raises(ValueError, match="task_ids"):                 # (transformers refuses unused kwargs)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=0, task_ids=torch.tensor([0]))
    with torch.no_grad():
        stock = model(ids).logits
        assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
        twin = copy.deepcopy(model)                      # the copy's guard calls the copy
        torch.nn.init.zeros_(twin.lm_head.weight)
        assert twin(ids).logits.abs().max() == 0 and model(ids).logits.abs().max() > 0
        with pytest.raises(ValueError, match="detached"):
            twin(ids, task_ids=[0])
    again = softprompt.attach(model)                     # attach takes the guard off, detach puts it back
    k, v = store.get("task2")
    again.add("task2", k, v)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, task_ids=["task2"]).logits, with_prefix, atol=1e-5, rtol=1e-5)
    assert type(model.forward.original).__name__ == "method", "no guard inside the attached forward"
    softprompt.detach(model)
    assert model.forward.original.__func__ is type(model).forward
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-6, rtol=0)


def test_detached_encoder_decoder_refuses_task_ids():
    from encdec_common import make_model as make_encdec
    model = make_encdec("bart")
    softprompt.attach(model)
    softprompt.detach(model)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="detached"):
        model(input_ids=ids, decoder_input_ids=ids, task_ids=[0])
    assert model(input_ids=ids, decoder_input_ids=ids).logits.shape == (1, 3, 96)


@pytest.mark.parametrize("bad", [None, "llama", object(), torch.zeros(2)])
def test_attach_detach_refuse_what_is_not_a_model(bad):
    for fn in (softprompt.attach, softprompt.detach, attached_store):
        with pytest.raises(ValueError, match=r"`model` of type .* expected a loaded transformers model"):
            fn(bad)


def test_a_failed_attach_leaves_the_model_unchanged():
    model = make_model("llama")
    before = (model.config._attn_implementation, dict(model.__dict__), dict(model._modules))
    with pytest.raises(ValueError, match="`block_size`"):
        softprompt.attach(model, block_size=0)
    model.forward = lambda input_ids=None, task_ids=None, **kw: None       # a forward that takes task_ids
    with pytest.raises(ValueError, match="already has a `task_ids` argument"):
        softprompt.attach(model)
    del model.__dict__["forward"]
    assert (model.config._attn_implementation, dict(model.__dict__), dict(model._modules)) == before
    assert attached_store(model) is None and softprompt.attach(model) is attached_store(model)


def test_values_overflowing_a_half_model_store_are_refused():
    model = make_model("llama").half()
    store = softprompt.attach(model)
    k, v = random_prefixes(model, [3])["task0"]
    store.add("ok", k, v)
    # 7e4 overflows float16 as given; 6e4 in both channels of rotary pair 1 (angle -P * 0.1) only
    # once the store rotates the keys by -P: 6e4 * (cos 0.3 + sin 0.3) = 7.5e4
    for big in (7e4, 6e4):
        bad = k.clone()
        bad[..., 1] = big
        bad[..., 5] = big
        with pytest.raises(ValueError, match="`k`"):
            store.add("bad", bad, v)
    assert store.names == ["ok"] and torch.isfinite(store.k_blocks).all()


@pytest.mark.parametrize("bad", [None, torch.zeros(1, 2, 3, 4), (torch.zeros(1, 2, 3, 4),), ("k", "v")])
def test_encoder_decoder_join_refuses_what_is_not_a_pair_of_tensors(bad):
    from softprompt.integration.encdec import ENCODER_DECODER_FAMILIES, EncoderDecoderPrefixStore
    store = EncoderDecoderPrefixStore({"encoder": 1, "decoder": 1, "cross": 1}, 2, 4,
                                      family=ENCODER_DECODER_FAMILIES["t5"])
    good = (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="`cross` prefix of type .* expected a pair of tensors"):
        store.join({"encoder": good, "decoder": good, "cross": bad})
    assert store.join({"encoder": good, "decoder": good, "cross": good})[0].shape == (3, 2, 3, 4)
