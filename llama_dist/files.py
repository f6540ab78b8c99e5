"""Writing files and directories so that a reader sees the old one or the new one, never half of either."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import secrets
import shutil
import sys
import threading
from concurrent.futures import CancelledError
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Optional

from llama_dist.errors import UserError

HASH_WINDOW = 16 << 20
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux; elsewhere the pages simply stay mapped


def sha256_windows(path: str | os.PathLike) -> Generator[None, None, str]:
    """The file's sha256, read through a memory map one window at a time; yields before each
    window (where a caller may stop, or go on in another thread) and returns the hex digest.

    Hashing the mapped pages saves read()'s copy into a buffer (about 15% of the time
    on a 2 GB shard), and dropping each window from the mapping once hashed keeps the
    resident set flat.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if not os.fstat(handle.fileno()).st_size:
            return digest.hexdigest()  # mmap refuses an empty file
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            for start in range(0, len(mapped), HASH_WINDOW):
                yield
                digest.update(view[start : start + HASH_WINDOW])
                if _MADV_DONTNEED is not None:
                    mapped.madvise(_MADV_DONTNEED, start, min(HASH_WINDOW, len(mapped) - start))
    return digest.hexdigest()


def run_steps(steps: Generator[None, None, Any], stop: Optional[threading.Event] = None,
              until: Callable[[], bool] = lambda: False) -> tuple[bool, Any]:
    """Resume `steps` until it returns, (True, what it returned), or until `until()` holds
    at a yield, (False, None); CancelledError once `stop` is set."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return True, end.value
        if stop is not None and stop.is_set():
            steps.close()
            raise CancelledError("hashing stopped")
        if until():
            return False, None


def sha256_file(path: str | os.PathLike, stop: Optional[threading.Event] = None) -> str:
    """sha256_windows in one go; `stop`, once set, abandons the hash with CancelledError."""
    return run_steps(sha256_windows(path), stop)[1]


def _sync_file_range() -> Optional[Any]:
    """glibc's sync_file_range, which Python's os module lacks; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not glibc, or a C library without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # from linux/fs.h: start writeback of the range's dirty pages, do not wait


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing a range just written to the disk, without waiting for it.

    A file written whole and then fsynced keeps the disk idle while it is written and the
    writer idle while it is synced; started block by block, the writeback overlaps the
    rest of the work and the final fsync finds little left. Best effort: a failed or
    missing call leaves it all to the fsync, which reports any real error.
    """
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to the disk: a rename is only as durable as
    what it names, and a commit marker must not outlive the files it vouches for in a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: a file system that cannot sync this (some for directories)
            raise
    finally:
        os.close(fd)


def is_disk_full(err: BaseException) -> bool:
    """A write that failed for want of space (or of quota): the user's to fix, not a bug."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | os.PathLike) -> int:
    """Space an unprivileged writer may still use on the file system that holds `path`, or
    that will hold it: a run directory need not exist yet."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def require_room(path: str | os.PathLike, needed: int, what: str, fix: str, reclaimable: int = 0) -> int:
    """Refuse up front a write the disk holding `path` cannot take, which would otherwise fail
    only at its end, after all the work; returns the free bytes, counting `reclaimable` (what
    the writer removes as it goes) as free."""
    try:
        free = free_bytes(path) + reclaimable
    except OSError as err:
        raise UserError(f"cannot read how much space the disk holding {path} has ({err.strerror or err}); "
                        f"check that the directories above it can be read") from None
    if free < needed:
        counted = f" (counting {format_bytes(reclaimable)} of unfinished saves, removed as it saves)" if reclaimable else ""
        raise UserError(f"the disk holding {path} has {format_bytes(free)} free{counted} and {what} takes "
                        f"{format_bytes(needed)}; {fix}")
    return free


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to NAME.tmp, sync, rename into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy to NAME.tmp, sync, rename into place."""
    tmp = Path(dst).with_name(Path(dst).name + ".tmp")
    shutil.copyfile(src, tmp)
    fsync_path(tmp)
    os.replace(tmp, dst)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_destination(dst: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """The absolute path a command may replace with --force, or a UserError saying why not.

    Replacing DST removes everything under it, so DST must not be, hold or sit inside
    the source, hold the current directory, or be a symbolic link (whose target the
    user may not mean to replace).
    """
    given = Path(dst)
    if given.is_symlink():
        raise UserError(f"destination {given} is a symbolic link; give the directory itself")
    real = given.resolve()
    if real == Path(real.anchor):
        raise UserError(f"destination {given} is the root directory; choose a directory to write into")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"destination {given} holds the current directory; choose a directory below it")
    if source is not None:
        src = Path(source).resolve()
        if src == real or src in real.parents or real in src.parents:
            raise UserError(f"destination {given} overlaps the source {source}; choose a directory outside it")
    return real


@contextmanager
def staged_directory(dst: str | os.PathLike, force: bool = False, source: str | os.PathLike | None = None,
                     room: Optional[tuple[int, str]] = None) -> Iterator[Path]:
    """A fresh sibling of `dst` to write into, renamed to `dst` only if the block completes.

    A non-empty `dst` is refused unless `force`; then it is replaced only once the new
    directory is complete (two renames: for a moment neither name exists, and a failed
    second rename puts the old directory back). `source`, when given, is what the block
    reads, which `dst` must not overlap. `room`, (bytes, what they are), is refused up front where
    the disk has less free: a replaced `dst` stays until the new one is complete.
    """
    given = dst
    dst = check_destination(dst, source)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{given} exists and is not a directory; choose another destination")
    if _non_empty(dst) and not force:
        raise UserError(f"{given} is not empty; choose another destination or pass --force to replace it")
    blocking = next((p for p in dst.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{given} lies under {blocking}, which is a file, not a directory; choose another destination")
    if room is not None:
        require_room(given, room[0], room[1], "free space there or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        for folder, _dirs, names in os.walk(tmp):  # what the block wrote, however it wrote it, then the entries
            for name in names:
                fsync_path(os.path.join(folder, name))
            fsync_path(folder)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dst.parent)


def _swap_in(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` to `dst`, moving a non-empty `dst` aside first."""
    if not _non_empty(dst):
        os.replace(tmp, dst)  # a rename replaces an empty directory
        return
    old = dst.with_name(f"{dst.name}.old-{secrets.token_hex(4)}")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
