import pytest
import torch

from qnpu.models.devices import resolve_device


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0", ""])
def test_unknown_device_names_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="allowed: cpu, cuda"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_npu_without_torch_npu_says_how_to_install_it():
    try:
        import torch_npu  # noqa: F401  (only whether it imports)
    except ImportError:
        with pytest.raises(ValueError, match="needs torch_npu"):
            resolve_device("npu")
    else:
        pytest.skip("torch_npu is installed")
