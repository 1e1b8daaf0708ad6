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
"""

from __future__ import annotations

import math

from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from . import _arrays
from ._tensor import CompressedTensor

__all__ = ["SCALES", "check_scale", "lora_pairs", "pair_rescale"]

SCALES = ("pair", "proj", "norm", "mean", "std")

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


def _f64(x: Any) -> np.ndarray:
    """A factor as float64 numpy, exactly (half types through float32: numpy has no bfloat16)."""
    if _arrays.is_torch_tensor(x):
        x = x.detach().cpu()
        x = (x.float() if x.element_size() == 2 else x).numpy()
    return np.asarray(x, dtype=np.float64)


def _signs(c: CompressedTensor) -> np.ndarray:
    """The kept signs (-1, 0, 1) as float64, from the two bitmasks (no dense decode)."""
    pos, neg = c._stream.masks()
    d = c.numel
    p = np.unpackbits(pos.view(np.uint8), bitorder="little")[:d]
    n = np.unpackbits(neg.view(np.uint8), bitorder="little")[:d]
    return p.astype(np.float64) - n


def pair_rescale(streams: Dict[str, CompressedTensor], source: Callable[[str], Any],
                 alpha: float) -> Dict[str, CompressedTensor]:
    """Sets the scale of each LoRA pair's B stream so that the product the model applies keeps
    its L2 norm, A's scale unchanged (``alpha`` multiplies each stream's scale, so the product
    carries alpha^2). ``source(name)`` gives the uncompressed factor."""
    out = dict(streams)
    for a, b in lora_pairs(list(streams)):
        sa, sb = streams[a], streams[b]
        if sa.scale == 0 or sa.nnz == 0 or sb.nnz == 0:
            continue
        A, B = _f64(source(a)), _f64(source(b))
        A = A.reshape(A.shape[0], -1)
        B = B.reshape(B.shape[0], -1)
        if A.shape[0] != B.shape[1]:
            continue  # not a factor pair of one rank (checked, not assumed)
        At, Bt = _signs(sa).reshape(A.shape), _signs(sb).reshape(B.shape)
        # ||BA||^2 = tr((B^T B)(A A^T)), the same for the signs: r x r each.
        pp = float(((B.T @ B) * (A @ A.T)).sum())
        qq = float(((Bt.T @ Bt) * (At @ At.T)).sum())
        if not qq > 0:
            continue  # the kept signs cancel in the product: keep the per-tensor scales
        c = math.sqrt(max(pp, 0.0) / qq)
        out[b] = CompressedTensor(sb._stream.with_scale(alpha * alpha * c / sa.scale), sb._kind)
    return out
