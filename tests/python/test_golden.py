"""The golden files written by the Rust tests, read and rebuilt from Python.

The inputs are regenerated here independently (splitmix64 in plain Python), so a change in the
encoder's bytes, or in how Python hands data to it, fails this test.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import compeft_rs
from reference import pattern_of, read_row_coded, reference_sigma, reference_signs

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
M64 = (1 << 64) - 1


def gaussian_like(n, seed):
    s = seed
    out = []
    for _ in range(n):
        total = 0.0
        for _ in range(4):
            s = (s + 0x9E3779B97F4A7C15) & M64
            z = s
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            z ^= z >> 31
            total += (z >> 11) / float(1 << 53)
        out.append(total - 2.0)
    return np.array(out, dtype=np.float64)


def cases():
    f32 = gaussian_like(64 * 48, 7).astype(np.float32).reshape(64, 48)
    big = gaussian_like(50_000, 11).astype(np.float32)
    h = np.array([((i * 13 % 37) - 18.0) / 8.0 for i in range(37)], dtype=np.float16)
    b = torch.tensor([((i % 5) - 2.0) * 0.5 for i in range(40)], dtype=torch.bfloat16).reshape(4, 10)
    d = np.array([(i - 4.5) * 1e-3 for i in range(10)], dtype=np.float64).reshape(2, 5)
    rows = gaussian_like(40 * 64, 5).astype(np.float32).reshape(40, 64)
    rows[np.arange(40) % 3 != 0] = 0.0
    rows2 = gaussian_like(300 * 128, 9).astype(np.float32).reshape(300, 128)
    r = np.arange(300)
    rows2[(r % 3 != 0) | (r == 0)] = 0.0
    return [
        ("f32_300x128_k0.2_rows", rows2, 0.2, 1.0, "golomb"),
        ("f32_40x64_k0.1_rows", rows, 0.1, 1.0, "golomb"),
        ("f32_64x48_k0.1_golomb", f32, 0.1, 1.0, "golomb"),
        ("f32_64x48_k0.1_bitmask", f32, 0.1, 1.0, "bitmask"),
        ("f32_50000_k0.2_golomb", big, 0.2, 2.5, "golomb"),
        ("f16_37_k0.3_golomb", h, 0.3, 1.0, "golomb"),
        ("bf16_4x10_k0.5_golomb", b, 0.5, 1.0, "golomb"),
        ("f64_2x5_k1_bitmask", d, 1.0, 1.0, "bitmask"),
        ("f32_0x3_golomb", np.zeros((0, 3), np.float32), 0.1, 1.0, "golomb"),
    ]


@pytest.mark.parametrize("name,x,k,alpha,enc", cases(), ids=[c[0] for c in cases()])
def test_golden(name, x, k, alpha, enc):
    data = (GOLDEN / f"{name}.cpft").read_bytes()
    c = compeft_rs.CompressedTensor.from_bytes(data, framework="np")
    values = (x.to(torch.float64).numpy() if isinstance(x, torch.Tensor) else x.astype(np.float64)).reshape(-1)
    assert c.shape == tuple(x.shape)
    assert c.encoding == enc
    assert np.array_equal(pattern_of(c), reference_signs(values, k))
    assert c.scale == pytest.approx(alpha * reference_sigma(values), rel=1e-12, abs=0.0)
    # Encoding the same input from Python gives the same bytes.
    assert compeft_rs.encode(x, k, alpha, encoding=enc).to_bytes() == data
    # The row-coded layout (encoding byte 2) where it is smaller, with rows of the last dimension.
    assert data[5] == (2 if name.endswith("_rows") else {"golomb": 0, "bitmask": 1}[enc])
    assert c.row_length == (x.shape[-1] if name.endswith("_rows") else None)
    if name.endswith("_rows"):
        # The spec's reader (which also recomputes the block index) gives the reference pattern.
        assert np.array_equal(read_row_coded(data)[0], reference_signs(values, k))


def test_header_fields():
    data = (GOLDEN / "f32_64x48_k0.1_golomb.cpft").read_bytes()
    assert data[:4] == b"CPFT" and data[4] == compeft_rs.FORMAT_VERSION == 1
    assert data[5] == 0 and data[6] == 3 and data[7] == 2  # golomb, float32, 2 dims
