"""compeft-rs: ComPEFT compression of fine-tuned experts.

A task vector tau = theta_ft - theta_init is stored as the signs of its top-k entries by magnitude
and one scale alpha * std(tau), as Rice-coded gaps ("golomb", 8x-50x smaller than fp16) or as two
bitmasks ("bitmask", for popcount dot/cosine). See https://arxiv.org/abs/2311.13171.

>>> import numpy as np, compeft_rs
>>> tau = np.random.default_rng(0).standard_normal(10_000).astype(np.float16)
>>> c = compeft_rs.encode(tau, k=0.1)
>>> restored = compeft_rs.decode(c.to_bytes(), dtype="float16")
>>> int((restored != 0).sum())
1000
"""

from ._core import FORMAT_VERSION, CompeftError, DecodeLimitError
from ._core import get_max_numel as _get_max_numel
from ._core import set_max_numel as _set_max_numel
from ._core import entropy_bound_bits as _entropy_bound_bits
from ._core import expected_golomb_bits as _expected_golomb_bits
from ._core import rice_parameter
from ._tensor import CompressedTensor, cosine, decode, dot, encode, hamming
from ._expert import CompressedExpert, ExpertSummary, compress_expert, load_expert
from ._peft import compress_peft, load_peft, save_peft
from ._checkpoint import apply_checkpoint, compress_checkpoint
from ._tune import TunePoint, TuneResult, tune
from ._serve import load_into
from ._store import ExpertStore
from ._merge import merge, merge_peft, similarity
from ._bounds import adaptive_bound_bits

__version__ = "0.1.0"

__all__ = [
    "CompeftError",
    "DecodeLimitError",
    "get_max_numel",
    "set_max_numel",
    "CompressedExpert",
    "ExpertStore",
    "ExpertSummary",
    "apply_checkpoint",
    "compress_checkpoint",
    "compress_expert",
    "compress_peft",
    "load_expert",
    "load_into",
    "load_peft",
    "merge",
    "merge_peft",
    "similarity",
    "save_peft",
    "tune",
    "TunePoint",
    "TuneResult",
    "CompressedTensor",
    "FORMAT_VERSION",
    "cosine",
    "decode",
    "dot",
    "encode",
    "entropy_bound_bits",
    "adaptive_bound_bits",
    "expected_golomb_bits",
    "hamming",
    "rice_parameter",
]


def entropy_bound_bits(d: int, k: float) -> float:
    """Entropy bound in bits for a ternary vector of d entries at density k:
    d * (-(1-k) log2(1-k) - k log2(k/2))."""
    return _entropy_bound_bits(int(d), float(k))


def expected_golomb_bits(nnz: int, d: int) -> float:
    """Expected golomb payload bits (Rice gaps with b* plus sign bits) for nnz independent
    positions among d entries."""
    return _expected_golomb_bits(int(nnz), int(d))


def get_max_numel() -> int:
    """The largest number of entries a stream may declare when it is read (default 2**32).

    A stream of a few dozen bytes can declare 2**48 zero entries; reading one above this limit
    raises DecodeLimitError before anything is allocated for it."""
    return _get_max_numel()


def set_max_numel(n: int) -> int:
    """Sets the limit of get_max_numel() for this process (0 to 2**48) and returns the previous
    value. Raise it only for streams from a source you trust."""
    n = int(n)
    if n < 0:
        raise ValueError(f"max_numel must be >= 0, got {n}")
    return _set_max_numel(n)
