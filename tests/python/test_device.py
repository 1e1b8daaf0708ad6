"""decode(device=...): the bitmask expansion with torch ops, checked on the CPU everywhere and on
CUDA where a GPU is present."""

import numpy as np
import pytest
import torch

import compeft_rs
from compeft_rs._tensor import _expand_on_device

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000, 12345])
def test_device_expansion_matches_cpu_decode(dtype, n):
    x = torch.randn(n, dtype=torch.float32).to(dtype).reshape(-1)
    c = compeft_rs.encode(x, 0.1)
    got = _expand_on_device(c._stream, c.dtype_name, torch.device("cpu"))
    assert got.dtype == dtype and torch.equal(got, c.decode())


def test_cpu_device_is_plain_decode():
    c = compeft_rs.encode(np.ones(10, np.float32), 0.5)
    out = c.decode(device="cpu")
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    c = compeft_rs.encode(np.ones(10, np.float32), 0.5)
    with pytest.raises(RuntimeError, match="cuda"):
        c.decode(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_decode(dtype):
    x = torch.randn(1_000_003, dtype=dtype)
    c = compeft_rs.encode(x, 0.1)
    got = c.decode(device="cuda")
    assert got.device.type == "cuda" and got.dtype == dtype
    assert torch.equal(got.cpu(), c.decode())
