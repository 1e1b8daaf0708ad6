"""How the one magnitude of each stream is chosen (the stored scale always means: every kept entry
decodes to sign * scale; only how it is chosen differs).

Per tensor (computed in Rust) or, in global scope, over all tensors together, times ``alpha``:

- ``"std"``: the standard deviation of tau (the paper's Algorithm 1);
- ``"mean"``: mean |tau| of the kept entries (the L2-closest scale for those signs; STC's rule);
- ``"norm"``: ||tau|| / sqrt(nnz), so the decoded tensor has tau's L2 norm;
- ``"proj"``: ||tau||^2 / sum of the kept |tau|, so the decoded tensor's projection on tau is tau;
- ``"pair"``: ``"norm"`` for every tensor, then for each LoRA pair the same rule on the product
  that the model applies: the scale of ``lora_B`` is set so that ||s_A s_B B~A~|| = ||BA||
  (through r x r Gram matrices, never the d_out x d_in product). Tensors without a partner keep
  ``"norm"``.
- ``"pair_proj"``: ``"proj"`` for every tensor, then for each LoRA pair the projection on the
  product: the scale of ``lora_B`` is set so that <s_A s_B B~A~, BA> = ||BA||^2 (through r x r
  cross-Grams of signs and factors); a pair whose kept signs' product is orthogonal to BA or
  opposed to it gets ``"pair"``'s scale instead. Tensors without a partner keep ``"proj"``.

Why projections: the error a compressed expert makes in the model's outputs is far more
sensitive along the fine-tune's own direction tau than across it, and the projection rules put
the decoded expert's component along tau exactly at tau (the norm rules keep less of it, the
``"mean"`` rule least). The accuracy study in README measured it on validation.
"""

from __future__ import annotations

import math

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import _arrays
from ._core import pair_cross as _pair_cross
from ._core import pair_dense_norms as _pair_dense_norms
from ._core import pair_norms as _pair_norms
from ._tensor import CompressedTensor

__all__ = ["SCALES", "PAIR_BASE", "check_scale", "lora_pairs", "pair_rescale"]

SCALES = ("pair_proj", "pair", "proj", "norm", "mean", "std")

# pair_proj falls back to pair's norm where the cosine of the signs' product and B A is at or
# below this: rounding noise (the cross term of cancelling signs comes out near 1e-17, not 0).
_MIN_COSINE = 1e-9

# The per-tensor rule each pair rule starts from.
PAIR_BASE = {"pair": "norm", "pair_proj": "proj"}

_PARTNER = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}


def check_scale(scale: Any) -> str:
    if scale not in SCALES:
        raise ValueError(
            f"scale must be one of {', '.join(repr(s) for s in SCALES)}, got {scale!r}; \"std\" with "
            "scope=\"global\" is the paper's Algorithm 1"
        )
    return str(scale)


def lora_pairs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """(lora_A name, lora_B name) for every A factor whose B factor is among ``names``; the names
    differ in exactly that one dot-separated segment."""
    present = set(names)
    pairs = []
    for n in sorted(present):
        segs = n.split(".")
        for i, s in enumerate(segs):
            if s in _PARTNER:
                b = ".".join(segs[:i] + [_PARTNER[s]] + segs[i + 1:])
                if b in present:
                    pairs.append((n, b))
                break
    return pairs


def _matrix(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """A factor's shape as (rows, everything else), as ``x.reshape(x.shape[0], -1)`` has it."""
    return shape[0], math.prod(shape[1:])


FlatFactor = Tuple[Any, str, Tuple[int, ...]]


def pair_rescale(streams: Dict[str, CompressedTensor], source: Callable[[str], Any],
                 alpha: float, flat: Optional[Callable[[str], FlatFactor]] = None, rule: str = "pair"
                 ) -> Dict[str, CompressedTensor]:
    """Sets the scale of each LoRA pair's B stream so that the product the model applies keeps
    its L2 norm (``rule="pair"``) or its projection on B A (``rule="pair_proj"``), A's scale
    unchanged (``alpha`` multiplies each stream's scale, so the product carries alpha^2).
    ``source(name)`` gives the uncompressed factor; ``flat(name)``, if given, gives it as
    ``_arrays.flat_input`` does (flat array, dtype name, shape) without reading it again.

    ||BA||^2 = tr((B^T B)(A A^T)), the same for the signs: r x r Gram matrices, computed in Rust
    (``_core.pair_norms``) for all pairs in one parallel call; <S_B S_A, BA> =
    tr((S_B^T B)(A S_A^T)) through r x r cross-Grams over the kept entries
    (``_core.pair_cross``), likewise; ``pair_proj`` takes the signs' Grams only for pairs near
    its cosine cut (``_core.pair_dense_norms`` for the rest)."""
    if flat is None:
        def flat(n: str) -> FlatFactor:
            return _arrays.flat_input(source(n))[:3]

    out = dict(streams)
    todo, items = [], []
    for a, b in lora_pairs(list(streams)):
        sa, sb = streams[a], streams[b]
        if sa.scale == 0 or sa.nnz == 0 or sb.nnz == 0:
            continue
        (xa, da, shape_a), (xb, db, shape_b) = flat(a), flat(b)
        if not shape_a or not shape_b:
            continue  # a 0-d tensor is no factor
        ma, mb = _matrix(tuple(shape_a)), _matrix(tuple(shape_b))
        if ma[0] != mb[1]:
            continue  # not a factor pair of one rank (checked, not assumed)
        todo.append((a, b))
        items.append((xa, da, ma, xb, db, mb, sa._stream, sb._stream))
    if not items:
        return out
    labels = [f"{a} / {b}" for a, b in todo]
    if rule == "pair_proj":
        # <S_B S_A, BA> in place of ||S_B S_A||^2. The signs' own norm qq only decides the
        # cosine cut, and qq <= nnz_A * nnz_B (||XY|| <= ||X|| ||Y||): a pair whose cross term
        # clears the cut with that bound clears it with qq, which then is not computed.
        dense = _pair_dense_norms(items, labels)
        crosses = _pair_cross(items, labels)
        need = [i for i, ((a, b), pp, cross) in enumerate(zip(todo, dense, crosses))
                if not cross > _MIN_COSINE * math.sqrt(max(pp, 0.0) * streams[a].nnz * streams[b].nnz)]
        # qq None: the cut is cleared already.
        norms: List[Tuple[float, Optional[float]]] = [(pp, None) for pp in dense]
        if need:
            for i, pq in zip(need, _pair_norms([items[i] for i in need], [labels[i] for i in need])):
                norms[i] = pq
    else:
        norms = _pair_norms(items, labels)
        crosses = [None] * len(todo)
    for (a, b), (pp, qq), cross in zip(todo, norms, crosses):
        sa, sb = streams[a], streams[b]
        pp = max(pp, 0.0)
        if cross is not None and (qq is None or cross > _MIN_COSINE * math.sqrt(pp * qq)):
            c = pp / cross
        else:
            # pair, or pair_proj where the signs' product is orthogonal to B A (up to rounding)
            # or opposed to it: the projection has no finite answer there, the norm does.
            c = math.sqrt(pp / qq) if qq > 0 else 0.0
        if not c > 0:
            continue  # the kept signs cancel in the product: keep the per-tensor scales
        out[b] = CompressedTensor(sb._stream.with_scale(alpha * alpha * c / sa.scale), sb._kind)
    return out
