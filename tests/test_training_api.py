"""train_tasks on a tiny random Llama: mixed-task batches, resume from a checkpoint equals an
uninterrupted run, trimmed logits equal the full loss, verbalizer (candidate-token) loss, errors."""
import random

import pytest
import torch

from softprompt import PrefixTuning, PromptTuning, PTuningV2, SoftPromptModel
from softprompt.training import MultiTaskCollator, MultiTaskDataset, TrainConfig, train_tasks
from softprompt.training.cli import tiny_model


def _examples(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randint(5, 500) for _ in range(rng.randint(3, 8))]
        out.append({"prompt_ids": ids, "target_ids": [10 + ids[0] % 3]})
    return out


def _tasks():
    return {"a": (PTuningV2(4), _examples(12, 1)), "b": (PromptTuning(4), _examples(12, 2)),
            "c": (PrefixTuning(4, projection_dim=8), _examples(12, 3))}


def _params(spm):
    return {k: v.detach().clone() for k, v in spm.prompts.state_dict().items()}


def _cfg(tmp, **kw):
    base = dict(output_dir=str(tmp), max_steps=4, batch_size=6, learning_rate=1e-2, logging_steps=1,
                progress=False, resume=None)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_equals_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    full = SoftPromptModel(tiny_model())
    train_tasks(full, _tasks(), _cfg(tmp_path / "full"))
    part = SoftPromptModel(tiny_model())
    train_tasks(part, _tasks(), _cfg(tmp_path / "part", max_steps=4, save_steps=2))
    # a fresh model resumes from checkpoint-2 and runs steps 3..4 again
    again = SoftPromptModel(tiny_model())
    out = train_tasks(again, _tasks(), _cfg(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2")))
    assert out["steps"] == 4 and out["resumed_from"].endswith("checkpoint-2")
    ref, got = _params(full), _params(again)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k
    assert (tmp_path / "full" / "final" / "softprompt.json").exists()
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in ref.values())


def test_collator_trims_logits_and_mixes_tasks():
    ds = MultiTaskDataset({"x": [{"prompt_ids": [5, 6, 7], "target_ids": [9]}],
                           "y": [{"prompt_ids": [5], "target_ids": [8, 9]}]}, ["x", "y"])
    batch = MultiTaskCollator(pad_token_id=0)([ds[0], ds[1]])
    assert batch["task_ids"].tolist() == [0, 1]
    assert batch["input_ids"].shape == (2, 5)             # one extra left pad column
    assert batch["labels"][0].tolist() == [-100, -100, -100, -100, 9]
    assert batch["labels"][1].tolist() == [-100, -100, -100, 8, 9]
    assert batch["logits_to_keep"] == 3                   # positions 2..4 predict labels at 3..4


def test_trimmed_logits_same_training_as_full(tmp_path):
    torch.set_num_threads(1)
    results = []
    for trim in (True, False):
        spm = SoftPromptModel(tiny_model())
        train_tasks(spm, {"a": (PTuningV2(4), _examples(8, 1)), "b": (PromptTuning(4), _examples(8, 2))},
                    _cfg(tmp_path / str(trim), max_steps=2, trim_logits=trim))
        results.append(_params(spm))
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6), k


def test_candidate_tokens_and_errors(tmp_path):
    torch.set_num_threads(1)
    spm = SoftPromptModel(tiny_model())
    out = train_tasks(spm, {"a": (PTuningV2(4), _examples(8, 1))},
                      _cfg(tmp_path / "c", max_steps=2, candidate_tokens=[10, 11, 12]))
    assert out["train_loss"] < 5                          # log(3) scale, not log(vocab)
    with pytest.raises(ValueError, match="candidate_tokens"):
        train_tasks(SoftPromptModel(tiny_model()), {"a": (PTuningV2(4), _examples(8, 1))},
                    _cfg(tmp_path / "d", max_steps=1, candidate_tokens=[10]))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train_tasks(SoftPromptModel(tiny_model()), {"a": (PTuningV2(4), _examples(8, 1))},
                    _cfg(tmp_path / "e", max_steps=1, gradient_checkpointing=True))
    with pytest.raises(ValueError, match="task_lr"):
        train_tasks(SoftPromptModel(tiny_model()), {"a": (PTuningV2(4), _examples(8, 1))},
                    _cfg(tmp_path / "f", max_steps=1, task_lr={"zzz": 1.0}))


def test_gradient_checkpointing_input_prompts(tmp_path):
    torch.set_num_threads(1)
    spm = SoftPromptModel(tiny_model())
    out = train_tasks(spm, {"b": (PromptTuning(4), _examples(8, 2))},
                      _cfg(tmp_path / "g", max_steps=2, gradient_checkpointing=True))
    assert out["steps"] == 2
    assert any(getattr(m, "gradient_checkpointing", False) for m in spm.model.modules())
