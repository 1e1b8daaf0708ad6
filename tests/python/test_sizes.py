"""Stream sizes against the expected Rice length and the entropy bound (DESIGN.md section 2)."""

import numpy as np
import pytest

import compeft_rs
from reference import entropy_bits, expected_rice_bits, rice_b


@pytest.fixture(scope="module")
def tau():
    return np.random.default_rng(1234).standard_normal(1_000_000).astype(np.float16)


def overhead_bits(c):
    # Header (< 40 bytes), checksum and the block index (< 8 bytes per block of 4096 nonzeros).
    return 8 * (40 + 8 * (c.nnz // 4096 + 1))


@pytest.mark.parametrize("k", [0.05, 0.1, 0.2])
def test_golomb_size(tau, k):
    c = compeft_rs.encode(tau, k)
    d = tau.size
    assert c.nnz == round(k * d)
    assert c.rice_param == rice_b(c.nnz, d)
    bits = 8 * c.nbytes
    expected = expected_rice_bits(c.nnz, d)
    assert bits <= 1.02 * expected + overhead_bits(c)
    assert bits >= 0.98 * expected
    assert bits <= 1.03 * entropy_bits(d, k) + overhead_bits(c)
    # The package's own figures agree with the reference formulas.
    assert compeft_rs.expected_golomb_bits(c.nnz, d) == pytest.approx(expected, rel=1e-12)
    assert compeft_rs.entropy_bound_bits(d, k) == pytest.approx(entropy_bits(d, k), rel=1e-12)


def test_entropy_bound_values_from_design():
    assert compeft_rs.entropy_bound_bits(1, 0.1) == pytest.approx(0.569, abs=5e-4)
    assert compeft_rs.entropy_bound_bits(1, 0.05) == pytest.approx(0.336, abs=5e-4)


@pytest.mark.parametrize("k", [0.05, 0.2])
def test_bitmask_size(tau, k):
    c = compeft_rs.encode(tau, k, encoding="bitmask")
    assert 2 * tau.size <= 8 * c.nbytes <= 2 * tau.size + 8 * 40


def test_ratio_against_fp16(tau):
    c = compeft_rs.encode(tau, 0.1)
    assert tau.nbytes / c.nbytes > 25  # 16 bits against about 0.58
