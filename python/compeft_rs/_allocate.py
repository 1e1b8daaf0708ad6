"""Per-tensor densities under a byte budget (``allocate="error"``).

One k for every tensor spends bits evenly where the error is not even. ``allocate="error"``
keeps the expert's size (the stream bytes the uniform density k gives) and moves density to the
tensors where it buys the most: data-free, it minimises the summed squared error of what the
model applies,

- for a LoRA pair, the update ``scaling * B @ A`` (both factors at one density; the error of the
  product through r x r Gram matrices, never the d_out x d_in product),
- for any other compressed tensor (a fine-tune's residual, an (IA)3 vector), the tensor itself,

over a grid of densities around k (k * 2^(j/2), j = -4..4, at most 1). Each unit's bytes and
error at each density are measured on the real streams (compressed with the expert's scale rule
and alpha), a Lagrange multiplier is searched so that the chosen densities fit the budget, and
the uniform choice is kept when it has the smaller total error.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ._lora import expert_scalings, lora_factor
from ._scale import _matrix as _scale_matrix
from ._scale import lora_pairs
from ._tensor import CompressedTensor

__all__ = ["ALLOCATIONS", "check_allocate", "density_grid", "choose", "pick_densities"]

ALLOCATIONS = ("uniform", "error")

# The grid of densities tried around k: k * 2^(j/2) for these j.
_STEPS = tuple(range(-4, 5))


def check_allocate(allocate: Any, scope: str = "per_tensor", encoding: str = "golomb") -> str:
    """``allocate`` if it is one of :data:`ALLOCATIONS` and fits ``scope`` and ``encoding``, else
    ValueError saying what to pass."""
    if allocate not in ALLOCATIONS:
        raise ValueError(
            f"allocate must be one of {', '.join(repr(a) for a in ALLOCATIONS)}, got {allocate!r}: "
            "\"uniform\" gives every tensor density k, \"error\" chooses each tensor's density to "
            "minimise the error of what the model applies within the bytes of the uniform choice"
        )
    if allocate != "uniform" and scope != "per_tensor":
        raise ValueError(f"allocate={allocate!r} chooses a density per tensor, so it needs scope=\"per_tensor\" "
                         f"(scope={scope!r} keeps one threshold over all tensors)")
    if allocate != "uniform" and encoding != "golomb":
        raise ValueError(f"allocate={allocate!r} spends a byte budget, so it needs encoding=\"golomb\": a "
                         f"{encoding} stream's size does not depend on its density (convert after compressing)")
    return str(allocate)


def density_grid(k: float) -> List[float]:
    """The densities tried for a requested k, ascending, k among them, none above 1."""
    return sorted({min(1.0, k * 2.0 ** (j / 2)) for j in _STEPS} | {k})


def _matrix(t: Any) -> Any:
    """A factor as the matrix peft multiplies, float64 (the pair scale rule's shape)."""
    return t.reshape(_scale_matrix(tuple(t.shape))).double()


def _pair_error(a: Any, b: Any, a_hat: Any, b_hat: Any) -> float:
    """||B~A~ - BA||_F^2 from r x r matrices: tr(B~'B~ A~A~') - 2 tr(B'B~ A~A') + tr(B'B AA')."""
    a, b, a_hat, b_hat = _matrix(a), _matrix(b), _matrix(a_hat), _matrix(b_hat)
    hh = ((b_hat.T @ b_hat) * (a_hat @ a_hat.T)).sum()
    th = ((b.T @ b_hat) * (a @ a_hat.T)).sum()
    tt = ((b.T @ b) * (a @ a.T)).sum()
    return max(float(hh - 2 * th + tt), 0.0)


def _tensor_error(t: Any, t_hat: Any) -> float:
    d = t.reshape(-1).double() - t_hat.reshape(-1).double()
    return float(d @ d)


def choose(
    names: Sequence[str],
    source: Callable[[str], Any],
    per_k: Mapping[float, Mapping[str, CompressedTensor]],
    k: float,
    peft_config: Optional[Mapping[str, Any]] = None,
) -> Dict[str, CompressedTensor]:
    """The streams of an error-allocated expert: for each unit (a LoRA pair, or a tensor) the
    stream of the density chosen, from ``per_k`` (density -> name -> stream, every density of
    :func:`density_grid` of ``k``). ``source(name)`` is the uncompressed task vector (a torch
    tensor, as compressed)."""
    import torch

    grid = sorted(per_k)
    pairs = [(a, b) for a, b in lora_pairs(list(names)) if _factors_of_one_rank(per_k[k][a], per_k[k][b])]
    paired = {n for p in pairs for n in p}
    scalings = expert_scalings(peft_config, names) if peft_config else {}
    units: List[Tuple[str, ...]] = list(pairs) + [(n,) for n in sorted(names) if n not in paired]

    def scaling(n: str) -> float:
        f = lora_factor(n)
        return scalings.get(f[0], 1.0) if f is not None else 1.0

    def read(n: str) -> Any:
        return source(n).detach().to(device="cpu", dtype=torch.float64)

    # cost[u][i] = (bytes, error) of unit u at density grid[i].
    cost: List[List[Tuple[int, float]]] = []
    with torch.no_grad():
        for u in units:
            row = []
            # What the model applies: scaling * B.A for a pair, scaling * bias for lora_B's bias,
            # the tensor itself otherwise (a factor without its partner counts as itself).
            f = lora_factor(u[0])
            w = scaling(u[0]) ** 2 if len(u) == 2 or (f is not None and f[1] == "bias") else 1.0
            if len(u) == 2:
                a, b = read(u[0]), read(u[1])
                for kk in grid:
                    sa, sb = per_k[kk][u[0]], per_k[kk][u[1]]
                    row.append((sa.nbytes + sb.nbytes, w * _pair_error(a, b, _dense(sa), _dense(sb))))
            else:
                t = read(u[0])
                for kk in grid:
                    st = per_k[kk][u[0]]
                    row.append((st.nbytes, w * _tensor_error(t, _dense(st))))
            cost.append(row)

    picks = pick_densities(cost, grid.index(k))
    out: Dict[str, CompressedTensor] = {}
    for u, i in zip(units, picks):
        for n in u:
            out[n] = per_k[grid[i]][n]
    return out


def pick_densities(cost: List[List[Tuple[int, float]]], uniform: int) -> List[int]:
    """For each unit the index of its density: ``cost[u][i]`` is unit u's (bytes, error) at
    density i, ``uniform`` the index of k. Within the bytes of the uniform choice, the Lagrangian
    choice, unless the uniform one has no more error (it may lie off the lower convex hull the
    Lagrangian choices move along)."""
    same = [uniform] * len(cost)
    picks = _lagrange(cost, int(_total(cost, same, 0)))
    if picks is None or _total(cost, picks, 1) >= _total(cost, same, 1):
        return same
    return picks


def _factors_of_one_rank(a: CompressedTensor, b: CompressedTensor) -> bool:
    """Whether A and B, as the matrices peft multiplies (rows, everything else), have one rank
    (checked, not assumed; the same test as the pair scale rule's)."""
    if not a.shape or not b.shape:
        return False
    return _scale_matrix(tuple(a.shape))[0] == _scale_matrix(tuple(b.shape))[1]


def _dense(s: CompressedTensor) -> Any:
    """The decoded stream, sign * scale, in float64 (the scale as stored)."""
    import torch

    return torch.as_tensor(s.decode(dtype="float64"))


def _total(cost: List[List[Tuple[int, float]]], picks: Sequence[int], which: int) -> float:
    return sum(c[i][which] for c, i in zip(cost, picks))


def _lagrange(cost: List[List[Tuple[int, float]]], budget: int) -> Optional[List[int]]:
    """For a multiplier lam each unit takes the density minimising error + lam * bytes (ties to
    the fewer bytes); the smallest lam whose choices fit ``budget`` (bisection on log lam). None
    when even the fewest bytes do not fit."""

    def pick(lam: float) -> List[int]:
        return [min(range(len(c)), key=lambda i: (c[i][1] + lam * c[i][0], c[i][0])) for c in cost]

    def size(p: List[int]) -> int:
        return int(_total(cost, p, 0))

    lo, hi = 0.0, 1.0
    best = pick(lo)
    if size(best) <= budget:
        return best
    while size(pick(hi)) > budget:
        hi *= 16.0
        if hi > 1e300:
            return None
    for _ in range(200):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e12
        if size(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    return pick(hi)
