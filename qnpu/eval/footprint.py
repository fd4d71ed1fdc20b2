"""What a model occupies: its weights as stored (`weight_bytes`) and the peak memory of a measured
window on its device (`MemoryMeter`), for `qnpu.eval.efficiency`.

Memory is one of the two deployment gains the openPangu-Embedded quantization study reports
(Luo et al. 2025, "Post-Training Quantization of OpenPangu Models for Efficient Deployment on
Atlas A2", arXiv:2512.23367: W4A8 saves memory, W8A8 speeds up prefill).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys

import torch
from torch import nn

from qnpu.models.qlinear import QLinear

BIAS_BUFFERS = ("bias", "quant_bias")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _is_lowered_linear(module: nn.Module) -> bool:
    """A lowered linear (`qnpu.lowering.modules`, docs/architecture.md "Lowering"): integer ``weight``
    buffer laid out for its op, and in/out features. Recognised by shape, as eval does not import lowering."""
    w = module._buffers.get("weight")
    return w is not None and not w.is_floating_point() and hasattr(module, "in_features") \
        and hasattr(module, "out_features")


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of ``model``'s weights.

    * ``linear``: every linear weight as stored: a `QLinear` with integer codes counts its packed codes
      plus quantization parameters (`QTensor.packed_nbytes`: ``bits`` per code, fp32 scales, int8 zero
      points), a lowered linear its buffers as laid out for its op (int8 ``(K, N)`` or int32 words of
      eight int4 codes, scales, offsets; biases left out), any other linear its float weight;
    * ``linear_float``: the same linears at the model's float width (``in x out x`` element size);
    * ``total``: parameters and buffers, each tensor once (tied embeddings count once). A simulated
      model holds its dequantized float weights, so its total is the float model's."""
    linear = linear_float = 0
    for module in model.modules():
        if isinstance(module, (QLinear, nn.Linear)):
            size = _nbytes(module.weight)
            q = getattr(module, "qweight", None)
            linear += size if q is None else q.packed_nbytes
            linear_float += size
        elif _is_lowered_linear(module):
            linear += sum(_nbytes(b) for name, b in module._buffers.items() if name not in BIAS_BUFFERS)
            width = torch.empty((), dtype=module.dtype).element_size() if isinstance(
                getattr(module, "dtype", None), torch.dtype) else 4
            linear_float += module.in_features * module.out_features * width
    total = sum(_nbytes(t) for t in (*model.parameters(), *model.buffers()))  # each shared tensor once
    return {"linear": linear, "linear_float": linear_float, "total": total}


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS: Linux ``/proc/self/clear_refs`` value 5."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def release_free_memory() -> bool:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so that a
    process's RSS reflects what it holds rather than what loading once used; False where unavailable."""
    gc.collect()
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if not name:
        return False
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


class MemoryMeter:
    """Peak memory of a window (`start` ... `stop`) on ``device``.

    * CUDA / NPU (``source`` ``"cuda.max_memory_allocated"`` / ``"npu.max_memory_allocated"``): the
      allocator's peak since `start` reset it: everything allocated on the device, weights included;
      ``before`` is what was allocated at `start`.
    * CPU (``"rss"``): the process's peak resident set during the window minus its RSS at `start`
      (``before``): what the window added (activations, KV cache), weights excluded; ``absolute`` is the
      peak itself (the process as a whole: weights, interpreter, libraries). On Linux the peak
      is reset at `start` (``/proc/self/clear_refs``); elsewhere the lifetime peak (``ru_maxrss``) only
      tells when the window raised it, else the peak is unknown (None). Memory an earlier window freed
      but the allocator kept is not counted again."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        kind = self.device.type
        backend = getattr(torch, kind, None) if kind in ("cuda", "npu") else None
        self.backend = backend if backend is not None and hasattr(backend, "max_memory_allocated") else None
        self.source = f"{kind}.max_memory_allocated" if self.backend is not None else "rss"
        self.before: int | None = None
        self.absolute: int | None = None  # the window's peak itself (RSS: weights and all included)
        self._reset = False
        self._maxrss = 0

    @property
    def note(self) -> str:
        if self.backend is not None:
            return f"peak bytes allocated on {self.device} during the measurement, weights included"
        return ("peak resident memory of the process during the measurement minus its resident memory before "
                "(weights excluded)" + ("" if self._reset else "; the lifetime peak was not resettable here"))

    def start(self) -> None:
        if self.backend is not None:
            self.backend.synchronize(self.device)
            self.backend.reset_peak_memory_stats(self.device)
            self.before = int(self.backend.memory_allocated(self.device))
            return
        self.before = _status_bytes("VmRSS")
        self._reset = self.before is not None and _reset_rss_peak()
        self._maxrss = _maxrss_bytes()
        if self.before is None:
            self.before = self._maxrss  # no /proc: the lifetime peak is the only reading there is

    def stop(self) -> int | None:
        if self.backend is not None:
            self.backend.synchronize(self.device)
            self.absolute = int(self.backend.max_memory_allocated(self.device))
            return self.absolute
        if self._reset:
            peak = _status_bytes("VmHWM")
            self.absolute = peak
            return None if peak is None else max(0, peak - self.before)
        after = _maxrss_bytes()
        self.absolute = after if after > self._maxrss else None
        return after - self.before if after > self._maxrss else None
