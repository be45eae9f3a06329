"""``softprompt tasks DIR``: an adapters folder's tasks from its metadata alone; ``generate`` checks
``--task`` against it before loading a model; the light commands start without torch."""
import json
import subprocess
import sys

import pytest
import torch

from softprompt.adapters import check_tasks, format_tasks, list_tasks
from softprompt.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from softprompt import PrefixTuning, PromptTuning, PTuningV1, PTuningV2, SoftPromptModel
    from softprompt.training.cli import tiny_model
    spm = SoftPromptModel(tiny_model())
    spm.add_task("sentiment", PrefixTuning(num_virtual_tokens=5, projection_dim=8))
    spm.add_task("topic", PTuningV2(num_virtual_tokens=3))
    spm.add_task("short", PromptTuning(num_virtual_tokens=7))
    spm.add_task("nli", PTuningV1(template=[2, "{x}", 1, [5, 6]], encoder="lstm", hidden_size=16))
    path = tmp_path_factory.mktemp("ckpt")
    spm.save(path)
    sizes = {n: sum(t.numel() for t in spm.prompts[n].state_dict().values()) for n in spm.tasks}
    return path, sizes


def test_checkpoint_tasks_from_metadata(checkpoint):
    path, sizes = checkpoint
    infos = {i.name: i for i in list_tasks(path)}
    assert set(infos) == {"sentiment", "topic", "short", "nli"}
    assert {n: i.method for n, i in infos.items()} == {"sentiment": "prefix_tuning", "topic": "p_tuning_v2",
                                                        "short": "prompt_tuning", "nli": "p_tuning_v1"}
    assert {n: i.prefix_len for n, i in infos.items()} == {"sentiment": 5, "topic": 3, "short": 7, "nli": 3}
    assert {n: i.parameters for n, i in infos.items()} == sizes
    assert all(i.bytes == 4 * i.parameters for i in infos.values())          # fp32 on disk
    assert all(i.base_model.startswith("LlamaForCausalLM (2 layers, 64 hidden") for i in infos.values())


def test_kv_file_folder(tmp_path):
    from safetensors.torch import save_file
    save_file({"k": torch.zeros(3, 2, 9, 8), "v": torch.zeros(3, 2, 9, 8)}, str(tmp_path / "alpha.safetensors"))
    save_file({"k": torch.zeros(3, 2, 0, 8, dtype=torch.float16), "v": torch.zeros(3, 2, 0, 8, dtype=torch.float16)},
              str(tmp_path / "empty.safetensors"))
    alpha, empty = list_tasks(tmp_path)
    assert (alpha.name, alpha.method, alpha.prefix_len, alpha.parameters, alpha.bytes) == \
        ("alpha", "prefix_kv", 9, 2 * 3 * 2 * 9 * 8, 4 * 2 * 3 * 2 * 9 * 8)
    assert (empty.prefix_len, empty.parameters) == (0, 0)
    assert "3 layers, 2 KV heads, head dim 8" in alpha.base_model
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(ValueError, match="stray.safetensors.*expected 'k' and 'v'"):
        list_tasks(tmp_path)


def test_bad_folders_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        list_tasks(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds neither"):
        list_tasks(tmp_path)
    (tmp_path / "softprompt.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        list_tasks(tmp_path)
    (tmp_path / "softprompt.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a softprompt manifest"):
        list_tasks(tmp_path)
    (tmp_path / "softprompt.json").unlink()
    (tmp_path / "broken.safetensors").write_bytes(b"\x05")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        list_tasks(tmp_path)


def test_check_tasks_names_the_argument_and_the_choices(checkpoint):
    path, _ = checkpoint
    assert len(check_tasks(path, ["topic", "none", None, "NONE"])) == 4
    with pytest.raises(ValueError, match=r"--task 'topik' is not a task of .*'nli', 'sentiment', 'short', 'topic', 'none'"):
        check_tasks(path, ["topic", "topik"])
    assert check_tasks(None, ["none"]) == []
    with pytest.raises(ValueError, match="--task 'topic' is not a task of no adapters folder"):
        check_tasks(None, ["topic"])


def test_tasks_command_table_and_json(checkpoint, capsys):
    path, sizes = checkpoint
    assert main(["tasks", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["task", "method", "prefix", "parameters", "size"]
    row = next(line for line in lines if line.startswith("sentiment"))
    assert "prefix_tuning" in row and f"{sizes['sentiment']:,}" in row and "LlamaForCausalLM" in row
    assert main(["tasks", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"]: d["parameters"] for d in data} == sizes
    assert main(["tasks", str(path / "nope")]) == 2
    assert "softprompt tasks: error: adapters folder" in capsys.readouterr().err
    assert format_tasks([]).startswith("task")


def test_generate_refuses_an_unknown_task_before_loading_the_model(checkpoint, monkeypatch, capsys):
    import softprompt.engine.cli as gen

    def no_load(name):
        raise AssertionError("the model was loaded before --task was checked")
    monkeypatch.setattr(gen, "_load_model", no_load)
    path, _ = checkpoint
    assert main(["generate", "--model", "smollm2", "--adapters", str(path), "--task", "topik", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--task 'topik' is not a task of" in err and "'topic'" in err and "__softprompt" not in err
    assert main(["generate", "--model", "smollm2", "--task", "topic", "hi"]) == 2
    assert "no adapters folder" in capsys.readouterr().err


def _modules_after(argv):
    code = ("import sys\nfrom softprompt.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('MODULES', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.rsplit("MODULES", 1)[1].strip()


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["demo", "--help"], ["tasks", "--help"]])
def test_light_commands_import_neither_torch_nor_transformers(argv):
    assert _modules_after(argv) == "[]"


def test_tasks_command_imports_no_torch(checkpoint):
    assert _modules_after(["tasks", str(checkpoint[0])]) == "[]"


def test_list_tasks_is_a_top_level_name(checkpoint):
    import softprompt
    assert [i.name for i in softprompt.list_tasks(checkpoint[0])] == ["sentiment", "topic", "short", "nli"]
