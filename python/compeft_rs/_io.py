"""The one atomic writer: every file and folder the library writes goes through here.

Outputs are built beside their destination and renamed into place, so a failed run leaves
nothing half written; they get the permissions the umask gives (not mkstemp's 0600) and are
fsynced with their folder before they count as written. Replacing a folder never deletes what
the library did not write: the old folder is renamed aside and removed only after the new one is
in place, and a folder holding other files, or the current folder, is refused.

Temporary names say who wrote them: ``.<target>.<pid>-<host>-<random>.tmp`` (``.old`` for a
folder renamed aside), host a short hash of the host name. A process killed mid-write leaves one
behind; the next write into that folder (at most once a minute per folder and process) removes
those whose writer is gone (a pid no longer running on this host) and that nothing touched for
ten minutes, and anything untouched for an hour whoever wrote it. The pid alone is not enough:
containers that share a volume and a host name but not a pid namespace see each other's writers
as gone, so a live writer's temporary is safe as long as it writes to it at least every ten
minutes (and, in any case, for an hour).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Union

__all__ = ["atomic_file", "atomic_dir", "fsync_dir", "publish_file", "stage_file", "sweep_stale"]

PathLike = Union[str, "os.PathLike[str]"]
_umask_lock = threading.Lock()

# A leftover untouched this long is stale whoever wrote it (pids are reused, and another host's
# processes cannot be asked).
STALE_AFTER_S = 3600.0
# A leftover of a writer that looks gone, untouched this long: the pid may belong to another pid
# namespace (containers sharing the volume and the host name), where it still runs.
DEAD_WRITER_AFTER_S = 600.0
_SWEEP_EVERY_S = 60.0
_TEMP = re.compile(r"\.(?P<target>.+)\.(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]+\.(?P<kind>tmp|old)")
_swept: Dict[str, float] = {}
_swept_lock = threading.Lock()


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(target: Path) -> str:
    # Read at each call: a forked child writes under its own pid.
    return f".{target.name}.{os.getpid()}-{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    """False only when ``pid`` is certainly not running here (unknown counts as alive)."""
    if os.name != "posix" or pid <= 0:
        return True  # Windows' os.kill terminates rather than probes
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: running, as another user
        return True
    return True


def _newest_mtime(path: Path) -> float:
    st = path.lstat()
    newest = st.st_mtime
    if path.is_dir() and not path.is_symlink():
        for p in path.iterdir():
            try:
                newest = max(newest, p.lstat().st_mtime)
            except OSError:
                pass
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale(folder: PathLike, *, now: Optional[float] = None) -> int:
    """Removes the temporary files and folders this module's writers left in ``folder`` when
    they were killed: those of a pid that no longer runs on this host untouched for ten minutes
    (a folder counts as touched when anything in it is), and any untouched for an hour. A folder
    renamed aside (``.old``) goes back to its place if nothing took it. Returns how many were
    removed; never raises."""
    folder = Path(folder)
    now = time.time() if now is None else now
    host = _host_tag()
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None:
            continue
        path = folder / entry.name
        try:
            idle = now - _newest_mtime(path)
            if idle <= DEAD_WRITER_AFTER_S:
                continue
            if idle <= STALE_AFTER_S and (m["host"] != host or _pid_alive(int(m["pid"]))):
                continue
            if m["kind"] == "old":
                target, old = folder / m["target"], path / "old"
                if old.is_dir() and not target.exists():
                    os.replace(old, target)  # killed between the two renames of atomic_dir
            _remove(path)
            removed += 1
        except OSError:
            continue
    return removed


def _sweep_if_due(folder: Path) -> None:
    key = os.path.abspath(folder)
    now = time.monotonic()
    with _swept_lock:
        if now - _swept.get(key, -_SWEEP_EVERY_S) < _SWEEP_EVERY_S:
            return
        if len(_swept) > 10_000:  # a process writing into very many folders: forget, sweep again
            _swept.clear()
        _swept[key] = now
    sweep_stale(folder)


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps other threads of ours from
    # creating files in between.
    with _umask_lock:
        m = os.umask(0o022)
        os.umask(m)
    return m


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new entry in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_file(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp)`` to fill a temporary file beside ``path``, then syncs it and renames
    it into place. An existing file at ``path`` is replaced only by a complete new one."""
    return publish_file(stage_file(path, write), path)


def stage_file(path: PathLike, write: Callable[[Path], None]) -> Path:
    """The first half of :func:`atomic_file`: a temporary file beside ``path``, filled by
    ``write(tmp)``, given the umask's permissions and synced. Pass it to :func:`publish_file`,
    which renames it in (or removes it); on failure nothing is left."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name for the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_if_due(path.parent)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # After writing: a writer may replace the file (safetensors writes through a temp file).
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish_file(tmp: Path, path: PathLike, *, overwrite: bool = True) -> Path:
    """The second half of :func:`atomic_file`: renames the staged ``tmp`` to ``path``. Without
    ``overwrite``, FileExistsError if ``path`` exists, decided atomically (``tmp`` is hard-linked
    to ``path``, which fails if anything is there, then unlinked); where the filesystem has no
    hard links, ``path`` is checked and then replaced, and a file another process makes in
    between is replaced. The file keeps its inode and mtime. ``tmp`` is gone afterwards, either
    way."""
    path = Path(path)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here (FAT, some network filesystems)
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _check_replaceable(out: Path, names: Iterable[str]) -> None:
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; remove it or choose another output")
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise ValueError(f"refusing to replace {out}: it holds the current folder; choose another output")
    ours = set(names)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"refusing to replace {out}: it holds files compeft-rs would not write there ({shown}); "
            "choose a new or empty folder"
        )


def atomic_dir(path: PathLike, build: Callable[[Path], None], names: Iterable[str], *, overwrite: bool,
               dir_mode: Optional[int] = None) -> Path:
    """Calls ``build(tmp)`` to fill a temporary folder beside ``path`` with files named in
    ``names``, then renames it into place.

    An existing ``path`` is replaced only with ``overwrite`` and only if every entry in it is one
    of ``names`` (a previous output of the same kind); it is renamed aside first and removed
    after the new folder is in place, so a failure at any step keeps it.
    """
    out = Path(path)
    names = set(names)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --force (overwrite=True) to replace it")
        _check_replaceable(out, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_if_due(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
    aside = None
    try:
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask if dir_mode is None else dir_mode)
        build(tmp)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~mask)
            _fsync_file(p)
        fsync_dir(tmp)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".old", dir=out.parent))
            os.replace(out, aside / "old")
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and (aside / "old").exists() and not out.exists():
            os.replace(aside / "old", out)
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out
