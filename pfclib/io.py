"""Atomic, durable file writing, and ownership of an output folder.

* :func:`atomic_path` (and :func:`write_json`, :func:`atomic_torch_save` on top of it): a write that
  fails never leaves a half-written file behind, and one that succeeded survives a power loss — the
  data is ``fsync``-ed before the rename and the folder after it, so the new name never points to an
  empty or partial file. New files get the mode ``0o666`` less the process's umask, like ``open()``.
* A write killed half-way (SIGKILL, OOM killer, power loss) leaves its temporary file
  ``.<name>.<8 chars>.tmp`` beside the target; :func:`remove_temp_files` deletes such leftovers.
* :class:`RunLock`: one job at a time per output folder (``fcntl.flock`` on ``<folder>/.lock``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_NAME",
    "RunLock",
    "atomic_path",
    "atomic_torch_save",
    "fsync_dir",
    "fsync_file",
    "remove_temp_files",
    "temp_target",
    "write_json",
]

# ``.<target name>.<8 chars>.tmp``: what atomic_path creates (the 8 chars are tempfile.mkstemp's
# alphabet, so leftovers of older versions, which used mkstemp, match too).
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<tag>[a-z0-9_]{8})\.tmp$")
_TAG_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def temp_target(name: str) -> str | None:
    """The file name an :func:`atomic_path` temporary called ``name`` was to become, or None when
    ``name`` is not such a temporary."""
    m = TEMP_NAME.match(name)
    return m.group("target") if m else None


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data and metadata to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a new or removed name) to the storage device.

    A no-op where folders cannot be opened (not POSIX, no read permission) or synced (some file
    systems answer EINVAL): durability is then the file system's."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _create_temp(path: Path) -> Path:
    """Create an empty ``.<name>.<8 chars>.tmp`` beside ``path`` (exclusively, mode 0o666 & ~umask)."""
    for _ in range(100):
        tag = "".join(secrets.choice(_TAG_CHARS) for _ in range(8))
        tmp = path.parent / f".{path.name}.{tag}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {str(path)!r}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary file (``.<name>.<8 chars>.tmp``, created empty) is removed if the body raises, so
    readers only ever see a complete file. With ``fsync`` (the default) the file is flushed to disk
    before the rename and its folder after it, so a power loss leaves either the old file or the
    complete new one. The file's mode follows the umask (``0o666 & ~umask``) unless the body changes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path)
    try:
        yield tmp_path
        if fsync:
            fsync_file(tmp_path)
        os.replace(tmp_path, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name, fsync, then rename (see :func:`atomic_path`)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def remove_temp_files(folder: str | os.PathLike, target: str | re.Pattern[str] | None = None) -> list[Path]:
    """Delete the temporaries that interrupted :func:`atomic_path` writes left in ``folder`` (not in
    its sub-folders); return the deleted paths, sorted.

    Only regular files named ``.<name>.<8 chars>.tmp`` are touched, and with ``target`` (a regular
    expression) only those whose ``<name>`` fully matches it. Never call it while another process
    may be writing into ``folder`` (its in-flight temporary would go): hold the folder's
    :class:`RunLock`, or call it before any writer starts.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(target) if isinstance(target, str) else target
    removed = []
    for p in folder.iterdir():
        name = temp_target(p.name)
        if name is None or (pattern is not None and not pattern.fullmatch(name)):
            continue
        try:
            if not stat.S_ISREG(p.lstat().st_mode):
                continue
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return sorted(removed)


class RunLock:
    """Exclusive use of an output folder by one job: ``with RunLock(output_dir): ...``.

    Acquiring takes a non-blocking ``fcntl.flock`` on ``<output_dir>/.lock`` (creating the folder and
    the file) and writes ``<pid> <host>`` into it. While it is held, a second acquirer — another
    process, or another ``RunLock`` of the same process — gets a RuntimeError naming the folder and
    the holder's pid. It is released on exit from the ``with`` block, by :meth:`release`, and by the
    kernel when the holding process dies (even by SIGKILL), so a crashed job never blocks the next
    one. The lock file itself stays (deleting it would let two jobs lock two different files).

    Take it on one process per job (rank 0 of a distributed run). The descriptor is not inherited
    across ``exec``, but a ``fork``-ed child that outlives its parent keeps the lock until it exits.
    On network file systems flock is only as good as the server's locking. POSIX only.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RuntimeError at once when another holder has it."""
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"this RunLock already holds {str(self.path)!r}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            who = "pid unknown"
            if holder:
                who = f"pid {holder[0]}" + (f" on host {holder[1]}" if len(holder) > 1 else "")
            raise RuntimeError(
                f"output folder {str(self.output_dir)!r} is in use by another run ({who} holds "
                f"{str(self.path)!r}): two jobs writing one folder would overwrite each other's checkpoints "
                "and logs. Wait for that run to end, or give this one another output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale pid for the next reader
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.output_dir)!r}, held={self.held})"
