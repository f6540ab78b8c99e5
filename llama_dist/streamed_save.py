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
import os
import pickle
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from llama_dist.files import sha256_file

# torch.save can leave storage bytes as holes to fill in later (torch >= 2.5)
_STREAMING_SAVE = hasattr(torch.serialization, "skip_data")


class _StorageRefs(pickle.Unpickler):
    """Reads a torch.save data.pkl only far enough to learn which zip record holds each tensor."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, *rest: (storage, offset)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a torch.save skeleton")

    def persistent_load(self, pid):
        return pid[2]  # ('storage', storage type, record key, location, numel)


@dataclass
class _Hole:
    record: str  # the zip member that holds a tensor's storage
    start: int  # file offset of its bytes
    nbytes: int
    crc_at: int  # file offset of its CRC-32, in the data descriptor that follows the bytes


def _storage_holes(path: Path) -> Optional[dict[str, _Hole]]:
    """Where each tensor's bytes go in a torch.save file; None if the layout is not the known one."""
    with zipfile.ZipFile(path) as zf:
        pickle_name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), "")
        refs = _StorageRefs(io.BytesIO(zf.read(pickle_name))).load() if pickle_name else {}
        infos = {info.filename: info for info in zf.infolist()}
    prefix, holes = pickle_name[: -len("data.pkl")], {}
    with open(path, "rb") as f:
        for key, (storage, element_offset) in refs.items():
            info = infos.get(f"{prefix}data/{storage}")
            # torch stores each member uncompressed, followed by a data descriptor (flag bit 3)
            if info is None or element_offset or info.compress_type != zipfile.ZIP_STORED or not info.flag_bits & 8:
                return None
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start + info.file_size)
            signature = f.read(4) == b"PK\x07\x08"  # the descriptor's signature is optional in zip
            holes[key] = _Hole(info.filename, start, info.file_size, start + info.file_size + 4 * signature)
    return holes if len(holes) == len(refs) > 0 else None


def _pwrite_all(fd: int, data, pos: int) -> None:
    data = memoryview(data)
    while data:
        written = os.pwrite(fd, data, pos)
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


def save_streamed(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   fill: Callable[[str], Iterator[torch.Tensor]]) -> str:
    """A torch.load-able file of `specs` whose bytes come from fill(key) block by block; its sha256.

    torch.save wants every tensor in memory at once. Instead: save placeholders under
    skip_data (torch.empty reserves address space that stays untouched, so not
    resident; the file gets a hole per storage), write the bytes into the holes in
    file order, then the CRC-32s, which torch's zip keeps after the data. One
    background thread hashes and writes (a write to a slow disk sleeps in the
    kernel's dirty-page throttling) while this one stitches the next block.
    """
    tmp, holes = Path(f"{path}.tmp"), None
    if _STREAMING_SAVE:
        placeholders = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}
        with torch.serialization.skip_data():
            torch.save(placeholders, tmp)
        del placeholders
        holes = _storage_holes(tmp)
    if holes is None:  # no skip_data, or a layout we do not know: a plain torch.save
        torch.save({k: torch.cat([b.reshape(-1).to(dtype) for b in fill(k)]).view(shape)
                    for k, (shape, dtype) in specs.items()}, tmp)
        os.replace(tmp, path)
        return sha256_file(path)
    digest, hashed, crcs, pending = hashlib.sha256(), 0, {}, collections.deque()
    fd = os.open(tmp, os.O_RDWR)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamed-save")

    def write(data: memoryview, pos: int) -> None:  # the jobs run in the writer thread, in file order
        digest.update(data)
        _pwrite_all(fd, data, pos)

    def hash_file(start: int, end: int) -> None:  # zip headers and descriptors, final by now
        digest.update(os.pread(fd, end - start, start))

    def submit(*job) -> None:
        pending.append(pool.submit(*job))
        while len(pending) > 2:
            pending.popleft().result()  # re-raises a failed write, e.g. a full disk

    try:
        for key, hole in sorted(holes.items(), key=lambda item: item[1].start):
            submit(hash_file, hashed, hole.start)
            pos, crc = hole.start, 0
            for block in fill(key):
                data = memoryview(block.to(specs[key][1]).contiguous().reshape(-1).view(torch.uint8).numpy())
                if pos + len(data) > hole.start + hole.nbytes:
                    raise RuntimeError(f"'{key}' overflows its {hole.nbytes} bytes in {path.name}")
                crc = zlib.crc32(data, crc)
                submit(write, data, pos)
                pos += len(data)
            if pos != hole.start + hole.nbytes:
                raise RuntimeError(f"'{key}' filled {pos - hole.start} of its {hole.nbytes} bytes in {path.name}")
            # before the job that hashes this descriptor is submitted, at the next hole
            _pwrite_all(fd, struct.pack("<I", crc), hole.crc_at)
            crcs[hole.record], hashed = crc, pos
        while pending:
            pending.popleft().result()
        _patch_central_crcs(fd, crcs)
        size = os.fstat(fd).st_size
        while hashed < size:  # the last descriptors and the central directory
            block = os.pread(fd, min(size - hashed, 16 << 20), hashed)
            digest.update(block)
            hashed += len(block)
    finally:
        pool.shutdown(wait=True)  # no write may land after the fd is closed
        os.close(fd)
    os.replace(tmp, path)
    return digest.hexdigest()
