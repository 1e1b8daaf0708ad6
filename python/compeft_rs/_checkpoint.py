"""Full fine-tunes at scale: streaming compression of (sharded) safetensors checkpoints and
applying a compressed residual back onto the base with the same sharding.

Memory stays bounded by a few tensors plus the codec's buffers and the compressed output: tensors
are read one at a time from the memory-mapped shards, residuals of half-precision checkpoints are
taken in chunks, and global scope takes its threshold and sigma from a streaming radix select
(one pass per 16-bit digit of the magnitudes), never from a concatenation of everything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ._core import CompeftError
from ._expert import (
    CompressedExpert,
    PathLike,
    _check_scale,
    _check_scope,
    default_scale,
    default_scope,
    _decode_parsed,
    _dtype_str,
    build_expert,
    checkpoint_files,
    delta_of,
    encode_deltas,
    expert_info,
    load_expert,
    reconstruct,
    tau_dtype,
)
from ._allocate import check_allocate
from ._io import atomic_dir, atomic_file
from ._plan import plan_expert
from ._tensor import _check_encoding, check_k_alpha

__all__ = ["compress_checkpoint", "apply_checkpoint"]

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
INDEX = "model.safetensors.index.json"


class _Checkpoint:
    """Name -> file of a checkpoint; reads one tensor at a time."""

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
            except Exception as e:  # safetensors raises its own error types for bad files
                raise CompeftError(f"{f} is not a readable safetensors file: {e}") from None

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as h:
            return h.get_tensor(name)


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    def wrap(items: Sequence[str], desc: str) -> Iterable[str]:
        if not enabled:
            return items
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs, pipes, tests).
        return tqdm(items, desc=desc, unit="tensor", leave=False, disable=None)

    return wrap


def compress_checkpoint(
    finetuned: PathLike,
    k: float,
    alpha: float = 1.0,
    *,
    base: Optional[PathLike] = None,
    scope: Optional[str] = None,
    scale: Optional[str] = None,
    encoding: str = "golomb",
    progress: bool = False,
    allocate: str = "uniform",
) -> CompressedExpert:
    """Compresses a checkpoint (a safetensors file or a folder of shards) tensor by tensor.

    With ``base`` each tensor the base has is compressed as finetuned - base (float32, float64 if
    either is), and the tensors it lacks are kept exactly; without it the tensors are taken as
    task vectors under the same rules as :func:`compeft_rs.compress_expert`; ``scope``,
    ``scale`` and ``allocate`` as there (``allocate="error"`` reads each residual again to
    measure its error at each density tried). LoRA factors in such a file are compressed as
    given (no gauge rewrite, which would need each pair in memory): for adapters use
    :func:`compeft_rs.compress_peft` or :func:`compeft_rs.compress_expert`.
    """
    k, alpha = check_k_alpha(k, alpha)
    _check_scope(scope)
    _check_scale(scale)
    _check_encoding(encoding)
    check_allocate(allocate, scope or "per_tensor", encoding)
    ft = _Checkpoint(finetuned)
    bs = _Checkpoint(base) if base is not None else None
    plans = plan_expert(ft.meta, base=None if bs is None else bs.meta)
    deltas = [n for n, p in plans.items() if not p.exact]
    if not deltas:
        found = sorted({ft.meta[n][0] for n in ft.meta}) or ["no tensors"]
        raise TypeError(
            f"{finetuned} has no tensor of a supported dtype (float16, bfloat16, float32, float64) to "
            f"compress; found {', '.join(found)}"
        )

    scope = scope or default_scope(deltas, allocate)
    scale = scale or default_scale(deltas)

    def source(n: str) -> Any:
        return delta_of(plans[n], ft.get(n), bs.get(n) if plans[n].init == "base" else None)  # type: ignore[union-attr]

    streams = encode_deltas(deltas, source, [k], alpha, scope, encoding, _progress(progress), scale=scale,
                            allocate=allocate)[k]
    exact = {n: ft.get(n) for n, p in plans.items() if p.exact}
    info = expert_info(k, alpha, scope, encoding, plans, streams, {n: ft.meta[n][0] for n in deltas}, scale,
                       allocate=allocate)
    if bs is not None:
        info["sharding"] = [f.name for f in ft.files]
    return build_expert(streams, exact, info)


def apply_checkpoint(
    expert: Any, base: PathLike, out: PathLike, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Writes base + reconstruction as a checkpoint with the base's sharding: a file for a file,
    a folder (same shard names, index and other files copied) for a folder.

    Each tensor follows its plan: base + tau for residuals, 1 + tau for (IA)3 vectors, the stored
    tensor for those kept exactly; tensors the base lacks (kept exactly) are added to the last
    shard and the index. An expert made without a base (LoRA factors, task vectors from 0) is
    refused. One shard is in memory at a time; the output is built beside ``out`` and renamed
    into place.
    """
    from safetensors.torch import load_file, save_file

    if not isinstance(expert, CompressedExpert):
        expert = load_expert(expert)
    base_p, out_p = Path(base), Path(out)
    files = checkpoint_files(base_p)
    bc = _Checkpoint(base_p)
    zero = [n for n in expert.compressed_keys() if expert.init_of(n) == "zero"]
    if zero:
        raise ValueError(
            f"{len(zero)} tensors of this expert (e.g. {zero[0]!r}) are deltas from 0, not residuals of a base "
            "checkpoint: it was compressed without --base (a LoRA adapter or plain task vectors). Rebuild an "
            "adapter with `compeft decompress` / save_peft, or compress the fine-tune with --base"
        )
    missing = [n for n in expert.compressed_keys() if n not in bc.meta]
    if missing:
        raise ValueError(f"the expert has {len(missing)} residuals the base lacks, e.g. {missing[0]!r}; wrong base?")
    streams = dict(zip(expert.compressed_keys(), expert._parse(expert.compressed_keys())))
    for n, s in streams.items():
        if bc.meta[n][1] != tuple(s.shape):
            raise ValueError(f"tensor {n!r}: shape {tuple(s.shape)} in the expert but {bc.meta[n][1]} in the base")
    extra = [n for n in expert.lossless_keys() if n not in bc.meta]
    if extra and base_p.is_dir() and not (base_p / INDEX).exists() and len(files) > 1:
        raise ValueError(
            f"the expert adds tensors the base lacks (e.g. {extra[0]!r}) but the base folder has several shards "
            f"and no {INDEX} to record where they go"
        )

    def shard(f: Path, dest: Path, add: List[str]) -> None:
        from safetensors import safe_open

        try:
            tensors = load_file(str(f))
            with safe_open(str(f), framework="pt") as h:
                md = h.metadata()
        except Exception as e:  # safetensors raises its own error types for bad files
            raise CompeftError(f"{f} is not a readable safetensors file: {e}") from None
        names = [n for n in tensors if n in streams]
        wide = [tau_dtype(expert.init_of(n), expert._orig_dtype(n, streams[n]), tensors[n]) for n in names]
        taus = _decode_parsed(names, [streams[n] for n in names], wide)
        for n in names:
            tensors[n] = reconstruct(expert.init_of(n), taus[n], tensors[n], _dtype_str(tensors[n]))
        for n in [n for n in tensors if n in expert.lossless_keys()] + add:
            tensors[n] = expert.lossless(n)
        save_file(tensors, str(dest), metadata=md or {"format": "pt"})

    last = files[-1].name
    if base_p.is_file():
        _check_new_output(out_p, overwrite)
        return atomic_file(out_p, lambda tmp: shard(base_p, tmp, extra))

    def build(tmp: Path) -> None:
        for f in _progress(progress)([str(f) for f in files], "apply"):
            shard(Path(f), tmp / Path(f).name, extra if Path(f).name == last else [])
        for other in base_p.iterdir():
            if other.is_file() and other.suffix != ".safetensors":
                shutil.copy2(other, tmp / other.name)
        if extra and (tmp / INDEX).exists():
            index = json.loads((tmp / INDEX).read_text())
            index.setdefault("weight_map", {}).update({n: last for n in extra})
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                added = [expert.lossless(n) for n in extra]
                index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in added)
            (tmp / INDEX).write_text(json.dumps(index, indent=2))

    names = {f.name for f in files} | {p.name for p in base_p.iterdir() if p.is_file()}
    return atomic_dir(out_p, build, names, overwrite=overwrite)


def _check_new_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force (overwrite=True) to replace it")
