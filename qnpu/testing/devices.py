"""`explicit_devices`: find tensors that qnpu code creates without saying on which device.

A transform computes on the device of the tensors it is given (docs/architecture.md, "Devices"): a
factory call such as ``torch.zeros(n)`` inside it makes a CPU tensor whatever the inputs are, and
only fails once the inputs live on a GPU. Under ``explicit_devices()`` every factory call made
*from a file of the watched packages* without a ``device=`` argument is recorded (file, line,
function), so a CPU-only test finds what a GPU run would trip on. Calls from other libraries
(torch itself, transformers) are not watched, and ``*_like`` / ``Tensor.new_*`` calls, which take
their device from a tensor, are never recorded.

    with explicit_devices() as calls:
        recipe.update(view, recipe.init(view))
    assert not calls, calls
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

# factory functions whose result lands on the default device unless ``device=`` is given
FACTORY_NAMES = ("zeros", "ones", "empty", "full", "arange", "range", "eye", "linspace", "logspace", "rand", "randn",
                 "randint", "randperm", "tensor", "scalar_tensor", "empty_strided", "as_tensor", "from_numpy",
                 "tril_indices", "triu_indices")
FACTORIES = frozenset(getattr(torch, n) for n in FACTORY_NAMES if hasattr(torch, n))
WATCHED = ("transforms", "qcore", "models")


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Recorder(TorchFunctionMode):
    def __init__(self, folders: tuple[str, ...], calls: list) -> None:
        super().__init__()
        self.folders, self.calls = folders, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and not self._inherits(func, args):
            frame = sys._getframe(1)
            path = os.path.abspath(frame.f_code.co_filename)
            if path.startswith(self.folders):
                self.calls.append(f"{os.path.relpath(path, os.path.dirname(_package_root()))}:{frame.f_lineno} "
                                  f"{getattr(func, '__name__', func)}() in {frame.f_code.co_name}")
        return func(*args, **kwargs)

    @staticmethod
    def _inherits(func, args) -> bool:
        # as_tensor(t) keeps t's device; from_numpy is CPU by definition and is always recorded
        return func is torch.as_tensor and bool(args) and isinstance(args[0], torch.Tensor)


@contextlib.contextmanager
def explicit_devices(packages: tuple[str, ...] = WATCHED):
    """Record every factory call without ``device=`` made from ``qnpu/<package>/`` files for the
    ``packages`` given (default: transforms, qcore, models); yields the list of ``"path:line
    function() in caller"`` strings, filled as the block runs."""
    root = _package_root()
    folders = tuple(os.path.join(root, p) + os.sep for p in packages)
    calls: list[str] = []
    with _Recorder(folders, calls):
        yield calls
