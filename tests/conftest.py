import pytest

from qnpu.testing import register_profiles

register_profiles()


@pytest.fixture(autouse=True)
def _private_folders(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh empty working folder (a ./qnpu-out left by `qnpu quantize` where pytest
    was started changes nothing, and a default --output lands in the temporary folder), and no test reads
    or writes the user's baseline-perplexity cache (~/.cache/qnpu/baseline-ppl)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("QNPU_BASELINE_CACHE", str(tmp_path_factory.mktemp("baseline-ppl")))
