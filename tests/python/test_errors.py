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


def _empty_stream(numel: int, gaps: bytes = b"", gap_bits: int = 0) -> bytes:
    """A valid golomb stream of `numel` float32 entries with nothing kept (about 35 bytes); with
    `gap_bits` (below 128) and `gaps`, one that announces gap codes it cannot have."""
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
    body += struct.pack("<d", 0.0) + bytes([0, 12, gap_bits, 0]) + gaps
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_stream_without_nonzeros_has_no_gap_bits():
    # One byte string per stream: gap bits in a stream with no nonzeros would be a second form.
    assert compeft_rs.decode(_empty_stream(1000)).abs().sum() == 0
    for bits, gaps in [(1, b"\x01"), (8, b"\x00"), (9, b"\x00\x00")]:
        with pytest.raises(CompeftError, match=f"no nonzeros has {bits} gap bits"):
            CompressedTensor.from_bytes(_empty_stream(1000, gaps, bits))


def test_read_only_and_aliased_outputs_are_value_errors():
    """Every function that writes into caller's arrays refuses a read-only one and one passed
    twice (or overlapping another output) with a ValueError, not a PanicException."""
    from compeft_rs import _core

    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    s = _core.encode(x, "float32", [100], 0.3, 1.0, "golomb")

    def read_only(n, dtype=np.float32):
        a = np.zeros(n, dtype)
        a.setflags(write=False)
        return a

    with pytest.raises(ValueError, match="output array is read-only"):
        s.decode_into(read_only(100), "float32")
    with pytest.raises(ValueError, match="tensor 'b' is read-only"):
        _core.decode_streams([s, s], ["a", "b"], [np.zeros(100, np.float32), read_only(100)], ["float32"] * 2)
    out = np.zeros(100, np.float32)
    with pytest.raises(ValueError, match="tensor 'b' shares memory"):
        _core.decode_streams([s, s], ["a", "b"], [out, out], ["float32"] * 2)
    big = np.zeros(150, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _core.decode_streams([s, s], ["a", "b"], [big[:100], big[50:]], ["float32"] * 2)
    f = _core.ExpertFile.build([], [("0", "F32", [4], np.arange(16, dtype=np.uint8))], {})
    with pytest.raises(ValueError, match="output array is read-only"):
        f.read_raw("0", read_only(16, np.uint8))
    args = ("ties", "total", "peft", None, 1.0)
    with pytest.raises(ValueError, match="tensor 'w' is read-only"):
        _core.merge_streams([[s, s]], ["w"], [1.0, 1.0], [read_only(100)], *args)
    with pytest.raises(ValueError, match="tensor 'w2' shares memory"):
        _core.merge_streams([[s, s], [s, s]], ["w", "w2"], [1.0, 1.0], [out, out], *args)
    # Separate writeable outputs work, and the ones refused above were left as they were.
    _core.decode_streams([s, s], ["a", "b"], [big[:100], np.zeros(100, np.float32)], ["float32"] * 2)
    assert np.array_equal(big[:100], compeft_rs.decode(s.to_bytes()).numpy())
    assert not out.any()
    raw = np.zeros(16, np.uint8)
    f.read_raw("0", raw)
    assert raw.tolist() == list(range(16))


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

