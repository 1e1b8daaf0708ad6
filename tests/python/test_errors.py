"""Bad arguments raise ValueError/TypeError; bad bytes raise CompeftError; nothing crashes."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_rs
from compeft_rs import CompeftError, CompressedTensor


@pytest.fixture(scope="module")
def stream():
    x = np.random.default_rng(5).standard_normal(20_000).astype(np.float32)
    return compeft_rs.encode(x, 0.3).to_bytes()


@pytest.mark.parametrize("k", [0, 0.0, -0.1, 1.0000001, 1.5, 20, math.nan, math.inf])
def test_bad_density(k):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        compeft_rs.encode(np.ones(10, np.float32), k)


def test_density_20_hints_at_fraction():
    with pytest.raises(ValueError, match="k=0.2"):
        compeft_rs.encode(np.ones(10, np.float32), 20)


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        compeft_rs.encode(np.ones(10, np.float32), 0.1, alpha)


def test_argument_types():
    with pytest.raises(TypeError):
        compeft_rs.encode(np.ones(10, np.float32), "0.1")
    with pytest.raises(TypeError):
        compeft_rs.encode(np.ones(10, np.float32), True)
    with pytest.raises(ValueError, match="encoding"):
        compeft_rs.encode(np.ones(10, np.float32), 0.1, encoding="zip")
    with pytest.raises(TypeError, match="unsupported dtype"):
        compeft_rs.encode(torch.arange(10), 0.1)
    with pytest.raises(TypeError, match="unsupported dtype"):
        compeft_rs.encode(np.arange(10), 0.1)
    with pytest.raises(TypeError, match="unsupported dtype"):
        compeft_rs.encode(np.ones(3, np.complex64), 0.1)
    c = compeft_rs.encode(np.ones(10, np.float32), 0.1)
    with pytest.raises(TypeError, match="unsupported dtype"):
        c.decode(dtype=torch.int32)
    with pytest.raises(TypeError):
        CompressedTensor.from_bytes(123)
    with pytest.raises(TypeError):
        compeft_rs.decode("not bytes")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_input(bad, dtype):
    x = torch.zeros(1000, dtype=dtype)
    x[123] = bad
    with pytest.raises(ValueError, match="NaN or Inf at flat index 123"):
        compeft_rs.encode(x, 0.1)


def test_numpy_bfloat16_output_needs_a_dtype():
    c = compeft_rs.encode(torch.ones(4, dtype=torch.bfloat16), 0.5)
    c_np = CompressedTensor.from_bytes(c.to_bytes(), framework="np")
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(TypeError, match="bfloat16"):
            c_np.decode()
    assert c_np.decode(dtype="float32").dtype == np.float32


def test_every_truncation(stream):
    for n in range(0, len(stream), 3):
        with pytest.raises(CompeftError):
            CompressedTensor.from_bytes(stream[:n])


def test_bit_flips(stream):
    rng = np.random.default_rng(0)
    for _ in range(300):
        b = bytearray(stream)
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(CompeftError):
            CompressedTensor.from_bytes(bytes(b))


def test_specific_messages(stream):
    with pytest.raises(CompeftError, match="not a compeft stream"):
        compeft_rs.decode(b"PK\x03\x04 a zip file, say")
    b = bytearray(stream)
    b[4] = 7
    with pytest.raises(CompeftError, match="version 7"):
        compeft_rs.decode(bytes(b))
    b = bytearray(stream)
    b[100] ^= 4
    with pytest.raises(CompeftError, match="checksum"):
        compeft_rs.decode(bytes(b))
    with pytest.raises(CompeftError, match="truncated"):
        compeft_rs.decode(stream[:-10])


@given(st.binary(max_size=400))
def test_garbage(data):
    with pytest.raises(CompeftError):
        CompressedTensor.from_bytes(data)


@given(st.binary(min_size=20, max_size=400))
def test_garbage_with_magic(data):
    with pytest.raises(CompeftError):
        CompressedTensor.from_bytes(b"CPFT\x01" + data)


def test_compeft_error_is_an_exception_class():
    assert issubclass(CompeftError, Exception) and not issubclass(CompeftError, ValueError)


def _empty_stream(numel: int) -> bytes:
    """A valid golomb stream of `numel` float32 entries with nothing kept (about 35 bytes)."""
    import struct
    import zlib

    def varint(v):
        out = bytearray()
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
        return bytes(out)

    body = b"CPFT\x01\x00\x03\x01" + varint(numel) + varint(numel) + varint(0)
    body += struct.pack("<d", 0.0) + bytes([0, 12, 0, 0])
    return body + struct.pack("<I", zlib.crc32(body))


def test_decode_limit_refuses_a_tiny_stream_declaring_huge_size():
    bomb = _empty_stream(1 << 40)
    assert len(bomb) < 40
    with pytest.raises(compeft_rs.DecodeLimitError, match="set_max_numel"):
        compeft_rs.decode(bomb)
    assert issubclass(compeft_rs.DecodeLimitError, CompeftError)
    small = _empty_stream(1000)
    old = compeft_rs.set_max_numel(999)
    try:
        assert compeft_rs.get_max_numel() == 999
        with pytest.raises(compeft_rs.DecodeLimitError):
            CompressedTensor.from_bytes(small)
    finally:
        compeft_rs.set_max_numel(old)
    assert old == 1 << 32
    assert compeft_rs.decode(small).shape == (1000,)
    with pytest.raises(ValueError):
        compeft_rs.set_max_numel(-1)
    with pytest.raises(ValueError, match="2\\^48"):
        compeft_rs.set_max_numel((1 << 48) + 1)

