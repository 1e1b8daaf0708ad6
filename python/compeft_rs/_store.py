"""A folder of compressed experts for serving: cached compressed in memory, decoded on demand,
materialised as plain PEFT folders for engines that read those (vLLM, LoRAX)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ._expert import CompressedExpert, PathLike, load_expert
from ._io import atomic_file
from ._peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_peft

__all__ = ["ExpertStore"]

SUFFIX = ".cpft.safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise ValueError(f"bad expert name {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit (the file is <name>{SUFFIX})")
    return name


class _LRU:
    """Values with a byte size, least recently used dropped first beyond ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.items: "OrderedDict[str, tuple[Any, int]]" = OrderedDict()
        self.nbytes = 0

    def get(self, key: str) -> Any:
        hit = self.items.get(key)
        if hit is None:
            return None
        self.items.move_to_end(key)
        return hit[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        self.pop(key)
        if nbytes > self.limit:
            return  # larger than the whole cache: served, not kept
        self.items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.limit:
            _, (_, n) = self.items.popitem(last=False)
            self.nbytes -= n

    def pop(self, key: str) -> None:
        hit = self.items.pop(key, None)
        if hit is not None:
            self.nbytes -= hit[1]


class ExpertStore:
    """A folder of ``<name>.cpft.safetensors`` experts, local or remote.

    ``root`` is a local folder or any fsspec URL (``s3://bucket/experts``, ``gs://...``,
    ``memory://...``; the fsspec backend for it must be installed); ``storage_options`` go to
    fsspec. Compressed experts read from the store are cached in memory up to ``cache_bytes``
    (their file size) and decoded experts up to ``decoded_cache_bytes``, least recently used
    dropped first. Safe to use from several threads; :meth:`materialize` is also safe when
    several processes ask for the same expert at once.
    """

    def __init__(self, root: Union[str, PathLike], *, cache_bytes: int = 1 << 30,
                 decoded_cache_bytes: int = 1 << 30, storage_options: Optional[Dict[str, Any]] = None) -> None:
        import fsspec

        self.root = str(root)
        self.fs, self._path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self._path, exist_ok=True)
        self._lock = threading.RLock()
        self._compressed = _LRU(cache_bytes)
        self._decoded = _LRU(decoded_cache_bytes)

    def _file(self, name: str) -> str:
        return f"{self._path.rstrip('/')}/{_check_name(name)}{SUFFIX}"

    def __repr__(self) -> str:
        return f"ExpertStore({self.root!r}, {len(self.names())} experts)"

    def names(self) -> List[str]:
        """Names of the experts in the store, sorted."""
        out = []
        for p in self.fs.ls(self._path, detail=False):
            base = str(p).rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(SUFFIX) and _NAME.fullmatch(base[: -len(SUFFIX)]):
                out.append(base[: -len(SUFFIX)])
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _NAME.fullmatch(name) is not None and self.fs.exists(self._file(name))

    def __len__(self) -> int:
        return len(self.names())

    def put(self, name: str, expert: Union[CompressedExpert, PathLike], *, overwrite: bool = False) -> None:
        """Stores an expert (or an expert file) under ``name``, written completely or not at all."""
        path = self._file(name)
        exp = expert if isinstance(expert, CompressedExpert) else load_expert(expert)
        data = exp.to_bytes()
        with self._lock:
            if not overwrite and self.fs.exists(path):
                raise FileExistsError(f"the store already has an expert {name!r}; pass overwrite=True to replace it")
            if self._local:
                atomic_file(path, lambda tmp: Path(tmp).write_bytes(data))
            else:  # object stores replace an object whole
                self.fs.pipe_file(path, data)
            self._decoded.pop(name)
            self._compressed.put(name, CompressedExpert.from_bytes(data), len(data))

    def get(self, name: str) -> CompressedExpert:
        """The compressed expert ``name`` (from the in-memory cache when it is there)."""
        path = self._file(name)
        with self._lock:
            hit = self._compressed.get(name)
        if hit is not None:
            return hit
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise KeyError(f"no expert {name!r} in {self.root}") from None
        exp = CompressedExpert.from_bytes(data)
        with self._lock:
            self._compressed.put(name, exp, len(data))
        return exp

    def decoded(self, name: str) -> Dict[str, Any]:
        """The adapter weights of ``name`` as torch tensors on the CPU (cached, bounded in bytes).
        The dict is shared with the cache: do not modify its tensors."""
        with self._lock:
            hit = self._decoded.get(name)
        if hit is not None:
            return hit
        weights = self.get(name).apply()
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        with self._lock:
            self._decoded.put(name, weights, nbytes)
        return weights

    def remove(self, name: str) -> None:
        """Deletes ``name`` from the store and its caches (materialised folders stay: they are
        keyed by content, and another expert may share one)."""
        path = self._file(name)
        with self._lock:
            self._compressed.pop(name)
            self._decoded.pop(name)
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                raise KeyError(f"no expert {name!r} in {self.root}") from None

    def content_hash(self, name: str) -> str:
        """SHA-256 of the expert's file bytes (hex)."""
        return hashlib.sha256(self.get(name).to_bytes()).hexdigest()

    def materialize(self, name: str, cache_dir: Union[str, PathLike, None] = None) -> Path:
        """A plain PEFT folder (adapter_config.json and adapter_model.safetensors) of ``name``,
        written once into ``cache_dir`` (default: ``~/.cache/compeft-rs/peft``) under the
        expert's content hash and reused afterwards. The folder is built beside its place and
        renamed in, under a file lock, so processes asking at once write it once and never see
        half of it."""
        from filelock import FileLock

        exp = self.get(name)
        if exp.peft_config is None:
            raise ValueError(f"expert {name!r} was not made from a PEFT adapter (no adapter config in it); "
                             "only PEFT experts can be materialised as adapter folders")
        cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "compeft-rs" / "peft"
        cache.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(exp.to_bytes()).hexdigest()[:32]
        out = cache / digest
        with FileLock(str(cache / f".{digest}.lock")):
            if (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file():
                return out
            save_peft(exp, out, overwrite=out.exists())
        return out
