"""Type stubs of the Rust extension module (compeft_rs._core). Use the public API in compeft_rs."""

from os import PathLike
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

FORMAT_VERSION: int

class CompeftError(Exception):
    """A compressed stream is corrupt, truncated, of an unknown version, or too large to decode."""

class DecodeLimitError(CompeftError):
    """A stream declares more entries than get_max_numel() allows."""

def get_max_numel() -> int: ...
def set_max_numel(n: int) -> int: ...

class Stream:
    @staticmethod
    def from_bytes(data: bytes) -> Stream: ...
    def to_bytes(self) -> bytes: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def numel(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    @property
    def scale(self) -> float: ...
    @property
    def encoding(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def rice_param(self) -> Optional[int]: ...
    @property
    def row_length(self) -> Optional[int]: ...
    def decode_into(self, out: npt.NDArray[np.generic], dtype: str) -> None: ...
    def with_scale(self, scale: float) -> Stream: ...
    def to_bitmask(self) -> Stream: ...
    def to_golomb(self, layout: str = "auto") -> Stream: ...
    def masks(self) -> Tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]: ...

class Threshold:
    @property
    def ties(self) -> int: ...

class Selector:
    def __init__(self, dtypes: Sequence[str], d: int, k: float) -> None: ...
    def feed(self, data: npt.NDArray[np.generic], dtype: str) -> None: ...
    def with_density(self, k: float) -> Selector: ...
    def finish_level(self) -> bool: ...
    @property
    def done(self) -> bool: ...
    @property
    def sigma(self) -> float: ...
    @property
    def norm(self) -> float: ...
    @property
    def target(self) -> int: ...
    def threshold(self) -> Threshold: ...

def encode_with_threshold(
    data: npt.NDArray[np.generic],
    dtype: str,
    shape: Sequence[int],
    threshold: Threshold,
    ties_left: int,
    scale: float,
    encoding: str,
) -> Tuple[Stream, int]: ...
def kept_abs_sum(data: npt.NDArray[np.generic], dtype: str, threshold: Threshold, ties_taken: int) -> float: ...
def encode(
    data: npt.NDArray[np.generic],
    dtype: str,
    shape: Sequence[int],
    k: float,
    alpha: float,
    encoding: str,
    scale: str = "std",
) -> Stream: ...
def encode_many(
    items: Sequence[Tuple[str, npt.NDArray[np.generic], str, Sequence[int]]],
    k: float,
    alpha: float,
    encoding: str,
    scale: str = "std",
) -> List[Stream]: ...
def decode_streams(
    streams: Sequence[Stream], names: Sequence[str], outs: Sequence[npt.NDArray[np.generic]], dtypes: Sequence[str]
) -> None: ...

# (A flat, A dtype, (r, n), B flat, B dtype, (m, r), A's stream, B's stream)
_PairItem = Tuple[
    npt.NDArray[np.generic], str, Tuple[int, int], npt.NDArray[np.generic], str, Tuple[int, int], Stream, Stream
]

def pair_norms(
    items: Sequence[_PairItem],
    names: Sequence[str],
) -> List[Tuple[float, float]]:
    """||BA||^2 of LoRA pairs, (dense, signs) each, through r x r Gram matrices in one parallel call.

    Each item is (A flat, A dtype, (r, n), B flat, B dtype, (m, r), A's stream, B's stream), the flat
    arrays as the encoders take them (uint16 bits for float16/bfloat16). ``dense`` comes from the
    factors (float16/bfloat16/float32 summed in f32 per 256 entries, then f64: about 1e-6 relative;
    float64 in f64); ``signs`` from the kept signs, exactly. ValueError names the pair for sizes that
    do not fit (A's rows must equal B's columns)."""

def pair_dense_norms(
    items: Sequence[_PairItem],
    names: Sequence[str],
) -> List[float]:
    """||BA||^2 of LoRA pairs from the factors alone: :func:`pair_norms`'s dense values (the same
    numbers) without the sign Grams, in one parallel call. Items and errors as for
    :func:`pair_norms`."""

def pair_cross(
    items: Sequence[_PairItem],
    names: Sequence[str],
) -> List[float]:
    """<S_B S_A, B A> of LoRA pairs (the kept signs' product against the factors' product, for the
    ``pair_proj`` rule) through r x r cross-Grams over the kept entries, in f64, in one parallel
    call. Items and errors as for :func:`pair_norms`."""

_FactorItem = Tuple[npt.NDArray[np.generic], str, Tuple[int, int], npt.NDArray[np.generic], str, Tuple[int, int]]

def gauge_grams(items: Sequence[_FactorItem], names: Sequence[str]) -> npt.NDArray[np.float64]:
    """The r x r Grams (A A^T, B^T B) of LoRA pairs for the balanced gauge, in one parallel call:
    one flat float64 array, each pair's A A^T then its B^T B (row-major), pair after pair. Each item
    is (A flat, A dtype, (r, n), B flat, B dtype, (m, r)); ValueError naming the pair for sizes
    that do not fit."""

def gauge_apply(
    items: Sequence[_FactorItem],
    transforms: npt.NDArray[np.float64],
    outs: Sequence[Tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]],
    names: Sequence[str],
) -> List[bool]:
    """Writes A' = T_A A and B' = B T_B of each pair into ``outs`` (flat arrays of the factors' sizes
    and dtypes), in one parallel call; ``transforms`` holds each pair's T_A then T_B (r x r,
    row-major), pair after pair. Returns, per pair, whether every output entry is finite (where not,
    keep the pair as it was)."""

class ExpertFile:
    @staticmethod
    def open(path: Union[str, PathLike[str]]) -> ExpertFile: ...
    @staticmethod
    def from_bytes(data: bytes) -> ExpertFile: ...
    @staticmethod
    def build(
        streams: Sequence[Tuple[str, Stream]],
        raws: Sequence[Tuple[str, str, Sequence[int], npt.NDArray[np.uint8]]],
        metadata: Dict[str, str],
    ) -> ExpertFile: ...
    @property
    def nbytes(self) -> int: ...
    def metadata(self) -> Dict[str, str]: ...
    def entries(self) -> Dict[str, Tuple[str, Tuple[int, ...], int]]: ...
    def stream(self, key: str) -> Stream: ...
    def streams(self, keys: Sequence[str]) -> List[Stream]: ...
    def read_raw(self, key: str, out: npt.NDArray[np.uint8]) -> None: ...
    def write_to(self, path: Union[str, PathLike[str]]) -> None: ...
    def to_bytes(self) -> bytes: ...
def dot(a: Stream, b: Stream) -> float: ...
def cosine(a: Stream, b: Stream) -> float: ...
def hamming(a: Stream, b: Stream) -> int: ...
def merge_streams(
    groups: Sequence[Sequence[Stream]],
    names: Sequence[str],
    weights: Sequence[float],
    outs: Sequence[npt.NDArray[np.float32]],
    method: str,
    election: str,
    convention: str,
    density: Optional[float],
    lam: float,
) -> None: ...
def similarity(experts: Sequence[Sequence[Stream]]) -> npt.NDArray[np.float64]: ...
def rice_parameter(nnz: int, d: int) -> int: ...
def expected_golomb_bits(nnz: int, d: int) -> float: ...
def entropy_bound_bits(d: int, k: float) -> float: ...
def popcount_kernel() -> str: ...
