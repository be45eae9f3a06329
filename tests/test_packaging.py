"""What the distribution installs: one top-level package, everything in it, and light imports."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the import name it installs as
FOLDERS = {"softprompt": "softprompt", "kernels": "softprompt/kernels", "benchmarks": "softprompt/benchmarks"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    """The file names inside a wheel built from a copy of the checkout (no build files left in it)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("softprompt-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_the_wheel_installs_one_top_level_package(wheel_names):
    top = {n.split("/")[0] for n in wheel_names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"softprompt"}, top
    assert "kernels/__init__.py" not in wheel_names and "benchmarks/__init__.py" not in wheel_names


def test_every_package_folder_is_in_the_wheel(wheel_names):
    """pyproject lists the packages by hand (the folder mapping needs it): none may be forgotten."""
    for folder, installed in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{rel}" in wheel_names, f"{folder}/{rel} is not installed"
    assert "softprompt/kernels/triton_prefill.py" in wheel_names
    assert "softprompt/kernels/csrc/prefix_paged_attention.cpp" in wheel_names, "the compiled backend's source"
    assert "softprompt/server/app.py" in wheel_names and "softprompt/server/__main__.py" in wheel_names


def _imported_after(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_import_softprompt_is_light():
    loaded = _imported_after("import softprompt")
    assert "transformers" not in loaded and "torch" not in loaded


def test_the_cli_imports_the_server_only_for_serve():
    loaded = _imported_after("import softprompt.cli")
    assert not {"fastapi", "uvicorn", "starlette", "transformers"} & loaded


def test_kernels_import_torch_only():
    loaded = _imported_after("import softprompt.kernels")
    assert "torch" in loaded and "transformers" not in loaded


def test_public_names_load_on_first_use():
    import softprompt
    from softprompt.engine import Engine
    from softprompt.integration import attach
    from softprompt.model import SoftPromptModel
    assert softprompt.SoftPromptModel is SoftPromptModel and softprompt.attach is attach and softprompt.Engine is Engine
    assert set(softprompt.__all__) <= set(dir(softprompt))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        softprompt.nope


def test_the_library_never_imports_the_benchmarks():
    import ast
    for path in (ROOT / "softprompt").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "softprompt":
            continue                                   # `softprompt bench` runs them, on demand
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[:2] == ["softprompt", "benchmarks"] or n.split(".")[0] == "benchmarks"
                           for n in names), f"{path.relative_to(ROOT)} imports {names}"
