"""Every Python block of README.md runs as written.

Blocks run in a fresh namespace, in a temporary working folder. A marker comment on the line before a
block's fence (invisible on GitHub) changes how it runs:

- ``<!-- readme-test: continues -->``: the block continues the one before it (same namespace);
- ``<!-- readme-test: realmodel -->``: the block loads SmolLM2 through ``softprompt.assets.load_smollm2``;
  the fast test swaps that loader for a tiny random Llama and a small word-level tokenizer, and the
  real-model test (``realmodel``/``slow`` markers) runs the block as written on SmolLM2;
- ``<!-- readme-test: server -->``: the block is a client of ``softprompt serve`` on 127.0.0.1:8000
  with a task ``sentiment``; the test serves a tiny random model on a free port and points the block's
  address, task and key at it.

Shell blocks are checked too: each ``softprompt`` command they show is one the CLI has, and each
``pip install -e ".[extra]"`` names an extra of pyproject.toml.
"""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*-->")
KNOWN_MARKERS = {"continues", "realmodel", "server"}


def readme_blocks():
    """``[(line, language, marker or None, code)]`` for every fenced block of the README."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((i + 1, fence.group(1), marker.group(1) if marker else None, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


PYTHON = [b for b in readme_blocks() if b[1] == "python"]
REAL = [b for b in PYTHON if b[2] == "realmodel"]
SERVER = [b for b in PYTHON if b[2] == "server"]
LOCAL = [b for b in PYTHON if b[2] != "server"]


def _chain(block):
    """The blocks to run for ``block``: the ones it continues from, then itself."""
    i = PYTHON.index(block)
    start = i
    while PYTHON[start][2] == "continues":
        start -= 1
    return PYTHON[start:i + 1]


def _run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, _, _, code in _chain(block):
        exec(compile(code, f"README.md (block at line {line})", "exec"), namespace)
    return namespace


def tiny_tokenizer():
    """A word-level tokenizer over the README's words (anything else is <unk>), 512 ids at most."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted(set(re.findall(r"[a-z]+|[^\sa-z]", README.read_text(encoding="utf-8").lower())))
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words[:500]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def test_the_readme_has_the_blocks_this_runner_expects():
    blocks = readme_blocks()
    assert len(PYTHON) >= 5 and REAL, "the README lost its Python examples"
    assert all(b[2] in KNOWN_MARKERS | {None} for b in blocks), [b[:3] for b in blocks]
    assert PYTHON[0][2] != "continues"


@pytest.mark.parametrize("block", LOCAL, ids=[f"line{b[0]}" for b in LOCAL])
def test_python_block_runs(block, tmp_path, monkeypatch):
    import softprompt.assets
    from softprompt.training.cli import tiny_model
    if any(b[2] == "realmodel" for b in _chain(block)):
        monkeypatch.setattr(softprompt.assets, "load_smollm2", lambda dtype=None: (tiny_model(), tiny_tokenizer()))
    _run(block, tmp_path, monkeypatch)


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize("block", REAL, ids=[f"line{b[0]}" for b in REAL])
def test_realmodel_block_runs_on_smollm2(block, tmp_path, monkeypatch):
    from softprompt import assets
    if assets.status()["smollm2"] is None:
        pytest.skip("SmolLM2 not installed (softprompt assets --install)")
    for dep in ("gguf", "accelerate"):
        pytest.importorskip(dep)
    _run(block, tmp_path, monkeypatch)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("block", SERVER, ids=[f"line{b[0]}" for b in SERVER])
def test_server_block_runs_against_a_tiny_server(block, tmp_path, monkeypatch):
    from test_server_common import API_KEY, TASKS, Served
    served = Served(tmp_path)
    try:
        code = (block[3].replace("http://127.0.0.1:8000", served.url).replace('"sentiment"', f'"{TASKS[0]}"')
                .replace('"unused-or-your-key"', f'"{API_KEY}"'))
        assert code != block[3], "the block no longer names the address, task and key this test replaces"
        monkeypatch.chdir(tmp_path)
        exec(compile(code, f"README.md (block at line {block[0]})", "exec"), {"__name__": "__readme__"})
    finally:
        served.stop()


def _shell_commands():
    for line, lang, _, code in readme_blocks():
        if lang in ("bash", "sh", "shell"):
            for text in code.replace("\\\n", " ").splitlines():      # a trailing backslash continues the line
                for part in re.split(r"&&|;", text.split("#")[0]):
                    if part.strip():
                        yield line, shlex.split(part)


def test_shell_blocks_name_real_commands_and_extras():
    import tomllib
    from softprompt.cli import PASSTHROUGH
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    commands = {*PASSTHROUGH, "demo", "info", "assets"}
    seen = 0
    for line, words in _shell_commands():
        if words[0] == "softprompt":
            assert words[1] in commands or words[1].startswith("-"), f"README line {line}: {words}"
            seen += 1
        for word in words:
            for extra in re.findall(r"\[([\w,-]+)\]", word) if word.startswith(".[") else []:
                assert set(extra.split(",")) <= extras, f"README line {line}: extra {extra} not in pyproject.toml"
    assert seen >= 3
