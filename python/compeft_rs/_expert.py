"""Whole experts: many tensors compressed together, stored as one safetensors-compatible file.

A :class:`CompressedExpert` is a view over its storage, an ``ExpertFile`` of the Rust core: the
file's bytes, read into memory once (a fresh expert is serialised once, when it is made).
Whole-expert work is one call into Rust: every stream parsed once and all tensors decoded in
parallel into outputs allocated once, the GIL released.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _arrays
from ._core import CompeftError, ExpertFile, Selector
from ._core import decode_streams as _decode_streams
from ._core import encode_many as _encode_many
from ._core import encode_with_threshold as _encode_with_threshold
from ._core import kept_abs_sum as _kept_abs_sum
from ._allocate import check_allocate, choose, density_grid
from ._gauge import balance_pairs, check_gauge
from ._bounds import adaptive_bound_bits
from ._scale import PAIR_BASE, check_scale, lora_pairs, pair_rescale
from ._core import entropy_bound_bits as _entropy_bound_bits
from ._io import atomic_file
from ._plan import FLOAT_NAMES, TensorPlan, is_ia3_vector, plan_expert
from ._tensor import CompressedTensor, _check_encoding, check_k_alpha

__all__ = ["CompressedExpert", "compress_expert", "load_expert", "ExpertSummary", "load_tensors"]

PathLike = Union[str, "os.PathLike[str]"]
FILE_FORMAT = "compeft"
FILE_VERSION = 3
# Elements per chunk when residuals of half-precision checkpoints are taken in float32.
RESIDUAL_CHUNK = 1 << 22

# torch dtype name <-> safetensors dtype name, for tensors kept exactly.
_ST_BY_TORCH = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_TORCH_BY_ST = {v: k for k, v in _ST_BY_TORCH.items()}


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("whole-expert compression needs torch: pip install torch") from e
    return torch


def _as_torch(x: Any) -> Any:
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")


_DTYPE_NAMES: Dict[Any, str] = {}


def _dtype_str(t: Any) -> str:
    """A tensor's dtype as its name ("float16"); remembered per dtype (swaps ask it per tensor)."""
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        name = _DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
    return name


def checkpoint_files(path: PathLike) -> List[Path]:
    """The safetensors files of a checkpoint: a file, or a folder (sharded with an index, or not)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        return [p]
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CompeftError(f"{index} is not a valid safetensors index: {e}") from None
        return [p / f for f in files]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p} holds no .safetensors files")
    return files


def load_tensors(path: PathLike) -> Dict[str, Any]:
    """All tensors of a safetensors file or checkpoint folder, as torch tensors."""
    from safetensors.torch import load_file

    out: Dict[str, Any] = {}
    for f in checkpoint_files(path):
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for bad files
            raise CompeftError(f"{f} is not a readable safetensors file: {e}") from None
    return out


#: The most a deflated name list or adapter config may inflate to: 1 KiB per tensor of the file
#: plus 1 MiB. A name list holds one name per tensor (names of real models run to about 100
#: bytes); an adapter config a few module names per tensor at most (target_modules, rank_pattern,
#: alpha_pattern) besides its fixed fields. zlib itself expands up to 1032 times, so without a
#: bound a small file could ask for gigabytes before its JSON was found wrong.
INFLATE_PER_TENSOR = 1 << 10
INFLATE_SLACK = 1 << 20


def inflate_limit(tensors: int) -> int:
    return INFLATE_PER_TENSOR * tensors + INFLATE_SLACK


def deflate_json(obj: Any, tensors: int, what: str) -> str:
    """JSON, deflated and base64-coded: tensor names share long prefixes and an adapter config
    is mostly defaults; as text they would outweigh a small expert's streams. Refuses what a
    reader would (above :func:`inflate_limit` for a file of ``tensors`` tensors)."""
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=list).encode()
    if len(raw) > inflate_limit(tensors):
        raise ValueError(f"the {what} takes {len(raw)} bytes as JSON, more than the {inflate_limit(tensors)} a "
                         f"reader accepts for {tensors} tensors (1 KiB a tensor + 1 MiB); shorten it")
    return base64.b64encode(zlib.compress(raw, 9)).decode()


def inflate(data: bytes, tensors: int) -> bytes:
    """zlib data inflated to at most :func:`inflate_limit` bytes for a file of ``tensors``
    tensors; ValueError beyond it, zlib.error for data that is not zlib or ends early. Bytes
    after the end of the zlib stream are ignored, as zlib.decompress ignores them."""
    limit = inflate_limit(tensors)
    d = zlib.decompressobj()
    out = d.decompress(data, limit)
    if d.unconsumed_tail or (not d.eof and len(out) >= limit):
        raise ValueError(f"inflates past {limit} bytes, the most a file of {tensors} tensors holds "
                         "(1 KiB a tensor + 1 MiB)")
    if not d.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def pack_names(names: List[str]) -> str:
    """Tensor names as a deflated JSON list (JSON keeps any character a name has)."""
    return deflate_json(names, len(names), "tensor name list")


def unpack_names(packed: str, count: int, where: str, version: int = FILE_VERSION) -> List[str]:
    try:
        raw = inflate(base64.b64decode(packed, validate=True), count).decode()
        if version == 1:  # newline-joined
            names: Any = [] if count == 0 and raw == "" else raw.split("\n")
        else:
            names = json.loads(raw)
    except (ValueError, zlib.error, UnicodeDecodeError) as e:
        raise CompeftError(f"{where}: corrupt tensor name list: {e}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CompeftError(f"{where}: corrupt tensor name list: not a list of names")
    if len(names) != count or len(set(names)) != count:
        raise CompeftError(f"{where}: the name list holds {len(names)} names for {count} tensors")
    return names


def fp16_file_size(shapes: Mapping[str, Tuple[int, ...]]) -> int:
    """Size of a safetensors file holding these tensors in fp16 (header included)."""
    header: Dict[str, Any] = {}
    offset = 0
    for name in sorted(shapes):
        n = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "F16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    h = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + h + (-h % 8) + offset


@dataclass
class ExpertSummary:
    """Sizes of a compressed expert, per tensor and in total. ``str()`` gives a table. Each row's
    ``coding`` is "rice" (golomb, one Rice parameter), "rows" (golomb coded by rows), "bitmask"
    or "exact" (kept as it is)."""

    rows: List[Dict[str, Any]] = field(default_factory=list)
    total_params: int = 0
    compressed_params: int = 0
    file_bytes: int = 0
    fp16_file_bytes: int = 0
    entropy_bound_bytes: float = 0.0
    adaptive_bound_bytes: float = 0.0

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_file_bytes / self.file_bytes if self.file_bytes else float("inf")

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [f"{'tensor':<60} {'shape':>14} {'density':>8} {'coding':>7} {'bytes':>9} {'bits/param':>10} "
                 f"{'vs fp16':>8}"]
        for r in self.rows:
            dens = "exact" if r["lossless"] else f"{r['density']:.4f}"
            lines.append(
                f"{r['name'][-60:]:<60} {str(tuple(r['shape'])):>14} {dens:>8} {r['coding']:>7} {r['bytes']:>9} "
                f"{r['bits_per_param']:>10.3f} {r['ratio_vs_fp16']:>7.1f}x"
            )
        lines.append(
            f"total: {len(self.rows)} tensors, {self.total_params:,} params; file {self.file_bytes:,} B "
            f"({self.bits_per_param:.3f} bits/param) against fp16 file {self.fp16_file_bytes:,} B: "
            f"{self.ratio_vs_fp16:.1f}x smaller; entropy bound of the payload {self.entropy_bound_bytes:,.0f} B "
            f"(i.i.d.), {self.adaptive_bound_bytes:,.0f} B (adaptive, per row or column)"
        )
        return "\n".join(lines)


def _parse_metadata(md: Mapping[str, str], tensors: int,
                    where: str) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    if md.get("format") != FILE_FORMAT or "compeft" not in md:
        raise CompeftError(f"{where} is a safetensors file but not a compeft expert (no compeft metadata)")
    try:
        info = json.loads(md["compeft"])
        peft_config = None
        if "peft_config" in md:
            raw = md["peft_config"]
            # Version 3 deflates it; earlier versions stored the JSON text.
            if isinstance(info, dict) and info.get("file_version") == FILE_VERSION:
                raw = inflate(base64.b64decode(raw, validate=True), tensors).decode()
            peft_config = json.loads(raw)
    except (ValueError, zlib.error) as e:
        raise CompeftError(f"{where}: corrupt compeft metadata: {e}") from None
    if not isinstance(info, dict) or (peft_config is not None and not isinstance(peft_config, dict)):
        raise CompeftError(f"{where}: corrupt compeft metadata: not a JSON object")
    if info.get("file_version") not in (1, 2, FILE_VERSION):
        raise CompeftError(
            f"{where}: unsupported compeft file version {info.get('file_version')!r}; "
            f"this library reads versions 1 to {FILE_VERSION}, upgrade compeft-rs to read newer files"
        )
    return info, peft_config


_INITS = ("zero", "one", "base")
_OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_info(
    info: Dict[str, Any],
    keys: Mapping[str, str],
    exact: set,
    init: Dict[str, Any],
    dtypes: Dict[str, Any],
    default_init: str,
    where: str,
) -> None:
    """Every field a reader acts on, checked before anything is decoded: a file that names a
    tensor it lacks, an init or dtype this library does not know, or a density outside (0, 1] is
    corrupt, not something to guess around."""

    def bad(msg: str) -> CompeftError:
        return CompeftError(f"{where}: corrupt compeft metadata: {msg}")

    k = info.get("k")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < k <= 1:
        raise bad(f"density k is {k!r}, expected a number in (0, 1]")
    alpha = info.get("alpha", 1.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise bad(f"alpha is {alpha!r}, expected a finite number >= 0")
    for n in sorted(exact - set(keys)):
        raise bad(f"'lossless' names tensor {n!r}, which the file does not hold")
    for field, table, allowed in (("init", init, _INITS), ("dtypes", dtypes, _OUT_DTYPES)):
        for n, v in sorted(table.items()):
            if n not in keys:
                raise bad(f"{field!r} names tensor {n!r}, which the file does not hold")
            if v not in allowed:
                raise bad(f"{field!r} gives tensor {n!r} the value {v!r}, expected one of {allowed}")
    if default_init not in _INITS:
        raise bad(f"default_init is {default_init!r}, expected one of {_INITS}")


def _unwritable(t: Any, name: str, torch: Any) -> Optional[str]:
    """Why decode_into cannot write ``t`` (None when it can)."""
    if isinstance(t, np.ndarray):
        if not t.flags.writeable:
            return "is a read-only numpy array; give a writable one"
        if not t.dtype.isnative:
            return f"has byte order {t.dtype.byteorder!r}, not this machine's; give a native one (astype('=f4'))"
        if any(st == 0 and sz > 1 for st, sz in zip(t.strides, t.shape)):
            return "repeats one element along a dimension (a broadcast view); give an array of its own"
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"out[{name!r}] is a {type(t).__name__}; give a torch tensor or a numpy array")
    if t.device.type == "meta":
        return "is on the meta device, which holds no values; materialise it first (e.g. Module.to_empty)"
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        return "repeats one element along a dimension (an expanded view); give a tensor of its own"
    return None


def _byte_span(t: Any) -> Tuple[int, int]:
    """The bytes ``t`` may touch, [low, high), as a memory address range (device tensors: their
    device's own addresses, kept apart from the host's by the device index in the high bits)."""
    if isinstance(t, np.ndarray):
        bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds  # numpy 2 moved it
        low, high = bounds(t)
        return (low, high)
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = 1 + sum((sz - 1) * st for sz, st in zip(t.shape, t.stride()))
    tag = 0 if t.device.type == "cpu" else (hash((t.device.type, t.device.index)) & 0xFFFF) + 1
    low = (tag << 64) + t.data_ptr()
    return (low, low + extent * t.element_size())


class CompressedExpert:
    """A compressed expert: one compressed stream per delta tensor, exact copies of the rest.

    Made by :func:`compress_expert`, :func:`compeft_rs.compress_peft`,
    :func:`compeft_rs.compress_checkpoint`, :func:`load_expert` or :meth:`from_bytes`. A loaded
    expert holds a copy of its file's bytes (later changes to the file do not reach it); nothing
    is decoded until asked for.
    """

    def __init__(self, storage: ExpertFile, *, path: Optional[Path] = None, where: str = "<bytes>") -> None:
        self._file = storage
        self._path = path
        md = storage.metadata()
        entries = storage.entries()
        info, self.peft_config = _parse_metadata(md, len(entries), where)
        names = unpack_names(str(info.pop("names", "")), len(entries), where, int(info["file_version"]))
        self._keys = {n: str(i) for i, n in enumerate(names)}
        if set(self._keys.values()) != set(entries):
            raise CompeftError(f"{where}: tensor keys do not match the name list")
        try:
            self._exact = set(info.get("lossless", []))
            self._init: Dict[str, str] = dict(info.get("init", {}))
            self._dtypes: Dict[str, str] = dict(info.get("dtypes", {}))
            self._default_init = str(info.get("default_init", "zero"))
        except (TypeError, ValueError) as e:
            raise CompeftError(f"{where}: corrupt compeft metadata: {e}") from None
        _check_info(info, self._keys, self._exact, self._init, self._dtypes, self._default_init, where)
        for n in self._keys:
            dt = entries[self._keys[n]][0]
            if n not in self._exact and dt != "U8":
                raise CompeftError(f"{where}: tensor {n!r} should be a compressed stream (U8) but is {dt}")
            if n in self._exact and dt not in _TORCH_BY_ST:
                raise CompeftError(f"{where}: tensor {n!r} has dtype {dt}, which torch cannot hold")
        self._entries = entries
        self._info = info
        self._where = where

    # -- mapping ----------------------------------------------------------------------------
    def keys(self) -> List[str]:
        """All tensor names, sorted."""
        return sorted(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __getitem__(self, name: str) -> Any:
        """The decoded task vector of one tensor (only that tensor is read)."""
        return self.decode_tensor(name)

    @property
    def k(self) -> float:
        """The density asked for: every tensor's with ``allocate="uniform"``, the byte budget's
        (the streams' size at that density everywhere) with ``allocate="error"``; the streams'
        own densities are in :meth:`summary`."""
        return float(self._info["k"])

    @property
    def alpha(self) -> float:
        """The multiplier every stored scale carries."""
        return float(self._info["alpha"])

    @property
    def scope(self) -> str:
        return str(self._info["scope"])

    @property
    def scale(self) -> str:
        """How the streams' scales were chosen ("std" for files written before the rule was stored)."""
        return str(self._info.get("scale", "std"))

    @property
    def gauge(self) -> str:
        """The gauge the LoRA pairs were compressed in: "as_trained" or "balanced" (see
        :func:`compress_expert`; "as_trained" for files that do not record one)."""
        return str(self._info.get("gauge", "as_trained"))

    @property
    def allocate(self) -> str:
        """How density was spread over the tensors: "uniform" (every tensor at :attr:`k`) or
        "error" (per-tensor densities within the bytes of the uniform choice; see
        :func:`compress_expert`). Files written before the option existed read as "uniform"."""
        return str(self._info.get("allocate", "uniform"))

    @property
    def encoding(self) -> str:
        return str(self._info["encoding"])

    @property
    def nbytes(self) -> int:
        """Size of the expert file in bytes."""
        return int(self._file.nbytes)

    def compressed_keys(self) -> List[str]:
        return sorted(n for n in self._keys if n not in self._exact)

    def lossless_keys(self) -> List[str]:
        """Names of the tensors kept exactly."""
        return sorted(self._exact)

    def init_of(self, name: str) -> Optional[str]:
        """theta_init of a tensor: "zero" (LoRA factors, task vectors), "one" ((IA)3), "base"
        (a full fine-tune's residual), or None for a tensor kept exactly."""
        if name not in self._keys:
            raise KeyError(f"{name!r} is not in this expert")
        if name in self._exact:
            return None
        return self._init.get(name, self._default_init)

    def dtype_of(self, name: str) -> str:
        """The dtype the tensor had before compression."""
        if name in self._exact:
            return _TORCH_BY_ST[self._entries[self._keys[name]][0]]
        return str(self._dtypes.get(name) or self.stream(name).dtype_name)

    # -- access -----------------------------------------------------------------------------
    def stream(self, name: str) -> CompressedTensor:
        """The CompressedTensor of a compressed tensor."""
        if name not in self._keys or name in self._exact:
            raise KeyError(f"{name!r} is not a compressed tensor of this expert")
        return CompressedTensor(self._file.stream(self._keys[name]), "torch")

    def lossless(self, name: str) -> Any:
        """A tensor kept exactly, as a new torch tensor."""
        if name not in self._exact:
            raise KeyError(f"{name!r} is not a tensor kept exactly in this expert")
        torch = _torch()
        st, shape, _ = self._entries[self._keys[name]]
        t = torch.empty(tuple(shape), dtype=getattr(torch, _TORCH_BY_ST[st]))
        self._file.read_raw(self._keys[name], t.reshape(-1).view(torch.uint8).numpy())
        return t

    def decode_tensor(self, name: str, *, dtype: Any = None, device: Any = None) -> Any:
        """One tensor: decoded if compressed (``dtype`` default: its original dtype), as stored
        if kept exactly."""
        return self.decode([name], dtype=dtype, device=device)[name]

    def decode(self, names: Optional[Iterable[str]] = None, *, dtype: Any = None, device: Any = None) -> Dict[str, Any]:
        """The reconstructed task vector of ``names`` (default: every tensor): compressed tensors
        decoded in ``dtype`` (default: each tensor's original dtype), the rest as stored.

        One call into Rust parses every stream once, one more decodes all of them in parallel
        into one output buffer per dtype, the GIL released. ``device`` (e.g. "cuda") expands each
        tensor there from its 2-bit form (see CompressedTensor.decode).
        """
        names = self.keys() if names is None else list(names)
        for n in names:
            if n not in self._keys:
                raise KeyError(f"{n!r} is not in this expert")
        want = None if dtype is None else _arrays.dtype_name(dtype)
        comp = [n for n in names if n not in self._exact]
        streams = self._parse(comp)
        dtypes = [want or self._orig_dtype(n, s) for n, s in zip(comp, streams)]
        out = _decode_parsed(comp, streams, dtypes, device)
        for n in names:
            if n in self._exact:
                out[n] = self._lossless_on(n, device)
        return {n: out[n] for n in names}

    def decode_into(self, out: Mapping[str, Any]) -> None:
        """Decodes into existing tensors: ``out[name]`` (a torch tensor or numpy array of the
        tensor's shape) receives ``decode(dtype=<its dtype>)[name]``, with no new tensor per
        name: how to load a LoRA expert into a model's own adapter weights, or an expert into
        buffers reused from one expert to the next. Like ``decode()`` it writes the task vector:
        for (IA)3 vectors and a full fine-tune's residuals that is tau, not the weight (``apply``
        gives those). Compressed tensors take a floating dtype; tensors kept exactly any dtype
        they convert to.

        Contiguous CPU tensors (and C-contiguous numpy arrays) are written by the Rust decoder
        in place, all in one parallel call with the GIL released; the others (strided, on a
        device) are decoded beside and copied in, as are tensors kept exactly. Everything is
        checked before anything is written: a ``KeyError`` names a tensor the expert lacks, a
        ``ValueError`` an output that does not fit (shape, dtype, read-only, byte order, on the
        meta device, elements sharing memory, or memory shared with another output).
        """
        torch = _torch()
        comp, names, other, spans = [], {}, [], []
        direct, views = [], []
        keys, exact, tensor = self._keys, self._exact, torch.Tensor
        for n, t in out.items():
            if n not in keys:
                raise KeyError(f"{n!r} is not in this expert")
            # The common case first (a model's weights, reused buffers): a contiguous CPU tensor
            # of a dtype we decode into, checked with a few attribute reads; it cannot repeat an
            # element, and its bytes are [data_ptr, data_ptr + nbytes).
            if (isinstance(t, tensor) and t.is_cpu and n not in exact and t.is_contiguous()
                    and _dtype_str(t) in _OUT_DTYPES):
                ptr = t.data_ptr()
                spans.append(((ptr, ptr + t.nbytes), n))
                names[n] = _dtype_str(t)
                comp.append(n)
                direct.append(n)
                views.append(_arrays.tensor_view(t.detach() if t.requires_grad else t))
                continue
            bad = _unwritable(t, n, torch)
            if bad:
                raise ValueError(f"out[{n!r}] {bad}")
            spans.append((_byte_span(t), n))
            if n in exact:
                want = tuple(self._entries[keys[n]][1])
                if tuple(t.shape) != want:
                    raise ValueError(f"out[{n!r}] has shape {tuple(t.shape)}, the expert's tensor {want}")
                other.append(n)
                continue
            try:
                names[n] = _dtype_str(t) if isinstance(t, tensor) else _arrays.dtype_name(t.dtype)
            except TypeError:
                names[n] = None
            if names[n] not in _OUT_DTYPES:
                raise ValueError(f"out[{n!r}] is {t.dtype}; a compressed tensor decodes into float16, bfloat16, "
                                 "float32 or float64: give such a tensor, or leave the name out")
            comp.append(n)
            if isinstance(t, np.ndarray):
                if t.flags.c_contiguous:
                    direct.append(n)
                    views.append(t.view(np.uint16) if t.dtype.itemsize == 2 else t)
                else:
                    other.append(n)
            else:  # strided, or on a device
                other.append(n)
        spans.sort()
        for (s0, n0), (s1, n1) in zip(spans, spans[1:]):
            if s1[0] < s0[1]:
                raise ValueError(f"out[{n0!r}] and out[{n1!r}] share memory; give each name its own tensor")
        streams = dict(zip(comp, self._parse(comp)))
        for n in comp:
            shape = tuple(streams[n].shape)
            if tuple(out[n].shape) != shape:
                raise ValueError(f"out[{n!r}] has shape {tuple(out[n].shape)}, the expert's tensor {shape}")
        # The rest decoded (or read) before anything is written: what is left can only copy.
        values = {n: self._value_for(n, out[n], torch) for n in other}
        if direct:
            _decode_streams([streams[n] for n in direct], direct, views, [names[n] for n in direct])
        for n, v in values.items():
            t = out[n]
            if isinstance(t, np.ndarray):
                np.copyto(t, v, casting="unsafe")
            else:
                with torch.no_grad():
                    t.copy_(v)

    def _value_for(self, n: str, t: Any, torch: Any) -> Any:
        """What decode_into copies into ``t`` for tensor ``n``: a numpy array for numpy outputs
        (through float32 for bfloat16, which numpy lacks), else a torch tensor on t's device."""
        if isinstance(t, np.ndarray):
            if n in self._exact:
                v = self.lossless(n)
            else:
                v = self.decode([n], dtype=_arrays.dtype_name(t.dtype))[n]
            if v.dtype == torch.bfloat16:
                try:
                    same = _arrays.dtype_name(t.dtype) == "bfloat16"
                except TypeError:
                    same = False
                return v.view(torch.int16).numpy().view(t.dtype) if same else v.float().numpy()
            return v.numpy()
        dev = None if t.device.type == "cpu" else t.device
        return self._lossless_on(n, dev) if n in self._exact else self.decode([n], dtype=t.dtype, device=dev)[n]

    def _parse(self, names: List[str]) -> List[Any]:
        return self._file.streams([self._keys[n] for n in names]) if names else []

    def _orig_dtype(self, name: str, stream: Any) -> str:
        return str(self._dtypes.get(name) or stream.dtype)

    def _lossless_on(self, name: str, device: Any) -> Any:
        t = self.lossless(name)
        return t if _arrays.torch_device(device) is None else t.to(device)

    def apply(self, base: Optional[Mapping[str, Any]] = None, *, device: Any = None) -> Dict[str, Any]:
        """theta_init + reconstruction for every tensor: base[name] + tau for a full fine-tune's
        residuals (``base`` required), 1 + tau for (IA)3 vectors, tau for LoRA factors, the stored
        tensor for those kept exactly. Sums are taken in float32 (float64 for float64 bases) and
        cast once. The result holds every key of ``base`` too (unchanged where the expert has
        none)."""
        out: Dict[str, Any] = dict(base) if base is not None else {}
        names = self.compressed_keys()
        streams = self._parse(names)
        bases: Dict[str, Any] = {}
        wide: List[str] = []
        for n, s in zip(names, streams):
            init = self.init_of(n)
            if init == "base":
                if base is None or n not in base:
                    raise ValueError(f"tensor {n!r} is a delta from a base checkpoint: pass base=... with it")
                b = bases[n] = _as_torch(base[n])
                if tuple(b.shape) != tuple(s.shape):
                    raise ValueError(f"tensor {n!r}: base shape {tuple(b.shape)} differs from {tuple(s.shape)}")
            wide.append(tau_dtype(init, self._orig_dtype(n, s), bases.get(n)))
        taus = _decode_parsed(names, streams, wide, device)
        for n, s in zip(names, streams):
            out[n] = reconstruct(self.init_of(n), taus[n], bases.get(n), self._orig_dtype(n, s))
        for n in self.lossless_keys():
            out[n] = self._lossless_on(n, device)
        return out

    # -- files ------------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """Writes the expert file (a valid safetensors file) through a temporary file that is
        synced and renamed into place."""
        return atomic_file(path, lambda tmp: self._file.write_to(str(tmp)))

    def to_bytes(self) -> bytes:
        """The bytes :meth:`save` writes."""
        return self._file.to_bytes()

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview]) -> "CompressedExpert":
        """An expert from the bytes of its file."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        return cls(ExpertFile.from_bytes(bytes(data)))

    # -- report -----------------------------------------------------------------------------
    def summary(self) -> ExpertSummary:
        """Sizes per tensor and in total, against fp16 and two bounds of the payload: the i.i.d.
        entropy bound and the adaptive one (:func:`compeft_rs.adaptive_bound_bits`, which reads
        each tensor's bitmasks)."""
        s = ExpertSummary()
        shapes: Dict[str, Tuple[int, ...]] = {}
        parsed = dict(zip(self.compressed_keys(), self._parse(self.compressed_keys())))
        for name in self.keys():
            key = self._keys[name]
            nbytes = int(self._entries[key][2])
            if name in self._exact:
                shape = tuple(self._entries[key][1])
                numel = math.prod(shape)
                row = {"name": name, "shape": shape, "density": 1.0, "lossless": True, "coding": "exact"}
            else:
                c = CompressedTensor(parsed[name], "torch")
                shape, numel = c.shape, c.numel
                s.compressed_params += numel
                s.entropy_bound_bytes += _entropy_bound_bits(numel, c.density) / 8 if numel else 0.0
                s.adaptive_bound_bytes += adaptive_bound_bits(c) / 8
                coding = c.encoding if c.encoding == "bitmask" else ("rows" if c.row_length else "rice")
                row = {"name": name, "shape": shape, "density": c.density, "lossless": False, "coding": coding}
            shapes[name] = shape
            s.total_params += numel
            row.update(
                numel=numel,
                bytes=nbytes,
                bits_per_param=8 * nbytes / numel if numel else 0.0,
                ratio_vs_fp16=2 * numel / nbytes if nbytes else float("inf"),
            )
            s.rows.append(row)
        s.fp16_file_bytes = fp16_file_size(shapes)
        s.file_bytes = self.nbytes
        return s

    def __repr__(self) -> str:
        return (
            f"CompressedExpert({len(self.compressed_keys())} compressed + {len(self._exact)} exact tensors, "
            f"k={self.k}, alpha={self.alpha}, scope={self.scope!r}, scale={self.scale!r}, "
            f"encoding={self.encoding!r})"
        )


def tau_dtype(init: Optional[str], dtype: str, base: Any = None) -> str:
    """The dtype tau is decoded in before theta_init is added: float32 (float64 for a float64
    base) where a sum follows, the tensor's own dtype for a delta from 0."""
    if init == "base":
        return "float64" if _dtype_str(base) == "float64" else "float32"
    if init == "one":
        return "float32"
    return dtype


def _decode_parsed(names: List[str], streams: List[Any], dtypes: List[str], device: Any = None) -> Dict[str, Any]:
    """Decodes parsed streams: on the CPU in one parallel call into Rust, into one buffer per
    dtype; on a device by expanding each stream's 2-bit form there."""
    if not names:
        return {}
    dev = _arrays.torch_device(device)
    if dev is not None:
        from ._tensor import _expand_on_device

        return {n: _expand_on_device(s, dt, dev) for n, s, dt in zip(names, streams, dtypes)}
    outs, views = _alloc_outputs([tuple(s.shape) for s in streams], dtypes)
    _decode_streams(streams, names, views, dtypes)
    return dict(zip(names, outs))


def reconstruct(init: Optional[str], tau: Any, base: Any, dtype: str) -> Any:
    """theta_init + tau in the dtype the tensor had: ``tau`` is float32 (float64 for a float64
    base) except for deltas from 0, which are decoded straight into ``dtype``. The one rule used
    by :meth:`CompressedExpert.apply` and :func:`compeft_rs.apply_checkpoint`."""
    torch = _torch()
    if init == "base":
        return (base.to(device=tau.device, dtype=tau.dtype) + tau).to(base.dtype)
    if init == "one":
        return (tau + 1.0).to(getattr(torch, dtype))
    return tau.to(getattr(torch, dtype))


def _alloc_outputs(shapes: Sequence[Tuple[int, ...]], dtypes: Sequence[str]) -> Tuple[List[Any], List[np.ndarray]]:
    """A new torch tensor per output, as safetensors loads them (memory freed by one load is
    reused by the next, and no tensor shares storage with another); and the numpy views Rust
    writes into (uint16 for half types)."""
    torch = _torch()
    outs: List[Any] = []
    views: List[Any] = []
    for shape, dt in zip(shapes, dtypes):
        t = torch.empty(shape, dtype=getattr(torch, dt))
        outs.append(t)
        views.append(_arrays.tensor_view(t))
    return outs, views


def load_expert(path: PathLike) -> CompressedExpert:
    """Opens a file written by :meth:`CompressedExpert.save`: the file is read into memory once
    (not mapped, so that truncating or rewriting it later cannot crash the process or change what
    was checked) and its header checked; tensors are decoded when asked for."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist or is not a file")
    try:
        storage = ExpertFile.open(str(p))
    except CompeftError as e:
        raise CompeftError(f"{p}: {e}") from None
    return CompressedExpert(storage, path=p, where=str(p))


def _check_scope(scope: Any) -> Optional[str]:
    if scope not in (None, "global", "per_tensor"):
        raise ValueError(f"scope must be 'global', 'per_tensor' or None (the default for the expert's kind), "
                         f"got {scope!r}")
    return scope


def _is_ia3(names: Iterable[str]) -> bool:
    """Whether the tensors are an (IA)3 adapter's: (IA)3 vectors and no LoRA factor."""
    names = list(names)
    return any(is_ia3_vector(n) for n in names) and not lora_pairs(names)


def default_scope(names: Iterable[str], allocate: str = "uniform") -> str:
    """The scope of ``scope=None``, from the names of the tensors compressed: "global" for (IA)3
    vectors, "per_tensor" for everything else (LoRA factors: global top-k over raw factors keeps
    almost only lora_A entries; a full fine-tune's residuals and task vectors: per-tensor kept
    the outputs closer with ``"pair_proj"``) and whenever ``allocate`` chooses densities per
    tensor. Chosen by the accuracy study on validation (README, "Accuracy on real experts")."""
    return "global" if allocate == "uniform" and _is_ia3(names) else "per_tensor"


def default_scale(names: Iterable[str]) -> str:
    """The scale rule of ``scale=None``: ``"pair"`` (the norm rule) for (IA)3 vectors, whose
    dense, multiplicative changes the projection overshoots, ``"pair_proj"`` for everything else.
    Chosen by the same study."""
    return "pair" if _is_ia3(names) else "pair_proj"


def _check_scale(scale: Any) -> Optional[str]:
    """``scale`` checked; None (the default for the expert's kind) passes."""
    return None if scale is None else check_scale(scale)


def _meta_of(tensors: Mapping[str, Any]) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    return {n: (_dtype_str(_as_torch(t)), tuple(t.shape)) for n, t in tensors.items()}


def residual(t: Any, b: Any) -> Any:
    """t - b in float32 (float64 if either is), taken in chunks so that a half-precision pair
    needs one float32 output and no float32 copies of both inputs."""
    torch = _torch()
    wide = torch.float64 if torch.float64 in (t.dtype, b.dtype) else torch.float32
    t, b = t.detach().reshape(-1), b.detach().to(t.device).reshape(-1)
    out = torch.empty(t.numel(), dtype=wide, device=t.device)
    for i in range(0, t.numel(), RESIDUAL_CHUNK):
        j = i + RESIDUAL_CHUNK
        out[i:j].copy_(t[i:j])
        out[i:j].sub_(b[i:j])
    return out


def delta_of(plan: TensorPlan, t: Any, base: Any = None) -> Any:
    """The task vector of one tensor under its plan."""
    torch = _torch()
    if plan.init == "base":
        return residual(t, base).reshape(t.shape)
    if plan.init == "one":
        return t.detach().to(torch.float32) - 1.0
    return t


# Input bytes per-tensor compression reads before encoding them in one parallel call: enough
# tensors to keep every thread busy (a 7B LoRA's 256 factors are 33 MB in all), few enough that
# a full fine-tune's residuals are read a slice at a time.
_BATCH_BYTES = 16 << 20


def encode_deltas(
    names: Sequence[str],
    source: Callable[[str], Any],
    ks: Sequence[float],
    alpha: float,
    scope: str,
    encoding: str,
    progress: Callable[[Sequence[str], str], Iterable[str]] = lambda names, desc: names,
    scale: str = "std",
    allocate: str = "uniform",
    peft_config: Optional[Mapping[str, Any]] = None,
) -> Dict[float, Dict[str, CompressedTensor]]:
    """Compresses the task vectors ``source(name)`` for every density in ``ks``.

    The one selection path: in global scope a streaming radix select over all tensors in sorted
    name order (which also orders ties), fed one tensor at a time, its first-level histogram
    shared by every k; in per-tensor scope one parallel call into Rust per k. ``scale`` is "std"
    (alpha * sigma) or "mean" (alpha * mean |tau| of the kept entries, over the tensor or, in
    global scope, over all of them). ``allocate="error"`` spreads each k over the tensors (a
    density per unit from a grid around k; see ``compeft_rs._allocate``).
    """
    names = sorted(names)
    out: Dict[float, Dict[str, CompressedTensor]] = {float(k): {} for k in ks}
    if not names:
        return out
    if allocate != "uniform":
        grids = {float(k): density_grid(float(k)) for k in ks}
        # Densities are chosen for the rule's own scales (alpha 1); alpha then multiplies every
        # stored scale, as it always does, so that tune's alphas reuse one allocation.
        tried = encode_deltas(names, source, sorted({g for gr in grids.values() for g in gr}), 1.0, scope,
                              encoding, progress, scale=scale)
        for k, grid in grids.items():
            st = choose(names, source, {g: tried[g] for g in grid}, k, peft_config)
            out[k] = {n: CompressedTensor(c._stream.with_scale(c.scale * alpha), c._kind) for n, c in st.items()
                      } if alpha != 1.0 else st
        return out
    # "pair" ("pair_proj") starts from the norm (proj) scale of every tensor, then sets each LoRA
    # pair's product.
    base_rule = PAIR_BASE.get(scale, scale)

    def flat(n: str) -> Tuple[Any, str, Tuple[int, ...]]:
        arr, dt, shape, _, _ = _arrays.flat_input(source(n))
        return arr, dt, shape

    if scope == "per_tensor":
        # Tensors are read and encoded in batches of about _BATCH_BYTES of input, so that a
        # full fine-tune's residuals (computed one tensor at a time by `source`) are never all
        # in memory; only LoRA factors, which the pair rule reads again, are kept (small).
        paired = {n for p in lora_pairs(names) for n in p} if scale in PAIR_BASE else set()
        read: Dict[str, Tuple[Any, str, Tuple[int, ...]]] = {}
        batch: List[Tuple[str, Any, str, List[int]]] = []
        size = 0

        def encode_batch() -> None:
            for k in ks:
                streams = _encode_many(batch, float(k), alpha, encoding, base_rule)
                out[float(k)].update((n, CompressedTensor(s, "torch")) for (n, *_), s in zip(batch, streams))
            batch.clear()

        for n in progress(names, "read"):
            arr, dt, shape = flat(n)
            batch.append((n, arr, dt, list(shape)))
            if n in paired:
                read[n] = (arr, dt, tuple(shape))
            size += arr.nbytes
            if size >= _BATCH_BYTES:
                encode_batch()
                size = 0
        if batch:
            encode_batch()
        if scale in PAIR_BASE:
            for k in ks:
                out[float(k)] = pair_rescale(out[float(k)], source, alpha, read.__getitem__, scale)
        return out

    def feed(sel: Any, desc: str) -> None:
        for n in progress(names, desc):
            arr, dt, _ = flat(n)
            try:
                sel.feed(arr, dt)
            except ValueError as e:
                raise ValueError(f"tensor {n!r}: {e}") from None

    dtypes, d = [], 0
    for n in names:
        arr, dt, _ = flat(n)
        dtypes.append(dt)
        d += arr.size
    first = Selector(dtypes, d, float(ks[0]))
    feed(first, "select (pass 1)")
    for k in ks:
        sel = first.with_density(float(k))
        level = 1
        while not sel.finish_level():
            level += 1
            feed(sel, f"select (pass {level})")
        thr = sel.threshold()
        ties = thr.ties
        value = alpha * sel.sigma if base_rule == "std" else 0.0
        streams, kept_sum, nnz = {}, 0.0, 0
        for n in progress(names, "encode"):
            arr, dt, shape = flat(n)
            s, left = _encode_with_threshold(arr, dt, list(shape), thr, ties, value, encoding)
            if base_rule != "std":
                kept_sum += _kept_abs_sum(arr, dt, thr, ties - left)
                nnz += s.nnz
            ties = left
            streams[n] = s
        if base_rule != "std" and nnz:
            value = alpha * _scale_value(base_rule, kept_sum, nnz, sel.norm)
            streams = {n: s.with_scale(value) for n, s in streams.items()}
        out[float(k)] = {n: CompressedTensor(s, "torch") for n, s in streams.items()}
        if scale in PAIR_BASE:
            out[float(k)] = pair_rescale(out[float(k)], source, alpha, rule=scale)
    return out


def _scale_value(rule: str, kept_sum: float, nnz: int, norm: float) -> float:
    """The data-free scales of one group of kept entries (as the Rust side computes them per
    tensor): mean |tau| of the kept, ||tau|| / sqrt(nnz), or ||tau||^2 / sum of the kept |tau|."""
    if rule == "mean":
        return kept_sum / nnz
    if rule == "norm":
        return norm / math.sqrt(nnz)
    return norm * norm / kept_sum if kept_sum > 0 else 0.0


def _raw_entry(key: str, t: Any) -> Tuple[str, str, List[int], np.ndarray]:
    torch = _torch()
    name = _dtype_str(t)
    if name not in _ST_BY_TORCH:
        raise TypeError(f"cannot store a {name} tensor exactly; convert it to a supported dtype first")
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    return key, _ST_BY_TORCH[name], list(t.shape), data


def build_expert(
    streams: Mapping[str, CompressedTensor],
    exact: Mapping[str, Any],
    info: Dict[str, Any],
    peft_config: Optional[Dict[str, Any]] = None,
) -> CompressedExpert:
    """Serialises streams and exactly-kept tensors into an expert file in memory."""
    names = sorted(set(streams) | set(exact))
    keys = {n: str(i) for i, n in enumerate(names)}
    info = dict(info, file_version=FILE_VERSION, names=pack_names(names))
    md = {"format": FILE_FORMAT, "compeft": json.dumps(info, separators=(",", ":"))}
    if peft_config is not None:
        md["peft_config"] = deflate_json(peft_config, len(names), "adapter config")
    raw = [_raw_entry(keys[n], _as_torch(t)) for n, t in exact.items()]
    storage = ExpertFile.build([(keys[n], streams[n]._stream) for n in names if n in streams], raw, md)
    return CompressedExpert(storage)


def expert_info(k: float, alpha: float, scope: str, encoding: str, plans: Mapping[str, TensorPlan],
                streams: Mapping[str, CompressedTensor], dtypes: Mapping[str, str],
                scale: str = "std", gauge: str = "as_trained", allocate: str = "uniform") -> Dict[str, Any]:
    """The codec parameters stored in a file's metadata; only what differs from the defaults is
    listed per tensor, to keep small experts small. ``gauge`` and ``allocate`` are stored only
    when they are not the defaults (files without them, written before they existed, were
    compressed as trained, at one density)."""
    inits = [p.init for p in plans.values() if p.init is not None]
    default = "base" if "base" in inits else "zero"
    extra = {} if gauge == "as_trained" else {"gauge": gauge}
    if allocate != "uniform":
        extra["allocate"] = allocate
    return {
        "library": "compeft-rs",
        "k": k,
        "alpha": alpha,
        "scope": scope,
        "scale": scale,
        "encoding": encoding,
        "default_init": default,
        "init": {n: p.init for n, p in plans.items() if p.init is not None and p.init != default},
        "dtypes": {n: dtypes[n] for n, c in streams.items() if dtypes[n] != c.dtype_name},
        "lossless": sorted(n for n, p in plans.items() if p.exact),
        **extra,
    }


def compress_expert_densities(
    tensors: Mapping[str, Any],
    ks: Sequence[float],
    alpha: float = 1.0,
    *,
    base: Optional[Mapping[str, Any]] = None,
    scope: Optional[str] = None,
    scale: Optional[str] = None,
    encoding: str = "golomb",
    lossless: Iterable[str] = (),
    peft_config: Optional[Dict[str, Any]] = None,
    gauge: str = "balanced",
    allocate: str = "uniform",
) -> Dict[float, CompressedExpert]:
    """compress_expert for several densities at once, one selection shared by all of them."""
    checked = [check_k_alpha(k, alpha)[0] for k in ks]
    alpha = check_k_alpha(checked[0] if checked else 1.0, alpha)[1]
    _check_scope(scope)
    _check_scale(scale)
    check_gauge(gauge)
    check_allocate(allocate, scope or "per_tensor", encoding)
    _check_encoding(encoding)
    if base is not None:
        base = {n: _as_torch(t) for n, t in base.items()}
    tensors = {n: _as_torch(t) for n, t in tensors.items()}
    plans = plan_expert(_meta_of(tensors), peft_config=peft_config, base=None if base is None else _meta_of(base))
    for n in lossless:
        if n not in plans:
            raise KeyError(f"lossless names {n!r}, which is not among the tensors")
        plans[n] = TensorPlan(None, "kept exactly on request")
    deltas = {n: delta_of(p, tensors[n], None if base is None else base.get(n)) for n, p in plans.items()
              if not p.exact}
    # Only pairs that are compressed as deltas from 0 (LoRA factors): a factor kept exactly or
    # taken against a base is not one the gauge may rewrite. An expert without such pairs is
    # recorded as compressed as given.
    pairs = [(na, nb) for na, nb in lora_pairs(list(deltas)) if plans[na].init == plans[nb].init == "zero"]
    if not pairs:
        gauge = "as_trained"
    if gauge == "balanced":
        for (na, nb), ab in zip(pairs, balance_pairs([(deltas[na], deltas[nb]) for na, nb in pairs])):
            deltas[na], deltas[nb] = ab
    exact = {n: tensors[n] for n, p in plans.items() if p.exact}
    dtypes = {n: _dtype_str(tensors[n]) for n in deltas}
    scope = scope or default_scope(deltas, allocate)
    scale = scale or default_scale(deltas)
    per_k = encode_deltas(list(deltas), deltas.__getitem__, checked, alpha, scope, encoding, scale=scale,
                          allocate=allocate, peft_config=peft_config)
    return {
        k: build_expert(st, exact, expert_info(k, alpha, scope, encoding, plans, st, dtypes, scale, gauge, allocate),
                        peft_config)
        for k, st in per_k.items()
    }


def compress_expert(
    tensors: Union[Mapping[str, Any], PathLike],
    k: float,
    alpha: float = 1.0,
    *,
    base: Union[Mapping[str, Any], PathLike, None] = None,
    scope: Optional[str] = None,
    scale: Optional[str] = None,
    encoding: str = "golomb",
    lossless: Iterable[str] = (),
    peft_config: Optional[Dict[str, Any]] = None,
    gauge: str = "balanced",
    allocate: str = "uniform",
) -> CompressedExpert:
    """Compresses a whole expert with ComPEFT.

    Args:
        tensors: name -> tensor (torch or numpy), or a safetensors file / checkpoint folder.
        k: density in (0, 1]. alpha: scale multiplier, finite and > 0.
        base: the base checkpoint (dict or path) of a full fine-tune; each tensor the base has
            is compressed as tensors - base (in float32, float64 if either is), the rest kept
            exactly.
        scope: "per_tensor" (each tensor keeps its own top k) or "global" (one threshold over
            all compressed tensors, in sorted name order); None (the default) picks by kind:
            "global" for (IA)3 vectors, "per_tensor" for everything else (LoRA factors, a full
            fine-tune's residuals, task vectors) and with ``allocate="error"``, as the study in
            README chose. The file records the scope used.
        scale: how each stream's one magnitude is chosen, times alpha (see ``compeft_rs._scale``):
            "pair_proj" (each LoRA pair's product B.A is scaled so that its projection on the
            trained B.A is B.A, other tensors so that theirs on themselves is), "pair" (the same
            with L2 norms), "proj", "norm", "mean" or "std". None (the default) picks by kind:
            "pair" for (IA)3 vectors, "pair_proj" for everything else. ``scope="global",
            scale="std"`` is the paper's Algorithm 1 (tune alpha with it). The defaults were
            chosen by the study in README ("Accuracy on real experts"); the file records the rule.
        lossless: names to keep exactly besides those the rules keep.
        peft_config: the adapter config, stored in the file and used by the rules.
        gauge: which factorisation of each LoRA pair is compressed (see ``compeft_rs._gauge``):
            "balanced" (the default: each pair rewritten as B' = U S^1/2, A' = S^1/2 V^T from the
            SVD of B A before compression: the same adapter, other factors) or "as_trained" (the
            factors as given). It applies to the pairs ``lora_A``/``lora_B`` and
            ``lora_embedding_A``/``lora_embedding_B`` compressed from 0; factors of other shapes
            (conv LoRA, a rank mismatch) and pairs with B A = 0 are compressed as given, every
            other tensor is unchanged. Recorded in the file (:attr:`CompressedExpert.gauge`).
        allocate: how density is spread over the tensors (see ``compeft_rs._allocate``):
            "uniform" (the default: every tensor at density k) or "error" (per-tensor scope only:
            each LoRA pair, and each other tensor, gets the density from a grid around k that
            minimises the summed squared error of what the model applies, scaling * B.A for a
            pair, within the stream bytes of the uniform choice). Then k sets a byte budget: the
            streams take no more bytes than at density k everywhere (the file may be some tens
            of bytes larger: stream headers deflate less well when densities differ), and the
            overall density may differ from k in either direction (denser tensors cost fewer
            bits per kept entry). Golomb encoding only. It keeps nine candidate streams of every
            tensor in memory (about a byte per parameter at k = 0.1) and decodes each. Recorded
            in the file (:attr:`CompressedExpert.allocate`).

    Which tensors are compressed from which theta_init, and which are kept exactly, is decided
    by one rule for every path (see ``compeft_rs._plan``): LoRA factors from 0, (IA)3 vectors from
    1, a fine-tune from its base; DoRA magnitudes, ``modules_to_save`` copies, non-float tensors
    and, in an adapter, anything that is not a LoRA factor or (IA)3 vector, exactly; a plain dict
    with no adapter tensor is a set of task vectors (from 0).

    >>> import torch, compeft_rs
    >>> sd = {"a.lora_A.weight": torch.randn(8, 64), "a.lora_B.weight": torch.randn(64, 8)}
    >>> e = compeft_rs.compress_expert(sd, k=0.1)
    >>> sorted(e.keys()) == sorted(sd) and e["a.lora_A.weight"].shape == (8, 64)
    True
    """
    k, alpha = check_k_alpha(k, alpha)
    if isinstance(tensors, (str, os.PathLike)):
        tensors = load_tensors(tensors)
    if isinstance(base, (str, os.PathLike)):
        base = load_tensors(base)
    return compress_expert_densities(
        tensors, [k], alpha, base=base, scope=scope, scale=scale, encoding=encoding, lossless=lossless,
        peft_config=peft_config, gauge=gauge, allocate=allocate,
    )[k]
