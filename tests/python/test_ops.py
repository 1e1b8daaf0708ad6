"""Popcount ops against dense torch, and conversions between the encodings."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_rs


def dense64(c):
    return c.decode(dtype=torch.float64).reshape(-1)


@given(
    n=st.integers(0, 3000),
    ka=st.floats(0.001, 1.0),
    kb=st.floats(0.001, 1.0),
    enc_a=st.sampled_from(["golomb", "bitmask"]),
    enc_b=st.sampled_from(["golomb", "bitmask"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ops_equal_dense(n, ka, kb, enc_a, enc_b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    y = 0.5 * x + torch.randn(n, generator=g)  # correlated, so dot and cosine are not ~0
    a = compeft_rs.encode(x, ka, encoding=enc_a)
    b = compeft_rs.encode(y, kb, 2.0, encoding=enc_b)
    da, db = dense64(a), dense64(b)
    assert compeft_rs.dot(a, b) == pytest.approx(torch.dot(da, db).item(), rel=1e-12, abs=1e-12)
    assert compeft_rs.hamming(a, b) == int((torch.sign(da) != torch.sign(db)).sum())
    na, nb = da.norm().item(), db.norm().item()
    want = torch.dot(da, db).item() / (na * nb) if na > 0 and nb > 0 else 0.0
    assert compeft_rs.cosine(a, b) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert compeft_rs.cosine(a, a) == pytest.approx(1.0 if na > 0 else 0.0)


def test_cosine_against_torch_functional():
    x, y = torch.randn(100_000, dtype=torch.float16), torch.randn(100_000, dtype=torch.float16)
    a, b = compeft_rs.encode(x, 0.1), compeft_rs.encode(x + y, 0.1)
    want = torch.nn.functional.cosine_similarity(dense64(a), dense64(b), dim=0).item()
    assert compeft_rs.cosine(a, b) == pytest.approx(want, rel=1e-9)


def test_shape_mismatch_and_types():
    a = compeft_rs.encode(np.ones((4, 4), np.float32), 0.5)
    b = compeft_rs.encode(np.ones(16, np.float32), 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        compeft_rs.dot(a, b)
    with pytest.raises(TypeError):
        compeft_rs.cosine(a, np.ones(16))


@given(n=st.integers(0, 20_000), k=st.floats(0.0005, 1.0), seed=st.integers(0, 1000))
def test_conversions_round_trip(n, k, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = compeft_rs.encode(x, k)
    m = g.to_bitmask()
    assert m.encoding == "bitmask" and g.to_golomb() == g
    assert m == compeft_rs.encode(x, k, encoding="bitmask")
    assert m.to_golomb().to_bytes() == g.to_bytes()
    assert torch.equal(m.decode(), g.decode())
    assert 8 * m.nbytes >= 2 * n


def test_masks_layout():
    x = np.array([0.0, 3.0, -3.0, 0.1] + [0.0] * 70, np.float32)
    pos, neg = compeft_rs.encode(x, 2 / 74).masks()
    assert pos.dtype == np.uint64 and pos.shape == (2,)
    assert int(pos[0]) == 0b10 and int(neg[0]) == 0b100 and int(pos[1]) == int(neg[1]) == 0
