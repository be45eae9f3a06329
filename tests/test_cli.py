"""The console command: --version, info, and the quick demo."""
import subprocess
import sys

from softprompt import __version__
from softprompt.cli import main


def test_version():
    out = subprocess.run([sys.executable, "-m", "softprompt.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"softprompt {__version__}"


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "backends" in text and "reference" in text


def test_quick_demo_agrees_with_reference(capsys):
    assert main(["demo", "--kernels", "--quick"]) == 0
    assert "OK: the no-copy backend matches" in capsys.readouterr().out


def test_passthrough_commands_own_their_help(capsys):
    import pytest
    for command in ("train", "generate", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"softprompt {command}" in capsys.readouterr().out


def test_training_progress_bars_are_labelled(tmp_path, capsys):
    """Trainer runs show a labelled training bar and a 'final evaluation' bar (on stderr), and say
    before the final evaluation what it does."""
    from softprompt import PTuningV2, SoftPromptModel
    from softprompt.training import TrainConfig, train_tasks
    from softprompt.training.cli import tiny_model
    rows = [{"input_ids": [5 + i, 6, 7, 8], "labels": [-100, -100, 7, 8]} for i in range(6)]
    spm = SoftPromptModel(tiny_model())
    result = train_tasks(spm, {"alpha": (PTuningV2(2), rows, rows[:4])},
                         TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, logging_steps=1,
                                     eval_batch_size=2))
    captured = capsys.readouterr()
    assert result["eval_loss"] is not None
    assert "training alpha" in captured.err and "final evaluation" in captured.err
    assert "final evaluation: loss on 4 held-out examples" in captured.out
