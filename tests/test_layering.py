"""Imports flow one way (docs/architecture.md): qcore <- transforms <- models; lowering <- qcore."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qnpu"
THIRD_PARTY_OK = {"torch", "numpy", "scipy"}
# the qnpu subpackages each layer may import (itself always allowed)
ALLOWED_QNPU = {
    "qcore": set(),
    "transforms": {"qcore"},
    "models": {"qcore", "transforms"},
    "lowering": {"qcore"},
    "testing": {"qcore", "transforms"},
    "data": set(),
    "eval": {"qcore", "transforms", "models", "lowering", "data"},
}
EXTRA_THIRD_PARTY = {"models": {"transformers", "safetensors", "gguf", "accelerate", "tqdm", "einops"},
                     "testing": {"hypothesis"}, "lowering": {"safetensors", "torch_npu", "transformers"},
                     "transforms": {"einops", "yaml"}, "eval": {"transformers", "tqdm", "lm_eval", "matplotlib"}}


def _imports(path: Path) -> set[str]:
    """Top-level module names imported by ``path`` (relative imports resolved inside qnpu)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = ".".join(parts[: len(parts) - node.level] + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            if module == "qnpu":  # `from qnpu import x` names a subpackage (or the version)
                found |= {f"qnpu.{a.name}" for a in node.names}
    return found


def _violations(layer: str) -> list[str]:
    ok_roots = THIRD_PARTY_OK | EXTRA_THIRD_PARTY.get(layer, set()) | set(sys.stdlib_module_names)
    ok_qnpu = ALLOWED_QNPU[layer] | {layer}
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for mod in sorted(_imports(path)):
            parts = mod.split(".")
            if parts[0] == "qnpu":
                # the root package holds only the version string
                if len(parts) > 1 and parts[1] not in ok_qnpu | {"__version__"}:
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {mod}")
            elif parts[0] not in ok_roots:
                bad.append(f"{path.relative_to(ROOT.parent)} imports {mod}")
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED_QNPU))
def test_layer_imports_only_what_it_may(layer):
    if not (ROOT / layer).is_dir():
        pytest.skip(f"qnpu/{layer} does not exist yet")
    assert _violations(layer) == []


def test_the_checker_catches_a_forbidden_import(tmp_path, monkeypatch):
    fake = tmp_path / "qnpu" / "qcore"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import transformers\nfrom ..models import load\nfrom . import spec\n"
                                 "from qnpu import cli\nimport qnpu\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "qnpu")
    assert _violations("qcore") == ["qnpu/qcore/bad.py imports qnpu.cli",
                                    "qnpu/qcore/bad.py imports qnpu.models",
                                    "qnpu/qcore/bad.py imports transformers"]
