"""The benchmark suite runs end to end on tiny shapes: every method checked against reference, files written."""
import json

import pytest
import torch

from softprompt.benchmarks import run as bench_run
from softprompt.benchmarks.baselines import METHODS
from softprompt.benchmarks.suite import Shape, build_problem, format_rows, run_sweep


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_baselines_agree_with_reference():
    for train in (False, True):
        p = build_problem(Shape(B=5, T=3, P=7, Sq=4, Skv=6, Hq=4, Hkv=2, D=8, block_size=4, train=train),
                          torch.device("cpu"))
        ref = METHODS["reference"](p)()
        for name in ("torch", "sdpa_concat", "flex_packed"):
            with torch.set_grad_enabled(name != "flex_packed"):     # flex has no CPU backward
                torch.testing.assert_close(METHODS[name](p)(), ref, atol=2e-5, rtol=1e-4, msg=name)


def test_sweep_reports_ratios_and_memory():
    shapes = [Shape(B=b, T=2, P=8, Sq=1, Skv=5, Hq=4, Hkv=2, D=8, block_size=4) for b in (2, 4)]
    rows = run_sweep(shapes, ["torch", "reference", "sdpa_concat", "triton"], torch.device("cpu"))
    for row in rows:
        assert row["torch max|diff|"] < 1e-5 and row["sdpa_concat max|diff|"] < 1e-5
        assert row["speed-up vs reference"] > 0 and row["torch MiB"] > 0
        assert "triton ms" not in row                      # skipped on the CPU, with a note
    table, columns = format_rows(rows, ["torch", "reference"])
    assert "speed-up: reference ms / ours" in columns and table[0]["speed-up: reference ms / ours"].endswith("x")
    assert "memory: reference MiB / ours" in columns and table[0]["ours"] == "torch"


def _tiny_sweeps(monkeypatch):
    tiny = {"prefix": [Shape(B=2, T=2, P=p, Sq=1, Skv=4, Hq=2, Hkv=1, D=8, block_size=4) for p in (4, 8)],
            "batch": [Shape(B=b, T=2, P=4, Sq=1, Skv=4, Hq=2, Hkv=1, D=8, block_size=4) for b in (2, 4)]}
    monkeypatch.setattr(bench_run, "sweeps", lambda bench, preset: tiny)


def test_run_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    import softprompt.benchmarks.presets as presets
    _tiny_sweeps(monkeypatch)
    assert presets.sweeps("decode", "cpu")["own task"][0].T == 64
    bench_run.main(["decode", "--preset", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode-cpu.json").read_text())
    assert data["environment"]["commit"] and len(data["sweeps"]["prefix"]) == 2
    md = (tmp_path / "decode-cpu.md").read_text()
    assert "speed-up: reference ms / ours" in md and "above 1 means ours is faster" in md
    assert (tmp_path / "decode-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_go_to_a_fresh_folder_unless_asked_to_update(tmp_path, monkeypatch):
    """Without --out, each run gets its own folder under ./softprompt-runs (ignored by git), and the
    committed results are written only with --update-results."""
    from softprompt.benchmarks import common
    _tiny_sweeps(monkeypatch)
    committed = tmp_path / "committed"
    monkeypatch.setattr(common, "RESULTS_DIR", committed)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        bench_run.main(["decode", "--preset", "cpu"])
    runs = sorted(p for p in (tmp_path / "softprompt-runs").iterdir() if p.is_dir())
    assert len(runs) == 2 and all((r / "decode-cpu.md").exists() for r in runs)
    assert (tmp_path / "softprompt-runs" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert not committed.exists()
    bench_run.main(["decode", "--preset", "cpu", "--update-results"])
    assert (committed / "decode-cpu.json").exists()
    with pytest.raises(SystemExit):
        bench_run.main(["decode", "--out", "x", "--update-results"])


def test_number_formats_and_plot_caption():
    from softprompt.benchmarks.common import number, ratio
    from softprompt.benchmarks.plots import caption
    assert [number(v) for v in (1210.4, 976.2, 5.944, 0.01234, 99.96, 0.0)] == \
        ["1210", "976", "5.94", "0.0123", "100", "0"]
    assert [ratio(v) for v in (0.0031, 0.5, 1.414, 57.31, 123.4)] == ["0.00310x", "0.50x", "1.41x", "57.3x", "123x"]
    text = caption({"prefix": [{"ours": "torch"}]}, {"device": "CPU (Xeon, 1 threads)", "torch": "2.13"})
    assert '"ours" = the faster of our no-copy backends (torch)' in text and "1 threads" in text


def test_engine_benchmark_runs_every_method_side_by_side():
    """The engine benchmark on a tiny model: both baselines, the engine and (on request) the engine
    with torch-ops attention, every method's tokens equal to the PEFT-style batch."""
    from softprompt.benchmarks.engine import TORCH_ATTENTION, run as engine_run
    from softprompt.benchmarks.generate import tiny_llama
    table, summary, _ = engine_run(tiny_llama(), tasks=2, per_task=2, prefix=4, new_tokens=3, repeats=1,
                                   torch_attention=True)
    methods = [row["method"] for row in table]
    assert methods == ["per-task generate", "batch, prefix copied", "engine", TORCH_ATTENTION]
    assert all(row["tokens = PEFT-style batch"] == "100.0%" for row in table)
    assert "CPU decoder" in summary["engine forward path"]
