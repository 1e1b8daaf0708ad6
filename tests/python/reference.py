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


class _Bits:
    """LSB-first reader over a byte string, as docs/FORMAT.md defines bit strings."""

    def __init__(self, data):
        self.bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        self.at = 0

    def bit(self):
        b = int(self.bits[self.at])
        self.at += 1
        return b

    def rice(self, b):
        q = 0
        while self.bit() == 0:
            q += 1
        low = sum(self.bit() << i for i in range(b))
        return (q << b) | low


def read_row_coded(data):
    """The ternary pattern (flat int8) of a row-coded golomb stream (encoding 2), read from its
    bytes by the letter of docs/FORMAT.md, independently of the Rust reader. Also returns the
    row length and the row counts."""
    pos = 4

    def byte():
        nonlocal pos
        pos += 1
        return data[pos - 1]

    def varint():
        v, shift = 0, 0
        while True:
            b = byte()
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v

    assert byte() == 1, "version"
    assert byte() == 2, "encoding: golomb by rows"
    byte()  # dtype
    shape = [varint() for _ in range(byte())]
    numel, nnz = varint(), varint()
    assert numel == int(np.prod(shape, dtype=np.int64))
    pos += 8  # scale
    cols, count_b, block_log2 = varint(), byte(), byte()
    count_bits, gap_bits, index_len = varint(), varint(), varint()
    index = [(varint(), varint()) for _ in range(index_len)]
    counts_end = pos + (count_bits + 7) // 8
    gaps_end = counts_end + (gap_bits + 7) // 8
    counts_r, gaps_r = _Bits(data[pos:counts_end]), _Bits(data[counts_end:gaps_end])
    signs = np.unpackbits(np.frombuffer(data[gaps_end:gaps_end + (nnz + 7) // 8], np.uint8), bitorder="little")
    assert len(data) == gaps_end + (nnz + 7) // 8 + 4, "the crc follows the signs"
    out = np.zeros(numel, np.int8)
    counts = []
    starts = []  # (bit, next) of every block's first code, block 0 included
    j = 0
    for row in range(numel // cols):
        n = counts_r.rice(count_b) + 1 if counts_r.bit() else 0
        counts.append(n)
        nxt = row * cols
        b = rice_b(n, cols)
        for _ in range(n):
            if j % (1 << block_log2) == 0:
                starts.append((gaps_r.at, nxt))
            p = nxt + gaps_r.rice(b)
            assert nxt <= p < (row + 1) * cols
            out[p] = -1 if signs[j] else 1
            j += 1
            nxt = p + 1
    assert counts_r.at == count_bits and gaps_r.at == gap_bits and j == nnz
    # The index: blocks 1.. as differences, the first from block 0's start (bit 0, the first
    # non-empty row's start).
    want = [(s[0] - p[0], s[1] - p[1]) for p, s in zip(starts, starts[1:])]
    assert index == want, (index[:3], want[:3])
    return out, cols, np.array(counts)
