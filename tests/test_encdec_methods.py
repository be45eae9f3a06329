"""SoftPromptModel with deep prompts on encoder-decoder models (T5, BART): PrefixTuning and
PTuningV2 train the encoder, decoder and cross-attention prefixes together (virtual layers
``[encoder | decoder self | cross]`` of ``Geometry.num_layers``), mixed-task batches equal the
materialised reference, and mixed-task greedy generate equals each row alone."""
import pytest
import torch

from softprompt import PrefixTuning, PTuningV2, SoftPromptModel
from softprompt.methods import flat_to_kv
from encdec_common import FAMILIES, KINDS, Reference, make_model, pad_id, right_pad

TASKS = ["pt", "v2", "pt", "v2"]
ENC = [6, 5, 7, 4]
DEC = [5, 4, 5, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spm(family, big=True):
    # big: weights large enough for a prompt to steer the tiny random model (training test)
    big_init = {"initializer_factor": 2.0} if family == "t5" else {"init_std": 0.2}
    model = make_model(family, **(big_init if big else {}))
    spm = SoftPromptModel(model)
    torch.manual_seed(1)
    spm.add_task("pt", PrefixTuning(5, projection_dim=16))
    spm.add_task("v2", PTuningV2(4))
    return spm


def _batch(family):
    g = torch.Generator().manual_seed(0)
    enc = [torch.randint(4, 96, (n,), generator=g) for n in ENC]
    dec = [torch.randint(4, 8, (n,), generator=g) for n in DEC]      # a 4-token sub-vocabulary: learnable
    ids, mask = right_pad(enc, family)
    lab, lmask = right_pad(dec, family)
    return enc, dec, ids, mask, lab.masked_fill(lmask == 0, -100)


def _per_kind(prefix_kv, counts):
    k, v = prefix_kv
    out, at = {}, 0
    for kind in KINDS:
        out[kind] = (k[at: at + counts[kind]], v[at: at + counts[kind]])
        at += counts[kind]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_and_v2_train_all_three_kinds(family):
    spm = _spm(family)
    geo = spm.geometry
    assert geo.num_layers == sum(spm.store.layers.values()) == 6
    _, _, ids, mask, labels = _batch(family)
    spm.train()
    opt = torch.optim.Adam(spm.trainable_parameters(), lr=0.05)
    losses = []
    for step in range(10):
        opt.zero_grad(set_to_none=True)
        loss = spm(ids, attention_mask=mask, labels=labels, tasks=TASKS).loss
        loss.backward()
        if step == 0:
            # only prompt parameters are trainable, and every kind's prefix gets a gradient
            for n, p in spm.named_parameters():
                assert p.requires_grad == n.startswith("prompts."), n
            g = spm.prompts["v2"].embedding.weight.grad.view(4, geo.num_layers, 2, geo.num_kv_heads, geo.head_dim)
            for kind in KINDS:
                start, stop = spm.store.layer_range(kind)
                assert g[:, start:stop].abs().amax() > 0, kind
            for n, p in spm.prompts["pt"].named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    spm.eval()
    with torch.no_grad():                         # the inference path (prefixes written to the store)
        final = spm(ids, attention_mask=mask, labels=labels, tasks=TASKS).loss.item()
    assert final < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_reference_and_generate_equals_rows_alone(family, monkeypatch):
    spm = _spm(family, big=False)
    enc, dec, ids, mask, labels = _batch(family)
    import copy
    ref_model = copy.deepcopy(spm.model)
    from softprompt.integration import detach
    detach(ref_model)                              # the copy is a stock eager model again
    ref = Reference(ref_model, monkeypatch)
    counts = spm.store.layers
    spm.eval()
    dec_ids, dec_mask = right_pad(dec, family)
    with torch.no_grad():
        out = spm(ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
                  tasks=TASKS).logits
        for b, task in enumerate(TASKS):
            prefix = _per_kind(spm.prompts[task].prefix(), counts)
            with ref.using(prefix):
                r = ref_model(input_ids=enc[b][None], decoder_input_ids=dec[b][None]).logits[0]
            torch.testing.assert_close(out[b, : len(dec[b])], r, atol=2e-5, rtol=1e-5,
                                       msg=lambda m: f"{family} row {b}: {m}")
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=pad_id(family), eos_token_id=3)
    batch = spm.generate(ids, attention_mask=mask, tasks=TASKS, **gen)
    for b, task in enumerate(TASKS):
        alone = spm.generate(enc[b][None], tasks=[task], **gen)
        assert batch[b].tolist() == alone[0].tolist(), f"{family} row {b} ({task})"


def test_flat_layout_is_virtual_layers():
    """PEFT-style flat prefix ``[P, L*2*Hkv*D]`` is layer-major over the virtual layers."""
    spm = _spm("bart")
    module = spm.prompts["v2"]
    k, v = flat_to_kv(module.flat(), spm.geometry)
    assert k.shape == (spm.geometry.num_layers, spm.geometry.num_kv_heads, 4, spm.geometry.head_dim)
    split = spm.store.split(k)
    assert [split[kind].shape[0] for kind in KINDS] == [2, 2, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_on_the_encoder_with_decoder_side_labels(family):
    """Input-level soft tokens go in front of the encoder input (Lester et al.); labels and logits
    are decoder-side and must not be remapped, even when their length equals the spliced encoder's."""
    from softprompt import PromptTuning
    model = make_model(family)
    spm = SoftPromptModel(model)
    torch.manual_seed(2)
    spm.add_task("pt", PrefixTuning(3))
    prompt = spm.add_task("soft", PromptTuning(3))
    g = torch.Generator().manual_seed(3)
    enc = torch.randint(4, 96, (2, 5), generator=g)
    labels = torch.randint(4, 96, (2, 8), generator=g)          # 8 = 3 soft tokens + 5 encoder tokens
    spm.train()
    out = spm(enc, labels=labels, tasks=["soft", "pt"])
    emb = model.get_input_embeddings()
    with torch.no_grad():
        x = torch.cat([prompt.embeddings()[None], emb(enc[:1])], dim=1)
        from softprompt.integration import detach
        import copy
        stock = copy.deepcopy(model)
        detach(stock)
        ref = stock(inputs_embeds=x, labels=labels[:1])
    assert out.logits.shape == (2, 8, 96)
    torch.testing.assert_close(out.logits[0].detach(), ref.logits[0], atol=2e-5, rtol=1e-5)
    out.loss.backward()
    assert prompt.embedding.weight.grad.abs().sum() > 0
