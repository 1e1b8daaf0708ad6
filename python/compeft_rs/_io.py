"""The one atomic writer: every file and folder the library writes goes through here.

Outputs are built beside their destination and renamed into place, so a failed run leaves
nothing half written; they get the permissions the umask gives (not mkstemp's 0600) and are
fsynced with their folder before they count as written. Replacing a folder never deletes what
the library did not write: the old folder is renamed aside and removed only after the new one is
in place, and a folder holding other files, or the current folder, is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Union

__all__ = ["atomic_file", "atomic_dir", "fsync_dir"]

PathLike = Union[str, "os.PathLike[str]"]
_umask_lock = threading.Lock()


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
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name for the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # After writing: a writer may replace the file (safetensors writes through a temp file).
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
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


def atomic_dir(path: PathLike, build: Callable[[Path], None], names: Iterable[str], *, overwrite: bool) -> Path:
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    aside = None
    try:
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        build(tmp)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~mask)
            _fsync_file(p)
        fsync_dir(tmp)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
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
