"""Full fine-tunes at scale: streaming compression of (sharded) safetensors checkpoints and
applying a compressed residual back onto the base with the same sharding.

Memory stays bounded by a few tensors plus the codec's buffers and the compressed output: tensors
are read one at a time from the memory-mapped shards, and global scope takes its threshold and
sigma from a streaming radix select (one pass per 16-bit digit of the magnitudes), never from a
concatenation of everything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import _arrays
from ._core import CompeftError, Selector
from ._core import encode_with_threshold as _encode_with_threshold
from ._expert import (
    FLOAT_NAMES,
    CompressedExpert,
    PathLike,
    _check_scope,
    _torch,
    atomic_save_safetensors,
    checkpoint_files,
    encode_named,
    expert_info,
    is_ia3,
    load_expert,
)
from ._tensor import CompressedTensor, _check_encoding, check_k_alpha

__all__ = ["compress_checkpoint", "apply_checkpoint"]

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class _Checkpoint:
    """Name -> file of a checkpoint; reads one tensor at a time and closes the file after."""

    def __init__(self, path: PathLike) -> None:
        from safetensors import safe_open

        self.files = checkpoint_files(path)
        self.where: Dict[str, Path] = {}
        self.meta: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for n in h.keys():
                        sl = h.get_slice(n)
                        self.where[n] = f
                        self.meta[n] = (_ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
            except Exception as e:
                raise CompeftError(f"{f} is not a readable safetensors file: {e}") from None

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as h:
            return h.get_tensor(name)


def _progress(items: List[str], desc: str, enabled: bool) -> Iterable[str]:
    if not enabled:
        return items
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, pipes, tests).
    return tqdm(items, desc=desc, unit="tensor", leave=False, disable=None)


def compress_checkpoint(
    finetuned: PathLike,
    k: float,
    alpha: float = 1.0,
    *,
    base: Optional[PathLike] = None,
    scope: str = "global",
    encoding: str = "golomb",
    progress: bool = False,
) -> CompressedExpert:
    """Compresses a checkpoint (a safetensors file or a folder of shards) tensor by tensor.

    With ``base`` the task vector is finetuned - base (computed in float32, float64 if either is);
    without it the tensors themselves are compressed ((IA)3 vectors from 1). Non-float tensors,
    and tensors the base lacks, are kept losslessly.
    """
    torch = _torch()
    k, alpha = check_k_alpha(k, alpha)
    _check_scope(scope)
    _check_encoding(encoding)
    ft = _Checkpoint(finetuned)
    bs = _Checkpoint(base) if base is not None else None
    names = sorted(ft.meta)
    deltas: List[str] = []
    lossless: List[str] = []
    init: Dict[str, str] = {}
    for n in names:
        dt, shape = ft.meta[n]
        if dt not in FLOAT_NAMES:
            lossless.append(n)
        elif bs is not None:
            if n not in bs.meta:
                lossless.append(n)
                continue
            if bs.meta[n][1] != shape:
                raise ValueError(f"tensor {n!r}: shape {shape} in the fine-tune but {bs.meta[n][1]} in the base")
            deltas.append(n)
            init[n] = "base"
        else:
            deltas.append(n)
            init[n] = "one" if is_ia3(n) else "zero"

    if not deltas:
        found = sorted({ft.meta[n][0] for n in names}) or ["no tensors"]
        raise TypeError(
            f"{finetuned} has no tensor of a supported dtype (float16, bfloat16, float32, float64) to "
            f"compress; found {', '.join(found)}"
        )

    def tau(n: str) -> Any:
        t = ft.get(n)
        if init[n] == "base":
            assert bs is not None
            b = bs.get(n)
            wide = torch.float64 if torch.float64 in (t.dtype, b.dtype) else torch.float32
            return t.to(wide) - b.to(wide)
        if init[n] == "one":
            return t.to(torch.float32) - 1.0
        return t

    def flat(n: str) -> Tuple[Any, str, Tuple[int, ...]]:
        arr, dt, shape, _, _ = _arrays.flat_input(tau(n))
        return arr, dt, shape

    streams: Dict[str, CompressedTensor] = {}
    tau_dtype = {n: ("float64" if init[n] == "base" and "float64" in (ft.meta[n][0], bs.meta[n][0]) else  # type: ignore[union-attr]
                     "float32" if init[n] != "zero" else ft.meta[n][0]) for n in deltas}
    if scope == "global" and deltas:
        d = sum(_numel(ft.meta[n][1]) for n in deltas)
        sel = Selector([tau_dtype[n] for n in deltas], d, k)
        level = 0
        while True:
            level += 1
            for n in _progress(deltas, f"select (pass {level})", progress):
                arr, dt, _ = flat(n)
                try:
                    sel.feed(arr, dt)
                except ValueError as e:
                    raise ValueError(f"tensor {n!r}: {e}") from None
            if sel.finish_level():
                break
        thr, scale, ties = sel.threshold(), alpha * sel.sigma, sel.threshold().ties
        for n in _progress(deltas, "encode", progress):
            arr, dt, shape = flat(n)
            s, ties = _encode_with_threshold(arr, dt, list(shape), thr, ties, scale, encoding)
            streams[n] = CompressedTensor(s, "torch")
    else:
        for n in _progress(deltas, "encode", progress):
            arr, dt, shape = flat(n)
            streams[n] = encode_named(n, arr, dt, shape, k, alpha, encoding)
    raw = {n: ft.get(n) for n in lossless}
    changed = {n: ft.meta[n][0] for n in deltas if ft.meta[n][0] != streams[n].dtype_name}
    info = expert_info(k, alpha, scope, encoding, "base" if bs is not None else "zero", init, changed, lossless)
    if bs is not None:
        info["sharding"] = [f.name for f in ft.files]
    return CompressedExpert(streams, raw, info)


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def apply_checkpoint(
    expert: Any, base: PathLike, out: PathLike, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Writes base + reconstruction as a checkpoint with the base's sharding: a file for a file,
    a folder (same shard names, index and other files copied) for a folder. One shard is in
    memory at a time; the output is built beside ``out`` and renamed into place."""
    from safetensors.torch import load_file

    torch = _torch()
    if not isinstance(expert, CompressedExpert):
        expert = load_expert(expert)
    base_p, out_p = Path(base), Path(out)
    if out_p.exists() and not overwrite:
        raise FileExistsError(f"{out_p} exists; pass --force (overwrite=True) to replace it")
    files = checkpoint_files(base_p)
    bc = _Checkpoint(base_p)
    missing = [n for n in expert.keys() if n not in bc.meta]
    if missing:
        raise ValueError(f"the expert has {len(missing)} tensors the base lacks, e.g. {missing[0]!r}; wrong base?")
    for n in expert.compressed_keys():
        shape = tuple(expert.stream(n).shape)
        if bc.meta[n][1] != shape:
            raise ValueError(f"tensor {n!r}: shape {shape} in the expert but {bc.meta[n][1]} in the base")

    def shard(f: Path, dest: Path) -> None:
        tensors = load_file(str(f))
        for n in list(tensors):
            if n not in expert:
                continue
            if n in expert.lossless_keys():
                tensors[n] = expert.lossless(n)
                continue
            b = tensors[n]
            tau = expert.stream(n).decode(dtype="float64" if b.dtype == torch.float64 else "float32")
            # theta_init is the base here, except for (IA)3 vectors, which start from 1.
            start = 1.0 if expert.init_of(n) == "one" else b.to(tau.dtype)
            tensors[n] = (start + tau).to(b.dtype)
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            md = h.metadata()
        atomic_save_safetensors(tensors, dest, md or {"format": "pt"})

    out_p.parent.mkdir(parents=True, exist_ok=True)
    if base_p.is_file():
        shard(base_p, out_p)
        return out_p
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.", dir=out_p.parent))
    try:
        for f in _progress(files, "apply", progress):  # type: ignore[arg-type]
            shard(Path(f), tmp / Path(f).name)
        for extra in base_p.iterdir():
            if extra.is_file() and extra.suffix != ".safetensors":
                shutil.copy2(extra, tmp / extra.name)
        if out_p.exists():
            shutil.rmtree(out_p) if out_p.is_dir() else out_p.unlink()
        os.replace(tmp, out_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_p
