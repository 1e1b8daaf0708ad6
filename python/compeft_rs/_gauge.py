"""The gauge of LoRA pairs: which of the many factorisations of one adapter is compressed.

A LoRA pair applies the product B A (B: d_out x r, A: r x d_in), and B A = (B G)(G^-1 A) for
any invertible r x r G: the factors are fixed only up to that choice (the gauge). Training leaves
them in an arbitrary one (A still carries its random initialisation, B is small), and
sign-compressing each factor on its own depends on it. The balanced gauge is the one of the SVD
of the product, B A = U S V^T: B' = U S^1/2, A' = S^1/2 V^T, so that A' A'^T = B'^T B' = S.

It is computed from r x r matrices, never the d_out x d_in product. Where both factors are
well-conditioned (every LoRA pair of a trained adapter we have seen), from their r x r Grams:
Rust computes B^T B and A A^T of all pairs in one parallel pass (``_core.gauge_grams``), numpy
their eigen-decompositions and one r x r SVD per pair, batched (``_transforms``), and Rust
applies the two r x r transforms, B' = B T_B and A' = T_A A, writing each factor's dtype
(``_core.gauge_apply``). The Grams of float16, bfloat16 and float32 factors are summed in f32
(see rust/src/pair.rs), so the factors come out balanced to about 1e-6 rather than to float64
rounding; the product B'A' does not depend on it (T_B T_A = I whatever the Grams' rounding).
Other pairs (rank-deficient or ill-conditioned ones, factors on a GPU, fewer rows than the rank)
go one by one in float64 on the CPU (``_balanced64``): the same Gram form where the float64
Grams are well-conditioned, else QR of B = Q_B R_B and of A^T = Q_A R_A, the SVD of the small
R_B R_A^T = U' S V'^T, then B' = Q_B U' S^1/2 and A' = S^1/2 V'^T Q_A^T; cast back to each
factor's dtype and device.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._arrays import empty_output, flat_input, float64_of, is_torch_tensor
from ._core import gauge_apply as _gauge_apply
from ._core import gauge_grams as _gauge_grams
from ._scale import lora_pairs

__all__ = ["GAUGES", "check_gauge", "balance_pair", "balance_pairs", "balance"]

GAUGES = ("as_trained", "balanced")


def check_gauge(gauge: Any) -> str:
    """``gauge`` if it is one of :data:`GAUGES`, else ValueError naming the choices."""
    if gauge not in GAUGES:
        raise ValueError(
            f"gauge must be one of {', '.join(repr(g) for g in GAUGES)}, got {gauge!r}: \"as_trained\" "
            "compresses the LoRA factors as given, \"balanced\" first rewrites each pair as "
            "B' = U S^1/2, A' = S^1/2 V^T from the SVD of B A (the same adapter)"
        )
    return str(gauge)


def _like(x: np.ndarray, ref: Any) -> Any:
    """``x`` in the array type, dtype and device of ``ref``."""
    if isinstance(ref, np.ndarray):
        with np.errstate(over="ignore"):  # an overflow shows as inf, which balance_pair checks
            return x.astype(ref.dtype)
    import torch

    # float16/32/64 cast by numpy (off torch's thread pool, see float64_of); bfloat16 by torch.
    like = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}.get(ref.dtype)
    if like is not None:
        with np.errstate(over="ignore"):
            x = x.astype(like)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=ref.device, dtype=ref.dtype)


# The Gram path is taken when each factor's Gram has its eigenvalues within this ratio (the
# factor's singular values within 100x): it squares the conditioning, so B'A' stays within about
# 1e-12 of BA (before the cast to the factors' dtype); other pairs (rank-deficient ones
# included) take the QR path.
_GRAM_RATIO = 1e-4


def _balanced_from_grams(a: np.ndarray, b: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`_balanced64` from the r x r Grams, or None where they are too ill-conditioned.

    B^T B = V_B L_B V_B^T gives B = Q_B R_B with R_B = L_B^1/2 V_B^T (likewise A^T = Q_A R_A),
    so B' = Q_B U S^1/2 = B (V_B L_B^-1/2 U S^1/2) and A' = (S^1/2 W^T L_A^-1/2 V_A^T) A, where
    R_B R_A^T = U S W^T: the factors only meet r x r matrices (a QR of a 4096 x 16 factor costs
    about 20 times its Gram)."""
    (m, r), n = b.shape, a.shape[1]
    if m < r or n < r:
        return None
    lb, vb = np.linalg.eigh(b.T @ b)
    la, va = np.linalg.eigh(a @ a.T)
    if not (lb[0] > _GRAM_RATIO * lb[-1] and la[0] > _GRAM_RATIO * la[-1]):
        return None
    u, s, wt = np.linalg.svd((np.sqrt(lb)[:, None] * vb.T) @ (va * np.sqrt(la)), full_matrices=False)
    root = np.sqrt(s)
    tb = (vb / np.sqrt(lb)) @ (u * root)
    ta = (root[:, None] * wt) @ (va / np.sqrt(la)).T
    return ta @ a, b @ tb, s


def _balanced64(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A', B', S) of the balanced gauge in float64, A' and B' of the shapes of ``a``, ``b``."""
    fast = _balanced_from_grams(a, b)
    if fast is not None:
        return fast
    r = a.shape[0]
    qb, rb = np.linalg.qr(b)        # m x p, p x r (p = min(m, r))
    qa, ra = np.linalg.qr(a.T)      # n x q, q x r (q = min(n, r))
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    root = np.sqrt(s)
    b2 = np.zeros_like(b)
    a2 = np.zeros_like(a)
    # With m or n below r the product has fewer than r singular values: the rest of the rank
    # is zero columns of B' and zero rows of A'.
    b2[:, :s.size] = qb @ (u * root)
    a2[:s.size, :] = (root[:, None] * vt) @ qa.T
    return a2, b2, np.pad(s, (0, r - s.size))


def balance_pair(A: Any, B: Any) -> Tuple[Any, Any]:
    """One LoRA pair in the balanced gauge: ``(A', B')`` with B' A' = B A (to the rounding of the
    factors' own dtype) and A' A'^T = B'^T B' = diag(S), S the singular values of B A.

    ``A`` is r x d_in and ``B`` d_out x r, torch tensors or numpy arrays; the result has their
    shapes, types, dtypes and devices. Returned unchanged: factors that are not a 2-D pair of
    one rank (conv LoRA, a rank mismatch), a pair whose product is zero (a freshly initialised
    LoRA, B = 0), one with a non-finite entry, and one whose balanced factors would overflow
    their dtype. Many pairs at once: :func:`balance_pairs`.
    """
    return balance_pairs([(A, B)])[0]


def _is_pair(A: Any, B: Any) -> bool:
    return len(A.shape) == 2 and len(B.shape) == 2 and A.shape[0] == B.shape[1] and 0 not in (*A.shape, *B.shape)


def _on_cpu(x: Any) -> bool:
    return not is_torch_tensor(x) or x.device.type == "cpu"


def balance_pairs(pairs: Sequence[Tuple[Any, Any]]) -> List[Tuple[Any, Any]]:
    """:func:`balance_pair` of each ``(A, B)`` in ``pairs``: the well-conditioned CPU pairs
    through Rust and numpy in three batched calls, the others one by one in float64."""
    out: List[Tuple[Any, Any]] = list(pairs)
    fast = [i for i, (A, B) in enumerate(pairs)
            if _is_pair(A, B) and _on_cpu(A) and _on_cpu(B) and min(B.shape[0], A.shape[1]) >= A.shape[0]]
    fast_set = set(fast)
    slow = [i for i in range(len(pairs)) if i not in fast_set]
    if fast:
        flats = [(flat_input(pairs[i][0]), flat_input(pairs[i][1])) for i in fast]
        items = [(fa[0], fa[1], (fa[2][0], fa[2][1]), fb[0], fb[1], (fb[2][0], fb[2][1])) for fa, fb in flats]
        names = [str(i) for i in fast]  # errors read "pair '3': ..."
        grams = _gauge_grams(items, names)
        ranks = [pairs[i][0].shape[0] for i in fast]
        starts = np.concatenate([[0], np.cumsum([2 * r * r for r in ranks])])
        transforms: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        for r in sorted(set(ranks)):
            at = [j for j, rj in enumerate(ranks) if rj == r]
            block = np.stack([grams[starts[j]:starts[j + 1]].reshape(2, r, r) for j in at])
            for j, t in zip(at, _transforms(block[:, 0], block[:, 1])):
                if t is None:
                    slow.append(fast[j])
                else:
                    transforms[j] = t
        done = sorted(transforms)
        if done:
            # Outputs of each factor's kind ("torch" or "numpy", as flat_input read it), dtype and shape.
            outs = [tuple(empty_output(f[3], f[1], f[2]) for f in flats[j]) for j in done]
            flat_t = np.concatenate([np.concatenate([transforms[j][0].ravel(), transforms[j][1].ravel()])
                                     for j in done])
            ok = _gauge_apply([items[j] for j in done], flat_t, [(oa[1], ob[1]) for oa, ob in outs],
                              [names[j] for j in done])
            for j, (oa, ob), fine in zip(done, outs, ok):
                if fine:  # else: balanced factors beyond the dtype's range, the pair stays as it was
                    out[fast[j]] = (oa[0], ob[0])
    for i in slow:
        out[i] = _balance_pair64(*pairs[i])
    return out


def _transforms(ga: np.ndarray, gb: np.ndarray) -> List[Optional[Tuple[np.ndarray, np.ndarray]]]:
    """(T_A, T_B) of each pair from its Grams A A^T (``ga``, P x r x r) and B^T B (``gb``), or
    None where they are not finite or too ill-conditioned (see :func:`_balanced_from_grams`,
    of which this is the batched form)."""
    finite = np.isfinite(ga).all(axis=(1, 2)) & np.isfinite(gb).all(axis=(1, 2))
    ga, gb = np.where(finite[:, None, None], ga, 0.0), np.where(finite[:, None, None], gb, 0.0)
    la, va = np.linalg.eigh(ga)
    lb, vb = np.linalg.eigh(gb)
    good = finite & (lb[:, 0] > _GRAM_RATIO * lb[:, -1]) & (la[:, 0] > _GRAM_RATIO * la[:, -1])
    res: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * len(good)
    if not good.any():
        return res
    la, va, lb, vb = la[good], va[good], lb[good], vb[good]
    sa, sb = np.sqrt(la), np.sqrt(lb)
    u, s, wt = np.linalg.svd((sb[:, :, None] * vb.transpose(0, 2, 1)) @ (va * sa[:, None, :]))
    root = np.sqrt(s)
    tb = (vb / sb[:, None, :]) @ (u * root[:, None, :])
    ta = (root[:, :, None] * wt) @ (va / sa[:, None, :]).transpose(0, 2, 1)
    for j, i in enumerate(np.flatnonzero(good)):
        res[i] = (ta[j], tb[j])
    return res


def _balance_pair64(A: Any, B: Any) -> Tuple[Any, Any]:
    """:func:`balance_pair` in float64 on the CPU, one pair (the path of the pairs that
    :func:`balance_pairs` does not batch)."""
    if not _is_pair(A, B):
        return A, B
    a, b = float64_of(A), float64_of(B)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return A, B
    a2, b2, s = _balanced64(a, b)
    if not s[0] > 0:
        return A, B  # B A = 0: there is no product to balance
    # Overflow shows in float64 already: the cast to the factor's dtype keeps inf, and float64
    # values beyond that dtype's range become inf there (checked on the cast values, where they
    # are, with no copy back to the host).
    A2, B2 = _like(a2, A), _like(b2, B)
    if not (_all_finite(A2) and _all_finite(B2)):
        return A, B
    return A2, B2


def _all_finite(x: Any) -> bool:
    """Whether every value of a factor (numpy array or torch tensor, as :func:`_like` returns
    it) is finite; CPU tensors are checked by numpy (see ``_arrays.float64_of``), half types by
    their exponent bits."""
    if isinstance(x, np.ndarray):
        return bool(np.isfinite(x).all())
    import torch

    if x.device.type != "cpu":
        return bool(torch.isfinite(x).all())
    arr, name, _, _, _ = flat_input(x)
    if name in _HALF_EXPONENT:
        return not bool(((arr & _HALF_EXPONENT[name]) == _HALF_EXPONENT[name]).any())
    return bool(np.isfinite(arr).all())


# The exponent bits of float16 and bfloat16: all set is inf or NaN.
_HALF_EXPONENT = {"float16": np.uint16(0x7C00), "bfloat16": np.uint16(0x7F80)}


def balance(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``state_dict`` with every LoRA pair in the balanced gauge (see
    :func:`balance_pair`); pairs are found by name as ``compeft_rs._scale.lora_pairs`` finds them
    (``lora_A``/``lora_B``, ``lora_embedding_A``/``lora_embedding_B``). Every other tensor is
    passed through as it is. The adapter (each product B A) is unchanged.

    >>> import torch
    >>> sd = {"q.lora_A.weight": torch.randn(4, 32, dtype=torch.float64),
    ...       "q.lora_B.weight": torch.randn(16, 4, dtype=torch.float64)}
    >>> out = balance(sd)
    >>> a, b = out["q.lora_A.weight"], out["q.lora_B.weight"]
    >>> torch.allclose(b @ a, sd["q.lora_B.weight"] @ sd["q.lora_A.weight"])
    True
    >>> torch.allclose(a @ a.T, b.T @ b)
    True
    """
    out = dict(state_dict)
    pairs = lora_pairs(list(state_dict))
    for (na, nb), ab in zip(pairs, balance_pairs([(state_dict[na], state_dict[nb]) for na, nb in pairs])):
        out[na], out[nb] = ab
    return out
