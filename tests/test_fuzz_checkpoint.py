"""Property-based fuzzing of saving and loading soft prompts (hypothesis; see tests/conftest.py for the
profiles: ``--hypothesis-profile=long`` for a deep search).

* Random sequences of add_task / replace (new values) / fold / remove_task / save / load on a tiny
  random model: every load gives back exactly the tasks (tensors, configs, structure) of the last save.
* Random damage to a saved folder (truncation, flipped bytes, edited JSON fields, deleted or foreign
  files): loading is a ValueError or, where the damage left the content as it was, the saved state;
  never another exception and never a silently different prompt. An edited manifest whose checksum is
  recomputed (a forger, or a hand edit that knows the format) must still never load tensors other
  than the saved ones, nor allocate what the JSON asks for beyond the file's tensors.
"""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softprompt import PrefixTuning, PromptTuning, PTuningV1, PTuningV2, SoftPromptModel
from softprompt.methods import checkpoint
from test_integration_common import make_model

NAMES = ["a", "b", "c"]
HEAD = "model.norm"                     # a small module of the tiny llama, saved as a trainable head


def _templates():
    """P-tuning v1 templates: soft tokens before / after the input, optional anchor token ids."""
    def build(before, after, anchor):
        items = ([before] if before else []) + ["{x}"] + ([after] if after else []) + ([anchor] if anchor else [])
        return items
    return st.builds(build, st.integers(0, 2), st.integers(0, 2), st.lists(st.integers(0, 95), max_size=2)
                     ).filter(lambda t: any(isinstance(i, int) for i in t))


CONFIGS = st.one_of(
    st.builds(PrefixTuning, num_virtual_tokens=st.integers(1, 4), projection_dim=st.none() | st.integers(1, 6),
              prefix_dropout=st.sampled_from([0.0, 0.25]), init=st.sampled_from(["random", "zero"])),
    st.builds(PTuningV2, num_virtual_tokens=st.integers(1, 4), prefix_dropout=st.sampled_from([0.0, 0.25])),
    st.builds(PromptTuning, num_virtual_tokens=st.integers(1, 4), init=st.sampled_from(["random", "vocab"]),
              seed=st.integers(0, 3)),
    st.builds(PromptTuning, num_virtual_tokens=st.integers(1, 4), init=st.just("text"),
              init_text=st.lists(st.integers(0, 95), min_size=1, max_size=3)),
    st.builds(PTuningV1, template=_templates(), encoder=st.sampled_from(["mlp", "lstm", "none"]),
              hidden_size=st.none() | st.integers(1, 6), num_layers=st.integers(1, 2)),
)


def _snapshot(spm, names):
    """What a save of ``names`` must load back as."""
    return {n: ({k: v.detach().clone() for k, v in spm.prompts[n].state_dict().items()},
                spm.prompts[n].config.to_dict(), getattr(spm.prompts[n], "folded", None)) for n in names}


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_loads_as(directory, want, configs=True):
    spm = SoftPromptModel.load(make_model("llama"), directory)
    got = _snapshot(spm, spm.tasks)
    assert list(got) == list(want), (list(got), list(want))
    for name, (tensors, config, folded) in want.items():
        assert _same_tensors(got[name][0], tensors), name
        if configs:
            assert got[name][1] == config and got[name][2] == folded, name
    return spm


@given(data=st.data())
def test_random_operations_load_back_what_was_saved(data):
    spm = SoftPromptModel(make_model("llama"))
    saved = None
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        for _ in range(data.draw(st.integers(1, 10), label="steps")):
            op = data.draw(st.sampled_from(["add", "add", "replace", "fold", "remove", "save", "load"]), label="op")
            name = data.draw(st.sampled_from(NAMES), label="name")
            known = name in spm.tasks
            if op == "add":
                config = data.draw(CONFIGS, label="config")
                if known:
                    with pytest.raises(ValueError, match="already exists"):
                        spm.add_task(name, config)
                else:
                    spm.add_task(name, config)
            elif op == "replace" and known:
                g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
                with torch.no_grad():
                    for p in spm.prompts[name].parameters():
                        p.copy_(torch.randn(p.shape, generator=g))
            elif op == "fold" and known and hasattr(spm.prompts[name], "fold"):
                spm.prompts[name].fold()
            elif op == "remove":
                if known:
                    spm.remove_task(name)
                else:
                    with pytest.raises(ValueError, match="unknown"):
                        spm.remove_task(name)
            elif op == "save":
                subset = data.draw(st.none() | st.lists(st.sampled_from(spm.tasks), unique=True)
                                   if spm.tasks else st.none(), label="tasks")
                spm.save(directory, tasks=subset)
                saved = _snapshot(spm, spm.tasks if subset is None else subset)
                assert len(list(directory.iterdir())) == 2          # the manifest and one weights file
            elif op == "load":
                if saved is None:
                    with pytest.raises(ValueError, match="softprompt.json is missing"):
                        SoftPromptModel.load(make_model("llama"), directory)
                else:
                    _assert_loads_as(directory, saved)
        if saved is not None:
            _assert_loads_as(directory, saved)


# ---------------------------------------------------------------------------------------- damage
def _saved_folder(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    spm = SoftPromptModel(make_model("llama"), trainable_heads=[HEAD])
    spm.add_task("prefix", PrefixTuning(3, projection_dim=6))
    spm.add_task("folded", PrefixTuning(2, projection_dim=5))
    spm.prompts["folded"].fold()
    spm.add_task("v2", PTuningV2(2))
    spm.add_task("prompt", PromptTuning(3, init="text", init_text=[4, 5]))
    spm.add_task("mlp", PTuningV1(template=[1, "{x}", 2, [7, 8]], hidden_size=4))
    spm.add_task("lstm", PTuningV1(template=[2, "{x}"], encoder="lstm", hidden_size=3))
    with torch.no_grad():
        for p in spm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = root / f"saved{seed}"
    spm.save(directory)
    head = {k: v.clone() for k, v in spm.model.get_submodule(HEAD).state_dict().items()}
    return directory, _snapshot(spm, spm.tasks), head


@pytest.fixture(scope="module")
def saved():
    root = Path(tempfile.mkdtemp(prefix="softprompt-fuzz-"))
    yield _saved_folder(root, 0), _saved_folder(root, 1)[0]
    shutil.rmtree(root, ignore_errors=True)


def _paths(node, path=()):
    """Every path (tuple of keys / indices) in a JSON value, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from _paths(child, path + (key,))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def _new_value(data, old):
    """A replacement for a JSON value: nearby or huge numbers, other kinds, empty containers."""
    options = [JSON, st.sampled_from([[], {}, "", 0, -1, 10 ** 9, 10 ** 30, True, None])]
    if isinstance(old, int) and not isinstance(old, bool):
        options.append(st.sampled_from([old + 1, old - 1, -old, old * 10 ** 9, float(old)]))
    if isinstance(old, list):
        options.append(st.just(old[:-1]) | st.just(old + old[-1:]))
    return data.draw(st.one_of(*options), label="value")


def _edit_json(data, meta):
    path = data.draw(st.sampled_from(list(_paths(meta))), label="path")
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans(), label="delete"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = _new_value(data, parent[path[-1]])


def _damage(data, directory: Path, foreign: Path) -> bool:
    """Damage the folder; True when the manifest was re-signed (checksums recomputed)."""
    manifest = directory / checkpoint.CONFIG_NAME
    weights = directory / json.loads(manifest.read_text())["weights"]
    kind = data.draw(st.sampled_from(["truncate", "flip", "edit", "edit_signed", "delete", "foreign"]), label="kind")
    target = data.draw(st.sampled_from([manifest, weights]), label="file")
    if kind == "truncate":
        blob = target.read_bytes()
        target.write_bytes(blob[:data.draw(st.integers(0, len(blob) - 1), label="length")])
    elif kind == "flip":
        blob = bytearray(target.read_bytes())
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            blob[data.draw(st.integers(0, len(blob) - 1), label="at")] ^= data.draw(st.integers(1, 255), label="mask")
        target.write_bytes(bytes(blob))
    elif kind in ("edit", "edit_signed"):
        meta = json.loads(manifest.read_text())
        _edit_json(data, meta)
        if kind == "edit_signed":
            meta["sha256"] = checkpoint._digest(meta)
        manifest.write_text(json.dumps(meta))
        return kind == "edit_signed"
    elif kind == "delete":
        target.unlink()
    else:                                    # the other save's file of the same kind
        other = foreign / (checkpoint.CONFIG_NAME if target == manifest else
                           json.loads((foreign / checkpoint.CONFIG_NAME).read_text())["weights"])
        target.write_bytes(other.read_bytes())
    return False


@given(data=st.data())
def test_damaged_checkpoint_is_a_value_error_or_loads_exactly(saved, data):
    (source, want, head), foreign = saved
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        shutil.copytree(source, directory)
        signed = _damage(data, directory, foreign)
        try:
            # a forged manifest may legitimately change a config (dropout, init, ...), never the tensors
            spm = _assert_loads_as(directory, want, configs=not signed)
        except ValueError as e:
            assert "softprompt checkpoint" in str(e), e
        else:
            assert _same_tensors(spm.model.get_submodule(HEAD).state_dict(), head)
