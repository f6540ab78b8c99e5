"""Save a dict of tensors to a torch.load-able file without holding the tensors in memory.

torch.save wants every tensor whole at once; a reshard to MP=1 would then hold
the whole model. Here torch.save writes a skeleton under skip_data (the file gets
a hole per storage), and the bytes are written into the holes block by block,
followed by the CRC-32s that torch's zip keeps after each record. Without
skip_data (torch < 2.5) or with an unknown layout it falls back to torch.save.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
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


# CRC-32 of a concatenation from the CRC-32s of its parts: multiplication of polynomials
# over GF(2) modulo the CRC's (bit-reflected) generator, as zlib's crc32_combine does it
_CRC_POLY = 0xEDB88320


def _multiply_mod_p(a: int, b: int) -> int:
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


def _x_to_8n_mod_p(nbytes: int) -> int:
    """x^(8 * nbytes) mod p, by squaring."""
    result, power = 1 << 31, 1 << 23  # x^0, x^8 (bit-reflected: x^k is bit 31 - k)
    while nbytes:
        if nbytes & 1:
            result = _multiply_mod_p(power, result)
        nbytes >>= 1
        power = _multiply_mod_p(power, power)
    return result


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32(a + b) from crc32(a), crc32(b) and len(b)."""
    return _multiply_mod_p(_x_to_8n_mod_p(len_b), crc_a) ^ crc_b


# The most one pwrite is handed. A larger write lets the kernel fill the page cache with
# 2 MiB folios, which on a VM that hands free memory back to its host (Firecracker's
# free page reporting) come from memory the host must fault back in: writing 1 GiB into
# a new file 4 s after freeing as much took 2.4-3.9 s in 2, 4 and 32 MiB writes and
# 0.3-0.9 s in 64 KiB-1 MiB ones. A 1B reshard 2 -> 1 took 8.5-12.6 s against 11.1-13.9
# with 32 MiB writes (four runs each, alternated). bench/bench_write_pieces.py measures it.
WRITE_PIECE = 1 << 20


def _pwrite_all(fd: int, data, pos: int) -> None:
    data = memoryview(data).cast("B")
    while data:
        written = os.pwrite(fd, data[:WRITE_PIECE], pos)
        data, pos = data[written:], pos + written


def _patch_central_crcs(fd: int, crcs: dict[str, int]) -> None:
    """Write each record's CRC-32 into its central directory entry (zip64 or not)."""
    size = os.fstat(fd).st_size
    end = os.pread(fd, 22, size - 22)
    if end[:4] != b"PK\x05\x06":
        raise RuntimeError("unexpected zip layout: no end of central directory record")
    entries, pos = struct.unpack("<H", end[10:12])[0], struct.unpack("<I", end[16:20])[0]
    locator = os.pread(fd, 20, size - 42)
    if locator[:4] == b"PK\x06\x07":
        record = os.pread(fd, 56, struct.unpack("<Q", locator[8:16])[0])
        entries, pos = struct.unpack("<QQ", record[32:40] + record[48:56])
    for _ in range(entries):
        head = os.pread(fd, 46, pos)
        if head[:4] != b"PK\x01\x02":
            raise RuntimeError("unexpected zip layout in the central directory")
        name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
        name = os.pread(fd, name_len, pos + 46).decode()
        if name in crcs:
            _pwrite_all(fd, struct.pack("<I", crcs[name]), pos + 16)
        pos += 46 + name_len + extra_len + comment_len


def _copy_range(src_fd: int, src_pos: int, dst_fd: int, dst_pos: int, data: memoryview) -> None:
    """`data` (bytes of src_fd at src_pos) into dst_fd at dst_pos: in the kernel where it can, else pwrite."""
    done = 0
    if _COPY_FILE_RANGE:
        try:
            while done < len(data):
                copied = os.copy_file_range(src_fd, dst_fd, len(data) - done, src_pos + done, dst_pos + done)
                if copied == 0:
                    break
                done += copied
        except OSError:  # another file system, an old kernel: the bytes are in memory anyway
            pass
    _pwrite_all(dst_fd, data[done:], dst_pos + done)


# Blocks between the one being stitched and the ones being written and hashed: a bound on
# the memory held (each at most a reshard's CHUNK_BYTES) that still keeps both cores busy.
IN_FLIGHT = 4
_COPY_FILE_RANGE = hasattr(os, "copy_file_range")

# What fill(key) yields: a tensor, or parts to be joined on their last dimension
Block = Union[torch.Tensor, list[torch.Tensor]]


class _Staging:
    """Buffers, used in turn, for blocks that must be assembled (joined, made contiguous or cast).

    A new buffer per block would be faulted in page by page every time, which on a VM
    costs several times the copy itself. The ring has IN_FLIGHT + 1 buffers: a buffer
    comes round again only after IN_FLIGHT more blocks have been submitted, and by
    then the block it held has been written, CRC-ed and hashed.
    """

    def __init__(self) -> None:
        self._buffers: list[Optional[torch.Tensor]] = [None] * (IN_FLIGHT + 1)
        self._next = 0

    def assemble(self, block: Block, dtype: torch.dtype) -> torch.Tensor:
        """`block` as one contiguous tensor of `dtype`, copied into a buffer only if it must be."""
        if isinstance(block, torch.Tensor):
            if block.dtype == dtype and block.is_contiguous():
                return block
            shape = block.shape
        else:
            shape = (*block[0].shape[:-1], sum(part.shape[-1] for part in block))
        nbytes = math.prod(shape) * dtype.itemsize
        index, self._next = self._next, (self._next + 1) % len(self._buffers)
        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[index] = torch.empty(nbytes, dtype=torch.uint8)
        staged = buffer[:nbytes].view(dtype).view(shape)
        if isinstance(block, torch.Tensor):
            staged.copy_(block)
        else:
            torch.cat(block, dim=-1, out=staged)
        return staged


def _joined(block: Block) -> torch.Tensor:
    return block if isinstance(block, torch.Tensor) else torch.cat(block, dim=-1)


def save_streamed(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  fill: Callable[[str], Iterator[Block]],
                  locate: Optional[Callable[[torch.Tensor], Optional[tuple[int, int]]]] = None) -> str:
    """A torch.load-able file of `specs` whose bytes come from fill(key) block by block; its sha256.

    torch.save wants every tensor in memory at once. Instead: save placeholders under
    skip_data (torch.empty reserves address space that stays untouched, so not
    resident; the file gets a hole per storage), write the bytes into the holes, then
    the CRC-32s, which torch's zip keeps after the data. A block may be a list of
    parts joined on their last dimension (rows stitched from shards). `locate(block)` may say
    that a block is the bytes of an open file at an offset (a memory-mapped source):
    those are copied by the kernel. A block's write, its CRC-32 (combined per record
    with crc32_combine) and its share of the file's sha256 run in threads of their
    own, so the three passes over the bytes share the cores; the disk's writeback of each
    block starts once it is written, so the closing fsync has little left to wait for
    (a 1.32 GB training checkpoint saved at 0.91-0.93 GB/s instead of 0.65, with the
    disk's own write + fsync at 1.25-1.32).
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
    digest, crcs, in_flight, staging = hashlib.sha256(), {}, collections.deque(), _Staging()
    fd = os.open(tmp, os.O_RDWR)
    # writes to one file serialise on its inode lock: one writer thread; CRC-32s in parallel
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamed-write")
    crc_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streamed-crc")
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamed-hash")

    def write(data: memoryview, pos: int, source: Optional[tuple[int, int]]) -> None:
        if source is None:
            _pwrite_all(fd, data, pos)
        else:
            _copy_range(source[0], source[1], fd, pos, data)
        start_writeback(fd, pos, len(data))

    def close_record(hole: StorageRecord, parts: list) -> None:
        """The record's CRC-32 from its blocks', into its data descriptor (before that is hashed)."""
        crc = 0
        for part, nbytes in parts:
            crc = crc32_combine(crc, part.result(), nbytes)
        _pwrite_all(fd, struct.pack("<I", crc), hole.crc_at)
        crcs[hole.record] = crc

    def hash_file(start: int, end: int) -> None:
        while start < end:
            block = os.pread(fd, min(end - start, 16 << 20), start)
            if not block:
                raise RuntimeError(f"{path.name} is shorter than its zip directory says")
            digest.update(block)
            start += len(block)

    def hash_gap(previous: Optional[tuple[StorageRecord, list]], start: int, end: int) -> None:
        if previous is not None:
            close_record(*previous)
        hash_file(start, end)

    def submit(*jobs) -> None:
        in_flight.append(jobs)
        while len(in_flight) > IN_FLIGHT:
            for job in in_flight.popleft():
                job.result()  # re-raises a failed write, e.g. a full disk

    try:
        previous, hashed = None, 0
        for key, hole in sorted(holes.items(), key=lambda item: item[1].start):
            submit(hasher.submit(hash_gap, previous, hashed, hole.start))
            pos, parts = hole.start, []
            for block in fill(key):
                block = staging.assemble(block, specs[key][1])
                source = locate(block) if locate is not None else None
                data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
                if pos + len(data) > hole.start + hole.nbytes:
                    raise RuntimeError(f"'{key}' overflows its {hole.nbytes} bytes in {path.name}")
                parts.append((crc_pool.submit(crc32, data), len(data)))
                submit(parts[-1][0], writer.submit(write, data, pos, source), hasher.submit(digest.update, data))
                pos += len(data)
            if pos != hole.start + hole.nbytes:
                raise RuntimeError(f"'{key}' filled {pos - hole.start} of its {hole.nbytes} bytes in {path.name}")
            previous, hashed = (hole, parts), pos
        # the last descriptors and the central directory, once its CRC-32s are patched
        hasher.submit(close_record, *previous).result()
        while in_flight:
            for job in in_flight.popleft():
                job.result()
        _patch_central_crcs(fd, crcs)
        hash_file(hashed, os.fstat(fd).st_size)
        os.fsync(fd)
    finally:
        # no write may land after the fd is closed
        for pool in (writer, crc_pool, hasher):
            pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)
    os.replace(tmp, path)
    return digest.hexdigest()
