"""Writing files and directories so that a reader sees the old one or the new one, never half of either."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llama_dist.errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


@contextmanager
def staged_directory(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A fresh sibling of `dst` to write into, renamed to `dst` only if the block completes.

    A non-empty `dst` is refused unless `force`; then it is replaced only once the new
    directory is complete (two renames: for a moment neither name exists).
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory; choose another destination")
    if _non_empty(dst) and not force:
        raise UserError(f"{dst} is not empty; choose another destination or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _non_empty(dst):
        old = dst.with_name(f"{dst.name}.old-{secrets.token_hex(4)}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)  # a rename replaces an empty directory
    fsync_path(dst.parent)
