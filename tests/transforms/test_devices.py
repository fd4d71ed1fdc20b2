"""Transforms compute on the device of the tensors they get: no factory call without ``device=``.

Without a GPU, `qnpu.testing.devices.explicit_devices` records every tensor that qnpu's transforms,
qcore and models create without naming a device (on a GPU run those would land on the CPU and the
next op would mix devices). Every built-in recipe and every row of the conformance table runs
under it on a random block.
"""
from __future__ import annotations

import pytest
import torch

from qnpu.qcore import QSpec, hadamard, quantize, random_hadamard, random_signs
from qnpu.testing import explicit_devices, random_block
from qnpu.transforms import generator, recipes, rotate_edges, rotation_matrix

from .test_conformance import ROWS


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("name", recipes.names())
def test_builtin_recipes_create_every_tensor_on_an_explicit_device(name, group):
    if name in ("slim-llm", "w4a16-hqq") and group is None:
        pytest.skip(f"{name}'s default groups of 64 do not divide the random block's 96 down_proj inputs "
                    "(the group=32 case runs it)")
    recipe = recipes.get(name, group_size=group)
    view = random_block(2, num_kv_heads=1)
    with explicit_devices() as calls:
        recipe.update(view, recipe.init(view))
    assert not calls, f"{name}: tensors created without device=: {sorted(set(calls))}"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_conformance_transforms_create_every_tensor_on_an_explicit_device(row):
    name, build, spec, _ = row
    recipe = build(spec)
    view = random_block(1, bias=True, qk_norm=True)
    with explicit_devices() as calls:
        recipe.update(view, recipe.init(view))
    assert not calls, f"{name}: tensors created without device=: {sorted(set(calls))}"


def test_the_recorder_sees_a_missing_device_in_qnpu_code_only():
    with explicit_devices(("qcore",)) as calls:
        torch.zeros(3)                                # this test file: not watched
        hadamard(12, device=None)                     # qcore, no device: two factory calls recorded
    assert len(calls) == 2 and all("qnpu/qcore/hadamard.py" in c and "in hadamard" in c for c in calls)
    with explicit_devices(("qcore",)) as calls:
        hadamard(12, device="cpu")
    assert calls == []


def test_seeded_draws_are_made_on_the_cpu_and_match_the_old_results():
    # the CPU generator's stream as before the device plumbing: the same seed, the same values
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(random_signs(16, 7), (torch.randint(0, 2, (16,), generator=gen) * 2 - 1).float())
    assert generator(3, "a").device == torch.device("cpu")
    h = random_hadamard(12, 5)
    assert torch.equal(h, random_hadamard(12, 5, device="cpu"))
    assert torch.allclose(h @ h.T, torch.eye(12), atol=1e-6)


def test_stochastic_rounding_draws_on_the_generators_device():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    spec = QSpec(bits=4)
    a = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    b = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.codes, b.codes)


def test_rotation_matrix_and_edges_follow_the_given_device():
    q = rotation_matrix(16, 3, "orthogonal", dtype=torch.float32, device="cpu")
    assert q.device.type == "cpu" and torch.equal(q, rotation_matrix(16, 3, "orthogonal", dtype=torch.float32))
    embed = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    with explicit_devices() as calls:
        rotate_edges(embed, None, None, seed=3, kind="hadamard")
    assert not calls, calls
