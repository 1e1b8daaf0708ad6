"""Whole experts: many tensors compressed together, stored as one safetensors-compatible file."""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _arrays
from ._core import CompeftError, Selector
from ._core import encode_with_threshold as _encode_with_threshold
from ._core import encode as _encode
from ._core import encode_global as _encode_global
from ._core import entropy_bound_bits as _entropy_bound_bits
from ._tensor import CompressedTensor, _check_encoding, check_k_alpha

__all__ = ["CompressedExpert", "compress_expert", "load_expert", "ExpertSummary", "load_tensors"]

PathLike = Union[str, "os.PathLike[str]"]
FILE_FORMAT = "compeft"
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


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


def _dtype_str(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def is_ia3(name: str) -> bool:
    """(IA)3 scaling vectors start from 1, not 0 (DESIGN.md section 1)."""
    return ".ia3_l" in name or name.endswith("ia3_l")


def _is_float(t: Any) -> bool:
    return _dtype_str(t) in FLOAT_NAMES


def checkpoint_files(path: PathLike) -> List[Path]:
    """The safetensors files of a checkpoint: a file, or a folder (sharded with an index, or not)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        return [p]
    index = p / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
        out.update(load_file(str(f)))
    return out


def pack_names(names: List[str]) -> str:
    """Tensor names, deflated: they share long prefixes, and in a small expert they would
    otherwise outweigh the compressed streams."""
    return base64.b64encode(zlib.compress("\n".join(names).encode(), 9)).decode()


def unpack_names(packed: str, count: int, where: str) -> List[str]:
    try:
        names = zlib.decompress(base64.b64decode(packed, validate=True)).decode().split("\n")
    except (ValueError, zlib.error, UnicodeDecodeError) as e:
        raise CompeftError(f"{where}: corrupt tensor name list: {e}") from None
    if count == 0 and names == [""]:
        return []
    if len(names) != count or len(set(names)) != count:
        raise CompeftError(f"{where}: the name list holds {len(names)} names for {count} tensors")
    return names


def _stream_tensor(c: CompressedTensor) -> Any:
    torch = _torch()
    return torch.frombuffer(bytearray(c.to_bytes()), dtype=torch.uint8)


def atomic_save_safetensors(tensors: Mapping[str, Any], path: PathLike, metadata: Dict[str, str]) -> None:
    """Writes to a temporary file beside `path` and renames it into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """Sizes of a compressed expert, per tensor and in total. ``str()`` gives a table."""

    rows: List[Dict[str, Any]] = field(default_factory=list)
    total_params: int = 0
    compressed_params: int = 0
    file_bytes: int = 0
    fp16_file_bytes: int = 0
    entropy_bound_bytes: float = 0.0

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_file_bytes / self.file_bytes if self.file_bytes else float("inf")

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [f"{'tensor':<60} {'shape':>14} {'density':>8} {'bytes':>9} {'bits/param':>10} {'vs fp16':>8}"]
        for r in self.rows:
            dens = "lossless" if r["lossless"] else f"{r['density']:.4f}"
            lines.append(
                f"{r['name'][-60:]:<60} {str(tuple(r['shape'])):>14} {dens:>8} {r['bytes']:>9} "
                f"{r['bits_per_param']:>10.3f} {r['ratio_vs_fp16']:>7.1f}x"
            )
        lines.append(
            f"total: {len(self.rows)} tensors, {self.total_params:,} params; file {self.file_bytes:,} B "
            f"({self.bits_per_param:.3f} bits/param) against fp16 file {self.fp16_file_bytes:,} B: "
            f"{self.ratio_vs_fp16:.1f}x smaller; entropy bound of the payload {self.entropy_bound_bytes:,.0f} B"
        )
        return "\n".join(lines)


class CompressedExpert:
    """A compressed expert: one CompressedTensor per delta tensor, lossless copies of the rest.

    Made by :func:`compress_expert`, :func:`compeft_rs.compress_peft` or :func:`load_expert`.
    Tensors loaded from a file are read and decoded one at a time, on access.
    """

    def __init__(
        self,
        streams: Mapping[str, CompressedTensor],
        lossless: Mapping[str, Any],
        info: Dict[str, Any],
        *,
        path: Optional[Path] = None,
        peft_config: Optional[Dict[str, Any]] = None,
        file_keys: Optional[Dict[str, str]] = None,
    ) -> None:
        self._streams: Dict[str, Optional[CompressedTensor]] = dict(streams)
        # Tensor name -> key in the file it was loaded from.
        self._file_keys = file_keys or {}
        self._lossless: Dict[str, Any] = dict(lossless)
        self._info = info
        self._path = path
        self.peft_config = peft_config

    # -- mapping ----------------------------------------------------------------------------
    def keys(self) -> List[str]:
        """All tensor names, sorted."""
        return sorted(set(self._streams) | set(self._lossless))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._streams) + len(self._lossless)

    def __contains__(self, name: object) -> bool:
        return name in self._streams or name in self._lossless

    def __getitem__(self, name: str) -> Any:
        """The decoded task vector of one tensor (only that tensor is read)."""
        return self.decode_tensor(name)

    @property
    def k(self) -> float:
        return float(self._info["k"])

    @property
    def alpha(self) -> float:
        return float(self._info["alpha"])

    @property
    def scope(self) -> str:
        return str(self._info["scope"])

    @property
    def encoding(self) -> str:
        return str(self._info["encoding"])

    def compressed_keys(self) -> List[str]:
        return sorted(self._streams)

    def lossless_keys(self) -> List[str]:
        return sorted(self._lossless)

    def init_of(self, name: str) -> str:
        """theta_init of a compressed tensor: "zero" (LoRA factors), "one" ((IA)3) or "base"."""
        return str(self._info.get("init", {}).get(name, self._info.get("default_init", "zero")))

    def dtype_of(self, name: str) -> str:
        """The dtype the tensor had before compression."""
        return str(self._info.get("dtypes", {}).get(name) or self.stream(name).dtype_name)

    # -- access -----------------------------------------------------------------------------
    def stream(self, name: str) -> CompressedTensor:
        """The CompressedTensor of a compressed tensor."""
        if name not in self._streams:
            raise KeyError(f"{name!r} is not a compressed tensor of this expert")
        c = self._streams[name]
        if c is None:
            from safetensors import safe_open

            assert self._path is not None
            with safe_open(str(self._path), framework="pt") as f:
                data = f.get_tensor(self._file_keys[name]).numpy().tobytes()
            return CompressedTensor.from_bytes(data, kind="torch")
        return c

    def lossless(self, name: str) -> Any:
        t = self._lossless[name]
        if t is None:
            from safetensors import safe_open

            assert self._path is not None
            with safe_open(str(self._path), framework="pt") as f:
                t = f.get_tensor(self._file_keys[name])
        return t

    def decode_tensor(self, name: str, dtype: Any = None, device: Any = None) -> Any:
        if name in self._lossless:
            t = self.lossless(name)
            return t.to(device) if device is not None else t
        if name not in self._streams:
            raise KeyError(f"{name!r} is not in this expert")
        c = self.stream(name)
        return c.decode(dtype=dtype or self.dtype_of(name), device=device)

    def decode(self, dtype: Any = None, device: Any = None) -> Dict[str, Any]:
        """The reconstructed task vector: same keys, shapes and dtypes (lossless tensors as
        stored). ``device`` expands each tensor there (see CompressedTensor.decode)."""
        return {n: self.decode_tensor(n, dtype=dtype, device=device) for n in self.keys()}

    def apply(self, base: Optional[Mapping[str, Any]] = None, device: Any = None) -> Dict[str, Any]:
        """theta_init + reconstruction for every tensor: base[name] + tau for full fine-tunes
        (``base`` required), 1 + tau for (IA)3 vectors, tau for LoRA factors. The result holds
        every key of ``base`` too (unchanged where the expert has no delta)."""
        torch = _torch()
        out: Dict[str, Any] = dict(base) if base is not None else {}
        for name in self.keys():
            if name in self._lossless:
                out[name] = self.decode_tensor(name, device=device)
                continue
            tau = self.decode_tensor(name, device=device)
            init = self.init_of(name)
            if init == "base":
                if base is None or name not in base:
                    raise ValueError(f"tensor {name!r} is a delta from a base checkpoint: pass base=... with it")
                b = _as_torch(base[name])
                if tuple(b.shape) != tuple(tau.shape):
                    raise ValueError(f"tensor {name!r}: base shape {tuple(b.shape)} differs from {tuple(tau.shape)}")
                wide = torch.float64 if b.dtype == torch.float64 else torch.float32
                out[name] = (b.to(device=tau.device, dtype=wide) + tau.to(wide)).to(b.dtype)
            elif init == "one":
                out[name] = (1.0 + tau.to(torch.float32)).to(tau.dtype)
            else:
                out[name] = tau
        return out

    # -- files ------------------------------------------------------------------------------
    def _metadata(self) -> Dict[str, str]:
        info = dict(self._info, names=pack_names(self.keys()))
        md = {"format": FILE_FORMAT, "compeft": json.dumps(info, separators=(",", ":"))}
        if self.peft_config is not None:
            md["peft_config"] = json.dumps(self.peft_config, separators=(",", ":"), default=list)
        return md

    def _tensors_for_file(self) -> Dict[str, Any]:
        """Tensors under short keys, the position of their name in the packed name list."""
        return {
            str(i): _stream_tensor(self.stream(n)) if n in self._streams else self.lossless(n)
            for i, n in enumerate(self.keys())
        }

    def save(self, path: PathLike) -> None:
        """Writes one safetensors file (compressed streams as 1-D U8 tensors, codec parameters
        in ``__metadata__``) through a temporary file renamed into place."""
        atomic_write_bytes(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The same bytes :meth:`save` writes."""
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self._tensors_for_file().items()}, metadata=self._metadata())

    @classmethod
    def from_bytes(cls, data: bytes) -> "CompressedExpert":
        from safetensors.torch import load

        md = _safetensors_metadata_from_bytes(data)
        try:
            stored = load(bytes(data))
        except Exception as e:  # safetensors raises its own error types for bad bytes
            raise CompeftError(f"not a readable safetensors file: {e}") from None
        info, peft_config = _parse_metadata(md, "<bytes>")
        keys = _file_key_map(info, stored.keys(), "<bytes>")
        tensors = {n: stored[k] for n, k in keys.items()}
        lossless_names = set(info.get("lossless", []))
        streams = {
            n: CompressedTensor.from_bytes(t.numpy().tobytes(), kind="torch")
            for n, t in tensors.items()
            if n not in lossless_names
        }
        lossless = {n: t for n, t in tensors.items() if n in lossless_names}
        return cls(streams, lossless, info, peft_config=peft_config)

    # -- report -----------------------------------------------------------------------------
    def summary(self, file_bytes: Optional[int] = None) -> ExpertSummary:
        """Sizes per tensor and in total, against fp16 and the entropy bound."""
        s = ExpertSummary()
        shapes: Dict[str, Tuple[int, ...]] = {}
        for name in self.keys():
            if name in self._streams:
                c = self.stream(name)
                shape, numel, nbytes = c.shape, c.numel, c.nbytes
                s.compressed_params += numel
                s.entropy_bound_bytes += _entropy_bound_bits(numel, c.density) / 8 if numel else 0.0
                row = {"name": name, "shape": shape, "density": c.density, "lossless": False}
            else:
                t = self.lossless(name)
                shape, numel, nbytes = tuple(t.shape), t.numel(), t.numel() * t.element_size()
                row = {"name": name, "shape": shape, "density": 1.0, "lossless": True}
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
        if file_bytes is None:
            file_bytes = self._path.stat().st_size if self._path is not None else len(self.to_bytes())
        s.file_bytes = file_bytes
        return s

    def __repr__(self) -> str:
        return (
            f"CompressedExpert({len(self._streams)} compressed + {len(self._lossless)} lossless tensors, "
            f"k={self.k}, alpha={self.alpha}, scope={self.scope!r}, encoding={self.encoding!r})"
        )


def _safetensors_metadata_from_bytes(data: bytes) -> Dict[str, str]:
    if len(data) < 8:
        raise CompeftError("not a safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CompeftError("not a safetensors file: header length beyond the data")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as e:
        raise CompeftError(f"not a safetensors file: {e}") from None
    md = header.get("__metadata__") or {}
    return dict(md)


def _parse_metadata(md: Mapping[str, str], where: str) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    if md.get("format") != FILE_FORMAT or "compeft" not in md:
        raise CompeftError(f"{where} is a safetensors file but not a compeft expert (no compeft metadata)")
    try:
        info = json.loads(md["compeft"])
        peft_config = json.loads(md["peft_config"]) if "peft_config" in md else None
    except ValueError as e:
        raise CompeftError(f"{where}: corrupt compeft metadata: {e}") from None
    if info.get("file_version") != 1:
        raise CompeftError(f"{where}: unsupported compeft file version {info.get('file_version')!r}")
    return info, peft_config


def load_expert(path: PathLike) -> CompressedExpert:
    """Opens a file written by :meth:`CompressedExpert.save`; tensors are read on access."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist or is not a file")
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
            names = list(f.keys())
    except CompeftError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CompeftError(f"{p} is not a readable safetensors file: {e}") from None
    info, peft_config = _parse_metadata(md, str(p))
    keys = _file_key_map(info, names, str(p))
    lossless_names = set(info.get("lossless", []))
    streams = {n: None for n in keys if n not in lossless_names}
    lossless = {n: None for n in keys if n in lossless_names}
    return CompressedExpert(streams, lossless, info, path=p, peft_config=peft_config,  # type: ignore[arg-type]
                            file_keys=keys)


def _file_key_map(info: Dict[str, Any], stored: Iterable[str], where: str) -> Dict[str, str]:
    """Tensor name -> key in the file, checked against the keys the file holds."""
    stored = set(stored)
    names = unpack_names(str(info.pop("names", "")), len(stored), where)
    keys = {n: str(i) for i, n in enumerate(names)}
    if set(keys.values()) != stored:
        raise CompeftError(f"{where}: tensor keys do not match the name list")
    return keys


def _check_scope(scope: Any) -> str:
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    return scope


def task_vectors(
    tensors: Mapping[str, Any], base: Optional[Mapping[str, Any]], lossless: Iterable[str]
) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, str], Dict[str, str]]:
    """Splits an expert into (deltas, lossless tensors, init per name, original dtype per name)."""
    torch = _torch()
    keep = set(lossless)
    deltas: Dict[str, Any] = {}
    raw: Dict[str, Any] = {}
    init: Dict[str, str] = {}
    dtypes: Dict[str, str] = {}
    for name in sorted(tensors):
        t = _as_torch(tensors[name])
        if name in keep or not _is_float(t):
            raw[name] = t
            continue
        dtypes[name] = _dtype_str(t)
        if base is not None and name in base:
            b = _as_torch(base[name])
            if tuple(b.shape) != tuple(t.shape):
                raise ValueError(
                    f"tensor {name!r}: shape {tuple(t.shape)} in the fine-tune but {tuple(b.shape)} in the base"
                )
            wide = torch.float64 if torch.float64 in (t.dtype, b.dtype) else torch.float32
            deltas[name] = t.to(wide) - b.to(device=t.device, dtype=wide)
            init[name] = "base"
        elif base is not None and not is_ia3(name) and "lora_" not in name:
            raise ValueError(f"tensor {name!r} is in the fine-tune but not in the base checkpoint")
        elif is_ia3(name):
            deltas[name] = t.to(torch.float32) - 1.0
            init[name] = "one"
        else:
            deltas[name] = t
            init[name] = "zero"
    return deltas, raw, init, dtypes


def encode_named(name: str, arr: Any, dtype: str, shape: Tuple[int, ...], k: float, alpha: float,
                 encoding: str) -> CompressedTensor:
    """Per-tensor encode whose errors name the tensor."""
    try:
        return CompressedTensor(_encode(arr, dtype, list(shape), k, alpha, encoding), "torch")
    except (ValueError, CompeftError) as e:
        raise type(e)(f"tensor {name!r}: {e}") from None


def expert_info(k: float, alpha: float, scope: str, encoding: str, default_init: str, init: Mapping[str, str],
                dtypes: Mapping[str, str], lossless: Iterable[str]) -> Dict[str, Any]:
    """The codec parameters stored in a file's metadata; only what differs from the defaults is
    listed per tensor, to keep small experts small."""
    return {
        "file_version": 1,
        "library": "compeft-rs",
        "k": k,
        "alpha": alpha,
        "scope": scope,
        "encoding": encoding,
        "default_init": default_init,
        "init": {n: v for n, v in init.items() if v != default_init},
        "dtypes": dict(dtypes),
        "lossless": sorted(lossless),
    }


def compress_expert_densities(
    tensors: Mapping[str, Any],
    ks: Sequence[float],
    alpha: float = 1.0,
    *,
    scope: str = "global",
    encoding: str = "golomb",
    lossless: Iterable[str] = (),
    peft_config: Optional[Dict[str, Any]] = None,
) -> Dict[float, CompressedExpert]:
    """compress_expert for several densities at once: the first-level magnitude histogram and the
    moments are computed once (per expert in global scope, per tensor in per-tensor scope) and
    shared by every k. Each result equals compress_expert(tensors, k, alpha, ...)."""
    _check_scope(scope)
    _check_encoding(encoding)
    deltas, raw, init, dtypes = task_vectors(tensors, None, lossless)
    names = sorted(deltas)
    flats = {n: _arrays.flat_input(deltas[n]) for n in names}
    groups = [names] if scope == "global" else [[n] for n in names]
    streams: Dict[float, Dict[str, CompressedTensor]] = {float(k): {} for k in ks}
    for group in groups:
        if not group:
            continue
        d = sum(int(np.prod(flats[n][2], dtype=np.int64)) for n in group)
        first = Selector([flats[n][1] for n in group], d, float(ks[0]))
        for n in group:
            try:
                first.feed(flats[n][0], flats[n][1])
            except ValueError as e:
                raise ValueError(f"tensor {n!r}: {e}") from None
        for k in ks:
            sel = first.with_density(float(k))
            while not sel.finish_level():
                for n in group:
                    sel.feed(flats[n][0], flats[n][1])
            thr = sel.threshold()
            ties, scale = thr.ties, alpha * sel.sigma
            for n in group:
                arr, dt, shape, _, _ = flats[n]
                s, ties = _encode_with_threshold(arr, dt, list(shape), thr, ties, scale, encoding)
                streams[float(k)][n] = CompressedTensor(s, "torch")
    out = {}
    for k, st in streams.items():
        changed = {n: dt for n, dt in dtypes.items() if dt != st[n].dtype_name}
        info = expert_info(k, alpha, scope, encoding, "zero", init, changed, raw)
        out[k] = CompressedExpert(st, raw, info, peft_config=peft_config)
    return out


def compress_expert(
    tensors: Union[Mapping[str, Any], PathLike],
    k: float,
    alpha: float = 1.0,
    *,
    base: Union[Mapping[str, Any], PathLike, None] = None,
    scope: str = "global",
    encoding: str = "golomb",
    lossless: Iterable[str] = (),
    peft_config: Optional[Dict[str, Any]] = None,
) -> CompressedExpert:
    """Compresses a whole expert with ComPEFT.

    Args:
        tensors: name -> tensor (torch or numpy), or a safetensors file / checkpoint folder.
        k: density in (0, 1]. alpha: scale multiplier, finite and > 0.
        base: the base checkpoint (dict or path) for a full fine-tune; the task vector is then
            tensors - base. Without it the tensors are the task vector (LoRA factors,
            theta_init = 0); (IA)3 vectors (names with ``ia3_l``) use theta_init = 1.
        scope: "global" (one threshold and one sigma over all tensors, the paper's default,
            in sorted name order) or "per_tensor".
        lossless: names kept exactly (non-float tensors always are).

    >>> import torch, compeft_rs
    >>> sd = {"a.lora_A.weight": torch.randn(8, 64), "a.lora_B.weight": torch.randn(64, 8)}
    >>> e = compeft_rs.compress_expert(sd, k=0.1)
    >>> sorted(e.keys()) == sorted(sd) and e["a.lora_A.weight"].shape == (8, 64)
    True
    """
    k, alpha = check_k_alpha(k, alpha)
    _check_scope(scope)
    _check_encoding(encoding)
    if isinstance(tensors, (str, os.PathLike)):
        tensors = load_tensors(tensors)
    if isinstance(base, (str, os.PathLike)):
        base = load_tensors(base)
    deltas, raw, init, dtypes = task_vectors(tensors, base, lossless)
    names = sorted(deltas)
    flats = {n: _arrays.flat_input(deltas[n]) for n in names}
    if scope == "global":
        items = [(n, flats[n][0], flats[n][1], list(flats[n][2])) for n in names]
        streams = _encode_global(items, k, alpha, encoding) if items else []
        out = {n: CompressedTensor(s, "torch") for n, s in zip(names, streams)}
    else:
        out = {}
        for n in names:
            arr, dt, shape, _, _ = flats[n]
            out[n] = encode_named(n, arr, dt, shape, k, alpha, encoding)
    changed = {n: dt for n, dt in dtypes.items() if dt != out[n].dtype_name}
    info = expert_info(k, alpha, scope, encoding, "zero", init, changed, raw)
    return CompressedExpert(out, raw, info, peft_config=peft_config)
