"""`resolve_device`: check a ``--device`` string before any work starts."""
from __future__ import annotations

import importlib

import torch

KINDS = ("cpu", "cuda", "npu")


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``npu[:i]`` as a `torch.device`, checked to exist on this machine.

    ``npu`` imports ``torch_npu`` first (it registers the backend with torch; qnpu never needs it
    otherwise). Raises ValueError saying what is missing."""
    text = str(name)
    kind, _, index = text.partition(":")
    if kind not in KINDS or (index and not index.isdigit()):
        raise ValueError(f"device {text!r}; allowed: cpu, cuda[:index], npu[:index]")
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise ValueError("device 'npu' needs torch_npu (pip install -e '.[npu]' on an Ascend host)") from None
    if kind != "cpu":
        backend = getattr(torch, kind)
        count = backend.device_count() if backend.is_available() else 0
        if count == 0:
            raise ValueError(f"device {text!r}: no {kind.upper()} device is available on this machine; use cpu")
        if index and int(index) >= count:
            raise ValueError(f"device {text!r}: this machine has {count} {kind.upper()} device(s)")
    return torch.device(text)
