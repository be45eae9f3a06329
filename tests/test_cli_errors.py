"""Every CLI failure a user can cause is one clear line on stderr and exit code 2; --debug shows the traceback."""
import os
import subprocess
import sys

import pytest
import torch

from softprompt.cli import main


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]             # progress bars of model loading may come before it
    assert err.startswith("softprompt"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_task_spec_is_one_line(capsys):
    err = _one_line_error(capsys, main(["train", "--model", "tiny", "--task", "nonsense"]), "softprompt train: error:",
                          "NAME=METHOD")
    assert "--debug" in err                                # says how to see more


def test_unknown_method_and_duplicate_task(capsys):
    _one_line_error(capsys, main(["train", "--model", "tiny", "--task", "a=lora"]), "method 'lora' is unknown")
    _one_line_error(capsys, main(["train", "--model", "tiny", "--task", "=prompt_tuning"]), "empty NAME")


def test_jsonl_without_examples(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _one_line_error(capsys, main(["train", "--model", "tiny", "--task", f"a=prompt_tuning:{empty}", "--steps", "1"]),
                    "no examples", str(empty))
    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text("1\n2\n")
    _one_line_error(capsys, main(["train", "--model", "tiny", "--task", f"a=prompt_tuning:{scalars}"]),
                    "JSON object", f"{scalars}:1")


def test_missing_model_folder(tmp_path, capsys):
    _one_line_error(capsys, main(["train", "--model", str(tmp_path / "nope"), "--task", "a=prompt_tuning:sentiment2"]),
                    "config.json")


def test_task_lr_for_unknown_task(capsys):
    _one_line_error(capsys, main(["train", "--model", "tiny", "--task", "a=prompt_tuning:sentiment2",
                                  "--task-lr", "b=0.1"]), "--task-lr")


@pytest.mark.parametrize("argv, flag", [
    (["bench", "kernels", "--threads", "-1"], "--threads"),
    (["bench", "kernels", "--threads", "two"], "--threads"),
    (["train", "--task", "a=prompt_tuning", "--steps", "-3"], "--steps"),
    (["train", "--task", "a=prompt_tuning", "--lr", "nan"], "--lr"),
    (["generate", "--model", "x", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", "--model", "x", "--top-p", "1.5", "hi"], "--top-p"),
])
def test_bad_numbers_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def _tiny_llama_folder(path, hidden):
    import transformers as tf
    from softprompt import assets
    try:
        tok = tf.AutoTokenizer.from_pretrained(assets.smollm2_dir())      # generate needs a tokenizer
    except Exception as exc:                                              # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer not available: {exc}")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return model


def test_generate_with_adapters_of_another_model(tmp_path, capsys):
    """A checkpoint trained on another model is refused in one line, naming what does not fit."""
    from safetensors.torch import save_file
    _tiny_llama_folder(tmp_path / "model", hidden=32)         # head_dim 8
    (tmp_path / "adapters").mkdir()
    save_file({"k": torch.randn(2, 2, 4, 16), "v": torch.randn(2, 2, 4, 16)},   # head_dim 16: another model
              str(tmp_path / "adapters" / "other.safetensors"))
    _one_line_error(capsys, main(["generate", "--model", str(tmp_path / "model"), "--adapters",
                                  str(tmp_path / "adapters"), "hi"]), "softprompt generate: error:",
                    "other.safetensors")


def test_generate_with_a_softprompt_checkpoint_of_another_model(tmp_path, capsys):
    from softprompt import PTuningV2, SoftPromptModel
    other = _tiny_llama_folder(tmp_path / "other", hidden=64)
    spm = SoftPromptModel(other)
    spm.add_task("t", PTuningV2(4))
    spm.save(tmp_path / "ckpt")
    _tiny_llama_folder(tmp_path / "model", hidden=32)
    _one_line_error(capsys, main(["generate", "--model", str(tmp_path / "model"), "--adapters",
                                  str(tmp_path / "ckpt"), "hi"]), "softprompt generate: error:")


def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_console_paths_and_debug_traceback():
    plain = _run("-m", "softprompt.cli", "train", "--task", "nonsense")
    assert plain.returncode == 2 and plain.stderr.strip().startswith("softprompt train: error:"), plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    module = _run("-m", "softprompt.training", "--model", "tiny", "--task", "nonsense")   # torchrun's way in
    assert module.returncode == 2 and "NAME=METHOD" in module.stderr and "Traceback" not in module.stderr
    for debug in (_run("-m", "softprompt.cli", "train", "--task", "nonsense", "--debug"),
                  _run("-m", "softprompt.cli", "train", "--task", "nonsense", env={"SOFTPROMPT_DEBUG": "1"})):
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError" in debug.stderr
