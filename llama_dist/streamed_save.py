"""Save a dict of tensors to a torch.load-able file without holding the tensors in memory.

torch.save wants every tensor whole at once; a reshard to MP=1 would then hold
the whole model. Here torch.save writes a skeleton under skip_data (the file gets
a hole per storage), and the file is written again front to back: the skeleton's
own bytes, each tensor's bytes block by block, and the CRC-32s that torch's zip
keeps after each record. Without skip_data (torch < 2.5) or with an unknown layout
it falls back to torch.save.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from llama_dist.files import fsync_path, sha256_file, start_writeback

try:  # zlib-ng's CRC-32 folds with carry-less multiplies: 11.6 GB/s against zlib's 3.0 on a 2-core EPYC
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the same numbers, slower
    from zlib import crc32

# torch.save can leave storage bytes as holes to fill in later (torch >= 2.5)
_STREAMING_SAVE = hasattr(torch.serialization, "skip_data")


class _StorageRefs(pickle.Unpickler):
    """Reads a torch.save data.pkl only far enough to learn which zip record holds each tensor."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, _is_contiguous(size, stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a torch.save skeleton")

    def persistent_load(self, pid):
        return pid[2]  # ('storage', storage type, record key, location, numel)


def _is_contiguous(size: tuple, stride: tuple) -> bool:
    """Row-major with no gaps, as Tensor.is_contiguous judges it (a dimension of size 1 has any stride)."""
    expected = 1
    for n, step in zip(reversed(size), reversed(stride)):
        if n != 1 and step != expected:
            return False
        expected *= n
    return True


@dataclass
class StorageRecord:
    record: str  # the zip member that holds a tensor's storage
    start: int  # file offset of its bytes
    nbytes: int
    crc_at: Optional[int]  # file offset of its CRC-32 in the data descriptor after the bytes; None: no descriptor


def storage_records(path: Path) -> Optional[dict[str, StorageRecord]]:
    """Where each tensor's bytes lie in a torch.save file of a flat dict; None if the layout is another."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickle_name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), "")
            refs = _StorageRefs(io.BytesIO(zf.read(pickle_name))).load() if pickle_name else {}
            infos = {info.filename: info for info in zf.infolist()}
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, EOFError):
        return None
    if not isinstance(refs, dict):
        return None
    prefix, records = pickle_name[: -len("data.pkl")], {}
    with open(path, "rb") as f:
        for key, ref in refs.items():
            if not isinstance(ref, tuple):
                return None
            storage, element_offset, contiguous = ref
            info = infos.get(f"{prefix}data/{storage}")
            # torch stores each member uncompressed (and, when it writes, with a data descriptor);
            # a strided view (a transposed weight, say) is not its storage's bytes in order
            if info is None or element_offset or not contiguous or info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            crc_at = None
            if info.flag_bits & 8:
                f.seek(start + info.file_size)
                signature = f.read(4) == b"PK\x07\x08"  # the descriptor's signature is optional in zip
                crc_at = start + info.file_size + 4 * signature
            records[key] = StorageRecord(info.filename, start, info.file_size, crc_at)
    return records if len(records) == len(refs) > 0 else None


# How the bytes reach the disk. A write through the page cache first gets a fresh page
# for every 4 KiB, and on a VM that hands free memory back to its host (Firecracker's free
# page reporting) the host must fault each one back in: 4 GiB written through the cache
# took 15-18 s and 14-17 CPU s on the 2-core VM this was written on, against 3.0-3.7 s
# and 0.3 CPU s with O_DIRECT from buffers used over and over. O_DIRECT also leaves the
# page cache to the data loader. Where the file system refuses it, the same windows go
# through the cache.
DIRECT_IO = hasattr(os, "O_DIRECT")
_NO_DIRECT_IO = (errno.EINVAL, errno.EOPNOTSUPP)  # what a file system without it answers
ALIGN = max(4096, mmap.PAGESIZE)  # O_DIRECT wants the buffer, offset and length on a block boundary
WINDOW = 8 << 20  # bytes per write
WINDOWS = 4  # one window being filled while the others are written and hashed
# The most one write through the page cache is handed. A larger write lets the kernel
# fill the cache with 2 MiB folios, which on such a VM come from memory the host must
# fault back in: 1 GiB written into a new file 4 s after freeing as much took 2.4-3.9 s
# in 2, 4 and 32 MiB writes and 0.3-0.9 s in 64 KiB-1 MiB ones
# (bench/bench_write_pieces.py measures it).
WRITE_PIECE = 1 << 20


def _pwrite_all(fd: int, data, pos: int) -> None:
    data = memoryview(data).cast("B")
    while data:
        written = os.pwrite(fd, data[:WRITE_PIECE], pos)
        data, pos = data[written:], pos + written


class _OrderedFile:
    """A new file written front to back through a ring of page-aligned windows.

    A full window goes to a writer (two threads, so that the disk always has a write
    queued) and to the file's sha256, which one thread takes in file order; a window is
    refilled once both are done with it. With O_DIRECT the last window is padded to a
    whole block and the file cut back to its length when closed.
    """

    def __init__(self, path: Path, digest) -> None:
        flags, self.direct = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, DIRECT_IO
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as err:  # a file system without direct I/O (tmpfs on older kernels, some FUSE)
            if not self.direct or err.errno not in _NO_DIRECT_IO:
                raise
            self.direct, self.fd = False, os.open(path, flags, 0o644)
        self._digest = digest
        self._windows = [mmap.mmap(-1, WINDOW) for _ in range(WINDOWS)]
        self._jobs: list[list] = [[] for _ in range(WINDOWS)]
        self._index = self._used = self._handed_on = 0
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streamed-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamed-hash")

    @property
    def position(self) -> int:
        """Bytes appended so far: the file offset of the next one."""
        return self._handed_on + self._used

    def append(self, data) -> None:
        data = memoryview(data).cast("B")
        while data:
            take = min(len(data), WINDOW - self._used)
            self._windows[self._index][self._used : self._used + take] = data[:take]
            self._used, data = self._used + take, data[take:]
            if self._used == WINDOW:
                self._hand_on()

    def _hand_on(self) -> None:
        window, used, pos = self._windows[self._index], self._used, self._handed_on
        padded = -(-used // ALIGN) * ALIGN  # only the last window can be short
        window[used:padded] = bytes(padded - used)
        self._jobs[self._index] = [self._hasher.submit(self._digest.update, memoryview(window)[:used]),
                                   self._writer.submit(self._write, memoryview(window)[:padded], pos)]
        self._handed_on += used
        self._index, self._used = (self._index + 1) % WINDOWS, 0
        self._wait(self._index)

    def _wait(self, index: int) -> None:
        for job in self._jobs[index]:
            job.result()  # re-raises a failed write, e.g. a full disk
        self._jobs[index] = []

    def _write(self, data: memoryview, pos: int) -> None:
        if self.direct:
            try:
                while data:
                    written = os.pwrite(self.fd, data, pos)
                    data, pos = data[written:], pos + written
                return
            except OSError as err:
                if err.errno not in _NO_DIRECT_IO:
                    raise
                # opened, but refused at the first write (a block larger than ALIGN): the cache then
                import fcntl  # Unix only, as O_DIRECT is

                self.direct = False
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        _pwrite_all(self.fd, data, pos)
        start_writeback(self.fd, pos, len(data))

    def close(self) -> None:
        """The last window, then the file cut to its length and flushed to the disk."""
        if self._used:
            self._hand_on()
        for index in range(WINDOWS):
            self._wait(index)
        os.ftruncate(self.fd, self._handed_on)
        os.fsync(self.fd)

    def release(self) -> None:
        """After close or a failure: no write may land once the descriptor is closed."""
        for pool in (self._writer, self._hasher):
            pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)


def _patch_central_crcs(tail: bytearray, base: int, crcs: dict[str, int]) -> None:
    """Write each record's CRC-32 into its central directory entry (zip64 or not).

    `tail` is the end of the file, from offset `base`: the central directory and the
    end records, which torch's zip writer puts after the last record.
    """
    def read(offset: int, nbytes: int) -> bytes:
        if not base <= offset <= offset + nbytes <= base + len(tail):
            raise RuntimeError("unexpected zip layout: the central directory is not after the last record")
        return bytes(tail[offset - base : offset - base + nbytes])

    size = base + len(tail)
    end = read(size - 22, 22)
    if end[:4] != b"PK\x05\x06":
        raise RuntimeError("unexpected zip layout: no end of central directory record")
    entries, pos = struct.unpack("<H", end[10:12])[0], struct.unpack("<I", end[16:20])[0]
    locator = read(size - 42, 20)
    if locator[:4] == b"PK\x06\x07":
        record = read(struct.unpack("<Q", locator[8:16])[0], 56)
        entries, pos = struct.unpack("<QQ", record[32:40] + record[48:56])
    for _ in range(entries):
        head = read(pos, 46)
        if head[:4] != b"PK\x01\x02":
            raise RuntimeError("unexpected zip layout in the central directory")
        name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
        name = read(pos + 46, name_len).decode()
        if name in crcs:
            tail[pos + 16 - base : pos + 20 - base] = struct.pack("<I", crcs[name])
        pos += 46 + name_len + extra_len + comment_len


def _skeleton_parts(path: Path, holes: list[StorageRecord]) -> list[bytearray]:
    """The skeleton's bytes around its holes (in file order): before the first, between
    each two, after the last."""
    with open(path, "rb") as f:
        bounds = [0, *(end for hole in holes for end in (hole.start, hole.start + hole.nbytes)),
                  os.fstat(f.fileno()).st_size]
        parts = []
        for start, end in zip(bounds[::2], bounds[1::2]):
            if end < start:
                raise RuntimeError(f"overlapping records in the torch.save skeleton of {path.name}")
            f.seek(start)
            parts.append(bytearray(f.read(end - start)))
    return parts


# What fill(key) yields: a tensor, or parts to be joined on their last dimension
Block = Union[torch.Tensor, list[torch.Tensor]]
Spec = tuple[tuple[int, ...], torch.dtype]  # a tensor's shape and dtype


class _Staging:
    """One buffer, used again and again, for blocks that must be assembled (joined, made
    contiguous or cast): a new buffer per block would be faulted in page by page every
    time, which on a VM costs several times the copy itself. A block is copied into the
    file's window before the next one is assembled."""

    def __init__(self) -> None:
        self._buffer: Optional[torch.Tensor] = None

    def assemble(self, block: Block, dtype: torch.dtype) -> torch.Tensor:
        """`block` as one contiguous tensor of `dtype`, copied into the buffer only if it must be."""
        if isinstance(block, torch.Tensor):
            if block.dtype == dtype and block.is_contiguous():
                return block
            shape = block.shape
        else:
            shape = (*block[0].shape[:-1], sum(part.shape[-1] for part in block))
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        staged = self._buffer[:nbytes].view(dtype).view(shape)
        if isinstance(block, torch.Tensor):
            staged.copy_(block)
        else:
            torch.cat(block, dim=-1, out=staged)
        return staged


def _joined(block: Block) -> torch.Tensor:
    return block if isinstance(block, torch.Tensor) else torch.cat(block, dim=-1)


def save_streamed(path: Path, specs: dict[str, Spec],
                  fill: Callable[[str], Iterator[Block]]) -> str:
    """A torch.load-able file of `specs` whose bytes come from fill(key) block by block; its sha256.

    torch.save wants every tensor in memory at once. Instead: save placeholders under
    skip_data (torch.empty reserves address space that stays untouched, so not
    resident; the file gets a hole per storage), keep the bytes around the holes, and
    write the file again front to back: those bytes, each record's blocks, and the
    CRC-32s that torch's zip keeps after each record and in its central directory. A
    block may be a list of parts joined on their last dimension (rows stitched from
    shards). The writes (O_DIRECT where the file system takes it) and the sha256 run in
    threads of their own while the next blocks are assembled.
    """
    tmp, holes = Path(f"{path}.tmp"), None
    if _STREAMING_SAVE:
        placeholders = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}
        with torch.serialization.skip_data():
            torch.save(placeholders, tmp)
        del placeholders
        holes = storage_records(tmp)
        if holes is not None and any(hole.crc_at is None for hole in holes.values()):
            holes = None
    if holes is None:  # no skip_data, or a layout we do not know: a plain torch.save
        torch.save({k: torch.cat([_joined(b).reshape(-1).to(dtype) for b in fill(k)]).view(shape)
                    for k, (shape, dtype) in specs.items()}, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        return sha256_file(path)
    ordered = sorted(holes.items(), key=lambda item: item[1].start)
    parts = _skeleton_parts(tmp, [hole for _, hole in ordered])
    digest, crcs, staging = hashlib.sha256(), {}, _Staging()
    out = _OrderedFile(tmp, digest)  # truncates the skeleton, whose bytes are in `parts` now
    try:
        for (key, hole), before, after in zip(ordered, parts, parts[1:]):
            out.append(before)
            crc, end = 0, hole.start + hole.nbytes
            for block in fill(key):
                data = memoryview(staging.assemble(block, specs[key][1]).reshape(-1).view(torch.uint8).numpy())
                if out.position + len(data) > end:
                    raise RuntimeError(f"'{key}' overflows its {hole.nbytes} bytes in {path.name}")
                crc = crc32(data, crc)
                out.append(data)
            if out.position != end:
                raise RuntimeError(f"'{key}' filled {out.position - hole.start} of its {hole.nbytes} bytes "
                                   f"in {path.name}")
            after[hole.crc_at - end : hole.crc_at - end + 4] = struct.pack("<I", crc)  # its data descriptor
            crcs[hole.record] = crc
        _patch_central_crcs(parts[-1], out.position, crcs)
        out.append(parts[-1])
        out.close()
    finally:
        out.release()
    os.replace(tmp, path)
    return digest.hexdigest()
