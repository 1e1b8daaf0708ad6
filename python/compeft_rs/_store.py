"""A folder of compressed experts for serving: cached compressed in memory, decoded on demand,
materialised as plain PEFT folders for engines that read those (vLLM, LoRAX)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ._core import CompeftError, ExpertFile
from ._expert import CompressedExpert, PathLike, load_expert
from ._io import STALE_AFTER_S, atomic_dir, publish_file, stage_file, sweep_stale
from ._peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict

__all__ = ["ExpertStore", "DEFAULT_CACHE_MAX_BYTES"]

SUFFIX = ".cpft.safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# Temporary files of versions that did not put the writer's pid in the name.
_LEGACY_TEMP = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]*\.cpft\.safetensors\.[a-z0-9_]{8}\.tmp")

DEFAULT_CACHE_MAX_BYTES = 10 << 30
SIDECAR = ".compeft.json"  # written last into a materialised folder; engines ignore it
_SIDECAR_FORMAT = 1
_DIGEST = re.compile(r"[0-9a-f]{32}")

# A file's identity: (device, inode, mtime_ns, size) locally, what fsspec's info() says of the
# object remotely. Any write through the store changes it (a new file is renamed in, or a new
# object replaces the old one).
Identity = Tuple[Any, ...]
_REMOTE_KEYS = ("ETag", "etag", "e_tag", "md5Hash", "generation", "version_id", "VersionId", "mtime",
                "LastModified", "last_modified", "updated", "modified", "created", "size")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise ValueError(f"bad expert name {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit (the file is <name>{SUFFIX})")
    return name


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and not name.endswith(SUFFIX)


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


class _Cached:
    """A cached value, the identity of the file it came from and when that was last checked."""

    __slots__ = ("value", "ident", "checked")

    def __init__(self, value: Any, ident: Identity) -> None:
        self.value = value
        self.ident = ident
        self.checked = time.monotonic()


def _expert_from(data: bytes, where: str) -> CompressedExpert:
    """The expert in ``data``, read from ``where``: errors name the file, as load_expert's do."""
    try:
        storage = ExpertFile.from_bytes(data)
    except CompeftError as e:
        raise CompeftError(f"{where}: {e}") from None
    return CompressedExpert(storage, where=where)


def _local_identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _private_dir(path: Path) -> None:
    """Creates ``path`` and its missing parents readable by the owner only: a materialised folder
    holds a decoded adapter at a predictable place. An existing ``path`` is never changed (it may
    be a shared folder such as /tmp): one owned by another user, or one that group or others can
    write, is refused (PermissionError), since someone else could put what we serve there. One
    that others can only read (earlier versions created it 0755) is used as it is; each adapter
    folder in it is made 0700."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # mkdir's mode passes through the umask
    if not path.is_dir():
        raise NotADirectoryError(f"cache folder {path} exists and is not a folder; choose another cache_dir")
    if os.name != "posix":
        return
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise PermissionError(f"cache folder {path} belongs to another user (uid {st.st_uid}, not {os.geteuid()}), "
                              "who could change the adapter folders served from it; choose a cache_dir of your own "
                              "(COMPEFT_CACHE_DIR for the vLLM resolver)")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise PermissionError(f"cache folder {path} can be written by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):#o}), who could change the adapter folders served from "
                              f"it; make it yours alone (chmod 700 {path}) or choose another cache_dir "
                              "(COMPEFT_CACHE_DIR for the vLLM resolver)")


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _verified(out: Path, digest: str) -> bool:
    """Whether ``out`` is a complete folder materialised from the expert with SHA-256 ``digest``:
    exactly the files the sidecar lists, each of the size and SHA-256 it records."""
    try:
        if out.is_symlink() or not out.is_dir():
            return False
        if set(os.listdir(out)) != {ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR}:
            return False
        side = json.loads((out / SIDECAR).read_text())
        files = side["files"]
        if side.get("format") != _SIDECAR_FORMAT or side.get("expert_sha256") != digest:
            return False
        if set(files) != {ADAPTER_CONFIG, ADAPTER_WEIGHTS}:
            return False
        for fname, want in files.items():
            p = out / fname
            if p.is_symlink() or p.stat().st_size != int(want["size"]) or _file_sha256(p) != want["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_folder(out: Path, expert: CompressedExpert, digest: str) -> None:
    """The adapter folder of ``expert``, built beside ``out`` and renamed in; the sidecar last."""
    state = adapter_state_dict(expert)
    config = expert.peft_config

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": _file_sha256(tmp / n)}
                 for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        side = {"format": _SIDECAR_FORMAT, "expert_sha256": digest, "files": files}
        (tmp / SIDECAR).write_text(json.dumps(side, indent=2))

    atomic_dir(out, build, (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR), overwrite=False, dir_mode=0o700)


def _folder_bytes(path: Path) -> int:
    total = 0
    for e in os.scandir(path):
        try:
            total += e.stat(follow_symlinks=False).st_size
        except OSError:
            pass
    return total


def _evict(cache: Path, max_bytes: int, keep: Path) -> None:
    """Removes the least recently used materialised folders of ``cache`` (by mtime, which
    :meth:`ExpertStore.materialize` touches on each use) until the rest fit in ``max_bytes``.
    ``keep`` stays whatever its size; a folder another process holds the lock of is skipped."""
    from filelock import FileLock, Timeout

    folders = []
    for e in os.scandir(cache):
        if not _DIGEST.fullmatch(e.name) or not e.is_dir(follow_symlinks=False):
            continue
        try:
            folders.append((e.stat(follow_symlinks=False).st_mtime_ns, e.name, _folder_bytes(Path(e.path))))
        except OSError:
            continue
    total = sum(size for _, _, size in folders)
    for mtime, name, size in sorted(folders):
        if total <= max_bytes:
            break
        if name == keep.name:
            continue
        lock = FileLock(str(cache / f".{name}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue  # being written or verified right now
        try:
            folder = cache / name
            if folder.lstat().st_mtime_ns != mtime:
                continue  # used since it was listed
            shutil.rmtree(folder, ignore_errors=True)  # the lock file stays (see materialize)
            total -= size
        except OSError:
            continue
        finally:
            lock.release()


class ExpertStore(Mapping[str, CompressedExpert]):
    """A folder of ``<name>.cpft.safetensors`` experts, local or remote, read as a mapping from
    names to :class:`CompressedExpert`: ``store[name]`` (KeyError if absent), ``store.get(name)``
    (None if absent), ``name in store``, ``len(store)``, iteration over the names (sorted).

    ``root`` is a local folder or any fsspec URL (``s3://bucket/experts``, ``gs://...``,
    ``memory://...``; the fsspec backend for it must be installed); ``storage_options`` go to
    fsspec. A missing root is created, or with ``create=False`` refused (FileNotFoundError), so
    a mistyped path is not taken for an empty store. Compressed experts read from the store are
    cached in memory up to ``cache_bytes`` (their file size) and decoded experts up to
    ``decoded_cache_bytes``, least recently used dropped first.

    Consistency. In this object, a :meth:`put` or :meth:`remove` is seen by every call that
    starts after it returns: each name has a generation, bumped under the lock by put and
    remove, and a read caches what it read only if the generation has not changed since it
    started (so a read that overlaps a put returns the old or the new expert, and never leaves
    the old one cached). Writes by other processes (or other ``ExpertStore`` objects) are seen
    through the file: every cache hit first checks the file's identity (device, inode, mtime and
    size locally, one ``stat``; ETag, generation, mtime and size, whichever fsspec's ``info``
    gives, on a remote store, one metadata request) and reads the file again if it changed or
    is gone. ``revalidate`` (seconds) trusts a cached expert that long between checks; None
    never checks, so only this object's own writes are seen. Not guaranteed: a remote store
    whose ``info`` does not change on rewrite (no ETag or version, mtime in whole seconds and the
    same size) can hide a rewrite within the same second; dicts returned by :meth:`decoded`
    earlier are not updated. Writes are atomic (a new file renamed in; an object store replaces
    the object whole), so a reader sees the old expert or the new one, never a mix.

    Safe to use from several threads; :meth:`materialize` is also safe when several processes
    ask for the same expert at once.
    """

    def __init__(self, root: Union[str, PathLike], *, cache_bytes: int = 1 << 30,
                 decoded_cache_bytes: int = 1 << 30, storage_options: Optional[Dict[str, Any]] = None,
                 create: bool = True, revalidate: Optional[float] = 0.0) -> None:
        import fsspec

        self.root = str(root)
        self.fs, self._path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if not self.fs.isdir(self._path):
            if self.fs.exists(self._path):
                raise NotADirectoryError(f"expert store root {self.root} is a file, not a folder")
            if not create:
                raise FileNotFoundError(f"no expert store at {self.root}: the folder does not exist (check the "
                                        "path, or pass create=True to start a new store there)")
            self.fs.makedirs(self._path, exist_ok=True)
        if revalidate is not None and revalidate < 0:
            raise ValueError(f"revalidate must be >= 0 seconds or None, got {revalidate}")
        self.revalidate = revalidate
        self._lock = threading.RLock()
        self._compressed = _LRU(cache_bytes)
        self._decoded = _LRU(decoded_cache_bytes)
        self._gen: Dict[str, int] = {}
        self._uploading: Dict[str, int] = {}  # remote puts in progress, by name
        if self._local:
            self._sweep()

    def _file(self, name: str) -> str:
        return f"{self._path.rstrip('/')}/{_check_name(name)}{SUFFIX}"

    def _sweep(self) -> None:
        """Removes what killed writers left in the root (see compeft_rs._io.sweep_stale)."""
        sweep_stale(self._path)
        now = time.time()
        try:
            for e in os.scandir(self._path):
                if _LEGACY_TEMP.fullmatch(e.name) and now - e.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                    os.unlink(e.path)
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"ExpertStore({self.root!r}, {len(self.names())} experts)"

    # -- the mapping --------------------------------------------------------------------------
    def names(self) -> List[str]:
        """Names of the experts in the store, sorted."""
        out = []
        for p in self.fs.ls(self._path, detail=False):
            base = str(p).rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(SUFFIX) and _NAME.fullmatch(base[: -len(SUFFIX)]):
                out.append(base[: -len(SUFFIX)])
        return sorted(out)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return _valid_name(name) and self.fs.exists(self._file(name))  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> CompressedExpert:
        """The compressed expert ``name`` (from the in-memory cache when it is there and its
        file has not changed); KeyError if the store has none."""
        exp = self.get(name)
        if exp is None:
            raise KeyError(self._missing(name))
        return exp

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """The compressed expert ``name``, or ``default`` if the store has none. A file that is
        there but not a valid expert raises CompeftError naming the file."""
        if not _valid_name(name):
            return default
        found = self._lookup(name)
        return default if found is None else found[0]

    # Two stores are equal only if they are the same object (Mapping's equality would read
    # every expert); hashable like any object.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _missing(self, name: object) -> str:
        if not _valid_name(name):
            return (f"no expert {name!r} in {self.root}: not a valid expert name (1-200 letters, digits, '.', '_' "
                    "or '-', starting with a letter or digit)")
        return f"no expert {name!r} in {self.root}"

    # -- reading ------------------------------------------------------------------------------
    def _identity(self, path: str) -> Optional[Identity]:
        """The identity of the file at ``path`` now; None if there is none."""
        try:
            if self._local:
                return _local_identity(os.stat(path))
            self.fs.invalidate_cache(path)  # fsspec caches listings; another writer's change must show
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return tuple((k, str(info[k])) for k in _REMOTE_KEYS if info.get(k) is not None)

    def _fresh(self, path: str, hit: _Cached) -> bool:
        if self.revalidate is None:
            return True
        now = time.monotonic()
        if now - hit.checked < self.revalidate:
            return True
        if self._identity(path) != hit.ident:
            return False
        hit.checked = now
        return True

    def _read(self, path: str) -> Tuple[bytes, Identity]:
        if self._local:
            with open(path, "rb") as f:
                # The identity of what was opened: a file renamed over it later is another inode.
                ident = _local_identity(os.fstat(f.fileno()))
                data = f.read()
            return data, ident
        ident = self._identity(path)  # taken before the read: a rewrite in between is seen next time
        if ident is None:
            raise FileNotFoundError(path)
        return self.fs.cat_file(path), ident

    def _drop(self, name: str, gen: int) -> None:
        """Forgets the cached copies of ``name`` if no put or remove came since ``gen``."""
        with self._lock:
            if self._gen.get(name, 0) == gen:
                self._compressed.pop(name)
                self._decoded.pop(name)

    def _lookup(self, name: str) -> Optional[Tuple[CompressedExpert, Identity]]:
        path = self._file(name)
        with self._lock:
            gen = self._gen.get(name, 0)
            hit = self._compressed.get(name)
        if hit is not None:
            if self._fresh(path, hit):
                return hit.value, hit.ident
            self._drop(name, gen)
        try:
            data, ident = self._read(path)
        except FileNotFoundError:
            self._drop(name, gen)
            return None
        exp = _expert_from(data, path if self._local else self.fs.unstrip_protocol(path))
        with self._lock:
            if self._gen.get(name, 0) == gen:
                self._compressed.put(name, _Cached(exp, ident), len(data))
        return exp, ident

    def decoded(self, name: str) -> Dict[str, Any]:
        """The adapter weights of ``name`` as torch tensors on the CPU (cached, bounded in bytes;
        checked against the file like the compressed cache). The dict is shared with the cache:
        do not modify its tensors."""
        path = self._file(name)
        with self._lock:
            gen = self._gen.get(name, 0)
            hit = self._decoded.get(name)
        if hit is not None and self._fresh(path, hit):
            return hit.value
        found = self._lookup(name)
        if found is None:
            raise KeyError(self._missing(name))
        exp, ident = found
        weights = exp.apply()
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        with self._lock:
            if self._gen.get(name, 0) == gen:
                self._decoded.put(name, _Cached(weights, ident), nbytes)
        return weights

    # -- writing ------------------------------------------------------------------------------
    def put(self, name: str, expert: Union[CompressedExpert, PathLike], *, overwrite: bool = False) -> None:
        """Stores an expert (or an expert file) under ``name``, written completely or not at all.
        Without ``overwrite``, FileExistsError if the store has ``name``: decided atomically on a
        local store (even against other processes, where the filesystem has hard links); on a
        remote one, against this object's other puts, but another writer's object created between
        the check and the upload is replaced. The file is written and synced without holding up
        readers; only renaming it in and forgetting the cached copies take the store's lock."""
        path = self._file(name)
        exp = expert if isinstance(expert, CompressedExpert) else load_expert(expert)
        data = exp.to_bytes()
        if not overwrite and self.fs.exists(path):
            raise FileExistsError(self._exists(name))
        if not self._local:
            self._put_remote(name, path, data, overwrite)
            return
        tmp = stage_file(path, lambda t: t.write_bytes(data))
        try:
            # Renaming keeps the inode and mtime: this is the identity of the stored file.
            ident = _local_identity(os.stat(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            try:
                publish_file(tmp, path, overwrite=overwrite)
            except FileExistsError:
                raise FileExistsError(self._exists(name)) from None
            self._invalidate(name)
            # exp holds exactly these bytes (a loaded expert is read into memory, not mapped).
            self._compressed.put(name, _Cached(exp, ident), len(data))

    def _put_remote(self, name: str, path: str, data: bytes, overwrite: bool) -> None:
        # An object store replaces an object whole. The upload runs outside the lock; without
        # overwrite, the name is reserved first so that this object's other puts see it taken.
        with self._lock:
            if not overwrite and name in self._uploading:
                raise FileExistsError(self._exists(name))
            self._uploading[name] = self._uploading.get(name, 0) + 1
        try:
            if not overwrite and self.fs.exists(path):
                raise FileExistsError(self._exists(name))
            self.fs.pipe_file(path, data)
        finally:
            with self._lock:
                self._uploading[name] -= 1
                if not self._uploading[name]:
                    del self._uploading[name]
                self._invalidate(name)

    def _invalidate(self, name: str) -> None:
        """Under the lock: a new generation of ``name``, its cached copies forgotten."""
        self._gen[name] = self._gen.get(name, 0) + 1
        self._decoded.pop(name)
        self._compressed.pop(name)

    def _exists(self, name: str) -> str:
        return f"the store already has an expert {name!r}; pass overwrite=True to replace it"

    def remove(self, name: str) -> None:
        """Deletes ``name`` from the store and its caches (materialised folders stay until evicted:
        they are keyed by content, and another expert may share one)."""
        path = self._file(name)
        with self._lock:
            self._invalidate(name)
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                raise KeyError(self._missing(name)) from None

    def content_hash(self, name: str) -> str:
        """SHA-256 of the expert's file bytes (hex)."""
        return hashlib.sha256(self[name].to_bytes()).hexdigest()

    # -- PEFT folders -------------------------------------------------------------------------
    def materialize(self, name: str, cache_dir: Union[str, PathLike, None] = None, *,
                    cache_max_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES) -> Path:
        """A plain PEFT folder (adapter_config.json and adapter_model.safetensors) of ``name`` in
        ``cache_dir`` (default: ``~/.cache/compeft-rs/peft``, created readable by the owner only;
        an existing one is never changed, and refused with PermissionError if another user owns it
        or others can write it), named by the expert's content hash; the folder itself is 0700.

        Under a file lock per folder, so processes asking at once write it once: an existing
        folder is reused only if its sidecar (``.compeft.json``, written last) names this
        expert's hash and its files have the sizes and SHA-256 the sidecar records; anything else
        there (partial, changed, foreign) is removed and rebuilt. A folder is built beside its
        place and renamed in, so a failed write leaves nothing under the hash. Each use touches
        the folder's mtime; after a write, the least recently used folders are removed until the
        cache holds at most ``cache_max_bytes`` (None: unbounded), never the one returned (nor one
        another process holds the lock of). An engine should load the folder soon after it is
        returned: a full cache may evict it once it is the least recently used.

        The lock files (``.<hash>.lock``, empty) stay when their folders are evicted: one per
        expert content ever materialised there. Deleting a lock file that another process has
        opened and is waiting on would let a third lock a new file of the same name, and both
        would write the folder at once; remove them only while no process uses the cache.
        """
        return self._materialize(name, self[name], cache_dir, cache_max_bytes)

    def _materialize(self, name: str, exp: CompressedExpert, cache_dir: Union[str, PathLike, None],
                     cache_max_bytes: Optional[int]) -> Path:
        """:meth:`materialize` of ``exp``, which the caller read as ``name`` (and may have
        checked: the folder is made from exactly this object, not from the file read again)."""
        from filelock import FileLock

        if exp.peft_config is None:
            raise ValueError(f"expert {name!r} was not made from a PEFT adapter (no adapter config in it); "
                             "only PEFT experts can be materialised as adapter folders")
        cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "compeft-rs" / "peft"
        _private_dir(cache)
        digest = hashlib.sha256(exp.to_bytes()).hexdigest()
        out = cache / digest[:32]
        with FileLock(str(cache / f".{out.name}.lock")):
            if _verified(out, digest):
                os.utime(out)  # most recently used
                return out
            if out.exists() or out.is_symlink():
                _remove_entry(out)  # partial, changed or foreign: rebuilt
            _write_folder(out, exp, digest)
            os.utime(out)
        if cache_max_bytes is not None:
            _evict(cache, cache_max_bytes, keep=out)
        return out
