"""A plain numpy statement of ComPEFT (DESIGN.md section 1), independent of the Rust code."""

import math

import numpy as np


def target_count(k, d):
    if d == 0:
        return 0
    return min(max(math.floor(k * d + 0.5), 1), d)


def reference_signs(values, k):
    """Signs (-1, 0, 1) of the kept entries of the flat float64 array `values`."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    d = v.size
    n = target_count(k, d)
    # Sort by magnitude descending, then by index ascending (ties to the lower index).
    order = np.lexsort((np.arange(d), -np.abs(v)))[:n]
    signs = np.zeros(d, dtype=np.int8)
    signs[order] = np.sign(v[order]).astype(np.int8)
    return signs


def reference_sigma(values):
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return 0.0
    if v.size == 1:
        return float(abs(v[0]))
    return float(np.std(v, ddof=1))


def pattern_of(compressed):
    """The ternary pattern of a CompressedTensor read from its bitmasks (independent of scale)."""
    pos, neg = compressed.masks()
    d = compressed.numel
    p = np.unpackbits(pos.view(np.uint8), bitorder="little")[:d].astype(np.int8)
    n = np.unpackbits(neg.view(np.uint8), bitorder="little")[:d].astype(np.int8)
    return p - n


def entropy_bits(d, k):
    return d * (-(1 - k) * math.log2(1 - k) - k * math.log2(k / 2))


def rice_b(nnz, d):
    """b* = 1 + floor(log2(ln(phi - 1) / ln(1 - p))) in 50-digit decimal arithmetic, clamped to
    0..63 (0 when nothing or everything is kept)."""
    from decimal import Decimal, localcontext

    if nnz == 0 or nnz >= d:
        return 0
    with localcontext() as ctx:
        ctx.prec = 50
        phi = (1 + Decimal(5).sqrt()) / 2
        r = (phi - 1).ln() / (1 - Decimal(nnz) / Decimal(d)).ln()
        if r < 1:
            return 0
        e = 0
        while Decimal(2) ** (e + 1) <= r:
            e += 1
        return min(63, 1 + e)


def expected_rice_bits(nnz, d):
    """Expected gap-code plus sign bits for nnz independent positions among d."""
    p = nnz / d
    b = rice_b(nnz, d)
    return nnz * (b + 1 / (1 - (1 - p) ** (2 ** b)) + 1)
