"""The adaptive size bound (per-row / per-column Krichevsky-Trofimov codes of the mask plus a sign
bit per kept entry) against a plain loop over the decoded pattern."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import compeft_rs
from compeft_rs._bounds import kt_bits


def kt_reference(n, c):
    """KT code length of c ones in n symbols, one factor at a time: the sequential estimator's
    probabilities (c_i + 1/2) / (i + 1) multiplied over a sequence with the ones first."""
    bits, ones = 0.0, 0
    for i in range(n):
        one = i < c
        p1 = (ones + 0.5) / (i + 1)
        bits -= math.log2(p1 if one else 1.0 - p1)
        ones += one
    return bits


@pytest.mark.parametrize("n,c,want", [(1, 1, 1.0), (1, 0, 1.0), (2, 1, 3.0), (2, 2, -math.log2(3 / 8))])
def test_kt_known_values(n, c, want):
    assert kt_bits(n, c) == pytest.approx(want, rel=1e-12)


@given(n=st.integers(0, 60), frac=st.floats(0, 1))
def test_kt_matches_the_sequential_estimator(n, frac):
    c = int(round(frac * n))
    assert float(kt_bits(n, c)) == pytest.approx(kt_reference(n, c), rel=1e-9, abs=1e-9)


@given(rows=st.integers(1, 12), cols=st.integers(1, 70), k=st.sampled_from([0.02, 0.1, 0.5, 1.0]),
       skew=st.integers(0, 11), vector=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_adaptive_bound_is_the_better_of_rows_and_columns(rows, cols, k, skew, vector, seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, cols))
    x[:skew] *= 1e-3  # rows the top-k rarely reaches, as untouched embedding rows
    if vector:
        x = x.reshape(-1)
    c = compeft_rs.encode(x, k)
    kept = compeft_rs.decode(c, framework="np") != 0
    m = kept.reshape(rows if not vector else 1, -1)
    by_row = sum(kt_reference(m.shape[1], int(r.sum())) for r in m)
    by_col = sum(kt_reference(m.shape[0], int(col.sum())) for col in m.T)
    want = min(by_row, by_col) + int(kept.sum())
    assert compeft_rs.adaptive_bound_bits(c) == pytest.approx(want, rel=1e-9)


def test_skewed_rows_fall_below_the_iid_bound_and_summary_shows_both():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=g)
    x[:300] *= 1e-3  # three quarters of the rows untouched
    c = compeft_rs.encode(x, 0.1)
    iid = compeft_rs.entropy_bound_bits(c.numel, c.density)
    assert compeft_rs.adaptive_bound_bits(c) < 0.85 * iid
    s = compeft_rs.compress_expert({"w": x}, 0.1).summary()
    assert 0 < s.adaptive_bound_bytes < s.entropy_bound_bytes
    assert "adaptive" in str(s)
    # Coded by rows, the stream itself goes below the i.i.d. bound (plain Rice cannot).
    assert c.row_length == 64 and 8 * c.nbytes < iid
    assert s.rows[0]["coding"] == "rows" and " rows " in str(s)


def test_adaptive_bound_wants_a_compressed_tensor():
    with pytest.raises(TypeError, match="CompressedTensor"):
        compeft_rs.adaptive_bound_bits(np.zeros(4))


def test_rows_are_counted_a_slice_at_a_time(monkeypatch):
    """Slices of rows that start inside a byte give the counts of the whole pattern."""
    import compeft_rs._bounds as b

    x = np.random.default_rng(1).standard_normal((37, 13))
    c = compeft_rs.encode(x, 0.3)
    whole = compeft_rs.adaptive_bound_bits(c)
    monkeypatch.setattr(b, "_CHUNK", 29)  # two rows (26 entries) per slice, starts off byte edges
    assert compeft_rs.adaptive_bound_bits(c) == pytest.approx(whole, rel=1e-12)
