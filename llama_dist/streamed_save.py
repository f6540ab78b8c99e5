"""Save a dict of tensors as torch.save would, without holding the tensors in memory.

torch.save wants every tensor whole at once; a reshard to MP=1 would then hold the
whole model. Here the file is written front to back, in torch's own layout
(torch_file): the records before the storages, each storage's bytes block by block
as fill(key) yields them, the CRC-32 after each record, and the central directory.
Only numpy is needed: the reshard that calls this never imports torch.
"""

from __future__ import annotations

import errno
import hashlib
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from llama_dist.files import start_writeback
from llama_dist.torch_file import SERIALIZATION_ID, DType, ZipRecords, archive_name, head_records, tail_records

try:  # zlib-ng's CRC-32 folds with carry-less multiplies: 11.6 GB/s against zlib's 3.0 on a 2-core EPYC
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the same numbers, slower
    from zlib import crc32


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
# Windows in the ring: one being filled while the others are written and hashed. With 4,
# a 1B reshard 2 -> 1 from cached sources took 4.3-4.9 s on the 2-core VM; with 8, 3.6-4.0 s
# (the hash and the disk take turns being slow; 16 gave no more).
WINDOWS = 8
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


# What fill(key) yields: an array, or parts to be joined on their last dimension
Block = Union[np.ndarray, list[np.ndarray]]
Spec = tuple[tuple[int, ...], DType]  # a tensor's shape and dtype

FLOAT_TYPES = {"float32", "float16", "bfloat16", "float64"}  # what cast_into converts between


def as_float32(array: np.ndarray, dtype: DType) -> np.ndarray:
    """The values as float32 (exactly, for every float dtype but float64)."""
    if dtype.name == "bfloat16":  # its 16 bits are a float32's top half
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def cast_into(out: np.ndarray, array: np.ndarray, src: DType, dst: DType) -> None:
    """`array` (of `src`) converted to `dst` into `out` bit for bit as torch's .to(dst) on a
    CPU: by way of float32, to nearest with ties to even, NaNs as torch makes them. (A half
    NaN widens with its payload, as torch's vectorised loop does; its scalar loop, which
    takes a tensor's last few elements, gives 0x7FFFFFFF.)"""
    if src == dst:  # any dtype: a copy (a column slice of an integer tensor comes here)
        np.copyto(out, array)
        return
    if src.name not in FLOAT_TYPES or dst.name not in FLOAT_TYPES:
        raise ValueError(f"cannot cast {src.name} to {dst.name}: only between floating-point types")
    wide = np.ascontiguousarray(array if src.name == "float32" else as_float32(array, src), dtype=np.float32)
    nan = np.isnan(wide)
    bits = wide.view(np.uint32)
    if dst.name == "bfloat16":
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        np.copyto(out, np.where(nan, 0xFFFF, rounded), casting="unsafe")
        return
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as in torch
        np.copyto(out, wide, casting="unsafe")
    if dst.name == "float16" and nan.any():  # torch keeps the sign and the payload's top bits, and quiets it
        quiet = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits & 0x7FFFFF) >> 13)
        out[nan] = quiet[nan].astype(np.uint16).view(np.float16)


class _Staging:
    """One buffer, used again and again, for blocks that must be assembled (joined, made
    contiguous or cast): a new buffer per block would be faulted in page by page every
    time, which on a VM costs several times the copy itself. A block is copied into the
    file's window before the next one is assembled."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)

    def assemble(self, block: Block, src: DType, dst: DType) -> np.ndarray:
        """`block` (of `src`) as one C-contiguous array of `dst`, copied into the buffer only if it must be."""
        parts = block if isinstance(block, list) else [block]
        if len(parts) == 1 and src == dst and parts[0].flags.c_contiguous:
            return parts[0]
        shape = (*parts[0].shape[:-1], sum(part.shape[-1] for part in parts)) if parts[0].ndim else ()
        nbytes = math.prod(shape) * dst.itemsize
        if self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        staged = self._buffer[:nbytes].view(dst.numpy).reshape(shape)
        if src == dst and len(parts) > 1:
            np.concatenate(parts, axis=-1, out=staged)
            return staged
        column = 0
        for part in parts:
            width = part.shape[-1] if part.ndim else 1
            cast_into(staged[..., column : column + width] if part.ndim else staged, part, src, dst)
            column += width
        return staged


def save_streamed(path: Path, specs: dict[str, Spec], fill: Callable[[str], Iterator[Block]],
                  sources: Optional[dict[str, DType]] = None) -> str:
    """A torch.load-able file of `specs` whose bytes come from fill(key) block by block; its sha256.

    The file is the one torch.save would write for a dict of tensors of these shapes and
    dtypes, in this order (but for half of the serialization id, see ZipRecords). A block may be a
    list of parts joined on their last dimension (rows stitched from shards); `sources`
    gives the dtype of the blocks of a key where it is not the file's (they are cast).
    The writes (O_DIRECT where the file system takes it) and the sha256 run in threads of
    their own while the next blocks are assembled. Written to NAME.tmp, synced, renamed.
    """
    tmp = Path(f"{path}.tmp")
    folder, sources = archive_name(path), sources or {}
    digest, records, staging = hashlib.sha256(), ZipRecords(), _Staging()
    out = _OrderedFile(tmp, digest)
    try:
        def record(name: str, blocks: Iterator, size: int) -> None:
            out.append(records.header(f"{folder}/{name}", out.position, size))
            crc, start = 0, out.position
            for data in blocks:
                if out.position - start + len(data) > size:
                    raise RuntimeError(f"{name} overflows its {size} bytes in {path.name}")
                crc = crc32(data, crc)
                out.append(data)
            if out.position - start != size:
                raise RuntimeError(f"{name} filled {out.position - start} of its {size} bytes in {path.name}")
            out.append(records.descriptor(crc))

        def storage(key: str) -> Iterator[np.ndarray]:
            shape, dtype = specs[key]
            for block in fill(key):
                yield staging.assemble(block, sources.get(key, dtype), dtype).reshape(-1).view(np.uint8)

        for name, data in head_records(specs):
            record(name, iter([data]), len(data))
        for index, (key, (shape, dtype)) in enumerate(specs.items()):
            record(f"data/{index}", storage(key), math.prod(shape) * dtype.itemsize)
        for name, data in tail_records():
            record(name, iter([data]), len(data))
        last = records.serialization_id()  # of the records before it
        record(SERIALIZATION_ID, iter([last]), len(last))
        out.append(records.directory(out.position))
        out.close()
    finally:
        out.release()
    os.replace(tmp, path)
    return digest.hexdigest()

