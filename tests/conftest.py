import pytest

from qnpu.testing import register_profiles

register_profiles()


@pytest.fixture(autouse=True)
def _private_baseline_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's baseline-perplexity cache (~/.cache/qnpu/baseline-ppl)."""
    monkeypatch.setenv("QNPU_BASELINE_CACHE", str(tmp_path_factory.mktemp("baseline-ppl")))
