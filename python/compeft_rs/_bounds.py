"""Size bounds of a compressed tensor's ternary pattern: the i.i.d. entropy bound (Rust's
``entropy_bound_bits``) and an adaptive one that sees where the kept entries are."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["adaptive_bound_bits", "kt_bits"]

_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)

# Entries unpacked at a time (one byte each) by adaptive_bound_bits.
_CHUNK = 1 << 22


def kt_bits(n: Any, c: Any) -> np.ndarray:
    """Code length in bits of ``c`` ones among ``n`` binary symbols under the Krichevsky-Trofimov
    estimator (an adaptive code with no side information; the order of the symbols does not
    matter): ``-log2(G(c + 1/2) G(n - c + 1/2) / (pi G(n + 1)))``. Element-wise."""
    n = np.asarray(n, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    lg = np.asarray(_LGAMMA(c + 0.5) + _LGAMMA(n - c + 0.5) - _LGAMMA(n + 1.0), dtype=np.float64) - math.log(math.pi)
    return -lg / math.log(2.0)


def adaptive_bound_bits(tensor: Any) -> float:
    """The adaptive size bound of a compressed tensor's pattern, in bits: the better of coding each
    row's mask and coding each column's mask with its own Krichevsky-Trofimov code (the tensor
    seen as ``shape[0]`` rows of the remaining entries; one row for a vector), plus one sign bit per
    kept entry. Where kept entries crowd into some rows (untouched embedding rows of a full
    fine-tune), it is below the i.i.d. bound :func:`compeft_rs.entropy_bound_bits`; on an i.i.d.
    mask it is above it by about half a log2 of the row length per row. Needs the pattern, not just
    its density: it reads the bitmasks, unpacking at most 2^22 entries at a time."""
    from ._tensor import CompressedTensor

    if not isinstance(tensor, CompressedTensor):
        raise TypeError(f"adaptive_bound_bits takes a CompressedTensor, got {type(tensor).__name__}")
    shape: Sequence[int] = tuple(tensor.shape)
    numel = int(tensor.numel)
    if numel == 0:
        return 0.0
    rows = int(shape[0]) if len(shape) >= 2 else 1
    cols = numel // rows
    pos, neg = tensor._stream.masks()
    packed = (pos | neg).view(np.uint8)
    row_counts = np.empty(rows, dtype=np.int64)
    col_counts = np.zeros(cols, dtype=np.int64)
    # Rows a slice at a time, so that one byte per entry is needed for at most _CHUNK entries.
    step = max(1, _CHUNK // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lo, hi = r0 * cols, r1 * cols
        bits = np.unpackbits(packed[lo // 8:(hi + 7) // 8], bitorder="little")
        kept = bits[lo % 8:lo % 8 + (hi - lo)].reshape(r1 - r0, cols)
        row_counts[r0:r1] = kept.sum(axis=1, dtype=np.int64)
        col_counts += kept.sum(axis=0, dtype=np.int64)
    per_row = kt_bits(cols, row_counts).sum()
    per_col = kt_bits(rows, col_counts).sum()
    return float(min(per_row, per_col) + int(tensor.nnz))
