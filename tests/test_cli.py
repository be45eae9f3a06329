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
