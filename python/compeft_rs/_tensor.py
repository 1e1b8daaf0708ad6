"""CompressedTensor, encode and decode: the per-tensor API over the Rust core."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _arrays
from ._core import Stream
from ._core import cosine as _cosine
from ._core import dot as _dot
from ._core import encode as _encode
from ._core import hamming as _hamming

__all__ = ["CompressedTensor", "encode", "decode", "dot", "cosine", "hamming"]

BytesLike = Union[bytes, bytearray, memoryview]


def _real(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    return float(v)


def check_k_alpha(k: Any, alpha: Any) -> Tuple[float, float]:
    """Validates density and alpha up front (an expert may hold no tensor that reaches Rust);
    the messages match the Rust core's."""
    k, alpha = _real("k", k), _real("alpha", alpha)
    if not (math.isfinite(k) and 0 < k <= 1):
        raise ValueError(f"density k must be a fraction in (0, 1], got {k}; to keep 20% of the entries pass k=0.2")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}; the paper's default is 1.0")
    return k, alpha


def _check_encoding(encoding: Any) -> str:
    if encoding not in ("golomb", "bitmask"):
        raise ValueError(f"encoding must be 'golomb' or 'bitmask', got {encoding!r}")
    return encoding


class CompressedTensor:
    """One ComPEFT-compressed tensor: the signs of its top-k entries and one scale.

    Made by :func:`encode` or :meth:`from_bytes`. ``decode()`` gives back a dense tensor of the
    original kind (torch in, torch out; numpy in, numpy out) whose kept entries are ``±scale``.

    >>> import numpy as np, compeft_rs
    >>> x = np.array([0.5, -2.0, 0.1, 1.0], dtype=np.float32)
    >>> c = compeft_rs.encode(x, 0.5)
    >>> c.nnz, c.shape
    (2, (4,))
    >>> np.sign(c.decode()).tolist()
    [0.0, -1.0, 0.0, 1.0]
    """

    __slots__ = ("_stream", "_kind")

    def __init__(self, stream: Stream, kind: str = "numpy") -> None:
        if not isinstance(stream, Stream):
            raise TypeError("use compeft_rs.encode(...) or CompressedTensor.from_bytes(...)")
        self._stream = stream
        self._kind = kind

    # -- properties -------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the original tensor."""
        return tuple(self._stream.shape)

    @property
    def dtype(self) -> Any:
        """Dtype of the original tensor: a torch.dtype for torch input, else a numpy dtype
        (or the string "bfloat16" where numpy has none)."""
        name = self._stream.dtype
        if self._kind == "torch":
            import torch

            return getattr(torch, name)
        if name == "bfloat16":
            return _arrays._ml_bfloat16() or "bfloat16"
        return np.dtype(name)

    @property
    def dtype_name(self) -> str:
        """Dtype of the original tensor as a string ("float16", "bfloat16", "float32", "float64")."""
        return self._stream.dtype

    @property
    def numel(self) -> int:
        """Number of entries d."""
        return self._stream.numel

    @property
    def nnz(self) -> int:
        """Number of kept (nonzero) entries."""
        return self._stream.nnz

    @property
    def density(self) -> float:
        """nnz / numel (0.0 for an empty tensor)."""
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def scale(self) -> float:
        """alpha * sigma: the magnitude of every kept entry."""
        return self._stream.scale

    @property
    def encoding(self) -> str:
        """"golomb" (Rice-coded gaps, for storage) or "bitmask" (two bit vectors, for arithmetic)."""
        return self._stream.encoding

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes` in bytes."""
        return self._stream.nbytes

    @property
    def bits_per_param(self) -> float:
        """Stored bits per entry of the original tensor."""
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    @property
    def rice_param(self) -> Optional[int]:
        """The Rice parameter b* of a plain golomb stream (None for bitmask, and for a row-coded
        golomb stream, whose rows each have their own)."""
        return self._stream.rice_param

    @property
    def row_length(self) -> Optional[int]:
        """Entries per row of a row-coded golomb stream (None for a plain golomb or a bitmask
        stream). The encoder codes a tensor of two or more dimensions row by row (rows of its
        last dimension: a count per row, then each row's gaps with the Rice parameter of its
        own density) when that is smaller than one Rice parameter over the tensor, as for a full
        fine-tune's embeddings, whose untouched rows keep nothing (docs/FORMAT.md, encoding 2)."""
        return self._stream.row_length

    # -- bytes ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The self-describing byte string (format in docs/FORMAT.md)."""
        return self._stream.to_bytes()

    @classmethod
    def from_bytes(cls, data: BytesLike, *, framework: str = "pt") -> "CompressedTensor":
        """Parses bytes written by :meth:`to_bytes`. Raises CompeftError if they are corrupt.

        ``framework`` sets what :meth:`decode` returns: "pt" (torch tensors, the default) or
        "np" (numpy arrays), as in safetensors.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        return cls(Stream.from_bytes(bytes(data)), _arrays.kind_of(framework))

    @property
    def framework(self) -> str:
        """What :meth:`decode` returns: "pt" (torch) or "np" (numpy)."""
        return "pt" if self._kind == "torch" else "np"

    def __reduce__(self) -> Any:
        return (_from_bytes_framework, (self.to_bytes(), self.framework))

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, *, dtype: Any = None, device: Any = None) -> Any:
        """The dense tensor: ``sign * scale`` at kept entries, 0 elsewhere, in ``dtype``
        (default: the original dtype) and of the original kind.

        ``device`` (e.g. "cuda") returns a torch tensor on that device: the compact bitmask form
        (2 bits per entry) is sent and expanded there, not a dense CPU tensor.
        """
        name = self._stream.dtype if dtype is None else _arrays.dtype_name(dtype)
        dev = _arrays.torch_device(device)
        if dev is not None:
            return _expand_on_device(self._stream, name, dev)
        kind = "torch" if device is not None else self._kind
        out, view = _arrays.empty_output(kind, name, self.shape)
        self._stream.decode_into(view, name)
        return out

    def to_bitmask(self) -> "CompressedTensor":
        """The same ternary vector in the bitmask encoding (no dense pass)."""
        return CompressedTensor(self._stream.to_bitmask(), self._kind)

    def to_golomb(self, *, layout: str = "auto") -> "CompressedTensor":
        """The same ternary vector in the golomb encoding (no dense pass). ``layout``: "auto"
        (default) the smaller of the two layouts, as the encoder chooses; "plain" one Rice
        parameter over the tensor, for readers written before the row-coded layout; "rows" coded
        by rows of the last dimension whatever the size (docs/FORMAT.md, encoding 2)."""
        return CompressedTensor(self._stream.to_golomb(layout), self._kind)

    def masks(self) -> Tuple[np.ndarray, np.ndarray]:
        """The positive and negative bitmasks as uint64 words, LSB first (bit i of word w is entry
        64*w + i), for arithmetic of your own."""
        return self._stream.masks()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompressedTensor):
            return NotImplemented
        return self._stream == other._stream

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(shape={self.shape}, dtype={self.dtype_name}, encoding={self.encoding!r}, "
            f"nnz={self.nnz}, density={self.density:.4g}, scale={self.scale:.6g}, nbytes={self.nbytes})"
        )


def _from_bytes_framework(data: bytes, framework: str) -> CompressedTensor:
    return CompressedTensor.from_bytes(data, framework=framework)


def _expand_on_device(stream: Stream, name: str, device: Any) -> Any:
    """Uploads the two bitmasks (2 bits/entry) and expands them to a dense tensor on `device`."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} requested but torch.cuda.is_available() is False; "
            "decode on the CPU (device=None) or install a CUDA build of torch on a machine with a GPU"
        )
    dtype = getattr(torch, name)
    numel = stream.numel
    pos, neg = stream.masks()
    nbytes = (numel + 7) // 8
    # Little-endian words: byte j, bit i holds entry 8*j + i.
    p = torch.from_numpy(pos.view(np.uint8)[:nbytes]).to(device, non_blocking=True)
    n = torch.from_numpy(neg.view(np.uint8)[:nbytes]).to(device, non_blocking=True)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    pm = ((p.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()
    nm = ((n.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()
    # Same rounding as the CPU decoder: exact for float64, else f64 -> f32 -> dtype.
    s = stream.scale if dtype == torch.float64 else torch.tensor(stream.scale, dtype=torch.float32).to(dtype).item()
    out = torch.zeros(numel, dtype=dtype, device=device)
    out.masked_fill_(pm, s)
    out.masked_fill_(nm, -s)
    return out.reshape(tuple(stream.shape))


def encode(tensor: Any, k: float, alpha: float = 1.0, *, encoding: str = "golomb",
           scale: str = "std") -> CompressedTensor:
    """Compresses a task vector with ComPEFT.

    Keeps the signs of the ``n = floor(k*d + 0.5)`` entries of largest magnitude (ties to the lower
    row-major index, zeros never) and one scale, by default ``alpha * std(tensor)`` (unbiased, in
    f64) as in the paper.

    Args:
        tensor: a torch tensor (any device) or numpy array of float16, bfloat16, float32 or float64.
        k: density, a fraction in (0, 1] (0.1 keeps 10% of the entries).
        alpha: multiplier of the scale, finite and > 0.
        encoding: "golomb" (smallest, for storage and transfer) or "bitmask" (for dot/cosine).
        scale: "std" (the paper's), or a data-free rule: "norm" (||tau|| / sqrt(nnz)), "proj"
            (||tau||^2 / sum of the kept |tau|) or "mean" (mean |tau| of the kept entries).

    >>> import numpy as np, compeft_rs
    >>> c = compeft_rs.encode(np.linspace(-1, 1, 1000, dtype=np.float32), 0.1)
    >>> c.nnz, c.encoding
    (100, 'golomb')
    """
    k = _real("k", k)
    alpha = _real("alpha", alpha)
    _check_encoding(encoding)
    if scale not in ("std", "norm", "proj", "mean"):
        raise ValueError(f"scale must be one of 'std', 'norm', 'proj', 'mean' for one tensor, got {scale!r}")
    arr, name, shape, kind, keep = _arrays.flat_input(tensor)
    stream = _encode(arr, name, list(shape), k, alpha, encoding, scale)
    del keep
    return CompressedTensor(stream, kind)


def decode(
    obj: Union[CompressedTensor, BytesLike], *, dtype: Any = None, device: Any = None, framework: str = "pt"
) -> Any:
    """Decodes a CompressedTensor or its bytes to a dense tensor (see CompressedTensor.decode).
    Bytes decode to ``framework``: "pt" (torch, the default) or "np" (numpy)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        obj = CompressedTensor.from_bytes(obj, framework=framework)
    if not isinstance(obj, CompressedTensor):
        raise TypeError(f"expected a CompressedTensor or bytes, got {type(obj).__name__}")
    return obj.decode(dtype=dtype, device=device)


def _pair(a: Any, b: Any) -> Tuple[Stream, Stream]:
    if not isinstance(a, CompressedTensor) or not isinstance(b, CompressedTensor):
        raise TypeError("both operands must be CompressedTensor (use compeft_rs.encode first)")
    return a._stream, b._stream


def dot(a: CompressedTensor, b: CompressedTensor) -> float:
    """Exact dot product of the two decoded tensors (computed in f64 from popcounts)."""
    return _dot(*_pair(a, b))


def cosine(a: CompressedTensor, b: CompressedTensor) -> float:
    """Exact cosine similarity of the two decoded tensors; 0.0 if either is all zero."""
    return _cosine(*_pair(a, b))


def hamming(a: CompressedTensor, b: CompressedTensor) -> int:
    """Number of entries whose decoded ternary value (-1, 0, +1) differs between a and b.

    A tensor compressed with scale 0 (a constant tensor has sigma 0) decodes to zeros and counts as
    all zero, whatever sign pattern it stores.
    """
    return _hamming(*_pair(a, b))

