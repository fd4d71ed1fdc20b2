import json
import os

import pytest
import torch

from qnpu.qcore import QSpec, quantize
from qnpu.models.checkpoint import Checkpoint, CheckpointWriter

A8 = QSpec(bits=8, granularity="tensor")


def _payload(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g)
    q = quantize(w, QSpec(bits=4, format="uint", symmetric=False, granularity="group", group_size=8, axis=-1))
    tensors = {"layers.0.norm.weight": torch.rand(16, generator=g).to(torch.bfloat16),
               "layers.0.v.weight": torch.randn(8, 16, generator=g)}
    qlinears = {"layers.0.q": {"qweight": q, "act_spec": A8, "act_qparams": (torch.tensor(0.02), None),
                               "online_hadamard": True},
                "layers.0.v": {"qweight": None, "act_spec": QSpec(bits=8, granularity="token", dynamic=True)}}
    return tensors, qlinears


def test_round_trip_is_bit_exact(tmp_path):
    tensors, qlinears = _payload(0)
    path = tmp_path / "ckpt"
    with CheckpointWriter(path, source={"name": "tiny"}, recipe={"transform": "rtn"}, hf_config={"a": 1}) as w:
        w.add(tensors, qlinears)
        w.add({"embed.weight": torch.ones(4, 16)})
        w.close(extra={"report": {"ppl": 1.0}})
    ck = Checkpoint(path)
    assert ck.meta["source"] == {"name": "tiny"} and ck.meta["recipe"] == {"transform": "rtn"}
    assert ck.meta["qnpu_version"] and ck.hf_config == {"a": 1} and ck.meta["extra"]["report"]["ppl"] == 1.0
    back = ck.qlinears()
    q0, q1 = qlinears["layers.0.q"]["qweight"], back["layers.0.q"]["qweight"]
    assert q1.spec == q0.spec and q1.dtype == q0.dtype
    for a, b in [(q0.codes, q1.codes), (q0.scale, q1.scale), (q0.zero_point, q1.zero_point)]:
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(q1.dequantize(), q0.dequantize())
    assert back["layers.0.q"]["act_spec"] == A8 and back["layers.0.q"]["online_hadamard"] is True
    assert torch.equal(back["layers.0.q"]["act_qparams"][0], torch.tensor(0.02))
    assert back["layers.0.v"]["qweight"] is None and back["layers.0.v"]["act_spec"].dynamic
    floats = ck.float_tensors()
    assert set(floats) == {"layers.0.norm.weight", "layers.0.v.weight", "embed.weight"}
    assert floats["layers.0.norm.weight"].dtype == torch.bfloat16


def test_an_interrupted_write_leaves_nothing_at_the_path(tmp_path):
    tensors, qlinears = _payload(1)
    path = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(path, source={}, recipe={}, hf_config={}) as w:
            w.add(tensors, qlinears)
            raise KeyboardInterrupt
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_and_rejects_non_checkpoints(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        CheckpointWriter(tmp_path / "x", source={}, recipe={}, hf_config={})
    with pytest.raises(FileNotFoundError, match="not a qnpu checkpoint"):
        Checkpoint(tmp_path / "x")
    (tmp_path / "x" / "qnpu.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        Checkpoint(tmp_path / "x")


def test_quantized_weight_and_float_weight_together_are_refused(tmp_path):
    tensors, qlinears = _payload(2)
    tensors["layers.0.q.weight"] = torch.zeros(8, 16)
    with CheckpointWriter(tmp_path / "c", source={}, recipe={}, hf_config={}) as w:
        with pytest.raises(ValueError, match="either its quantized weight or its float weight"):
            w.add(tensors, qlinears)
        w.abort()
