"""torch.save's file format for a flat dict of tensors, read and written without torch.

Importing torch costs one core 1.5-2 s, about as long as writing a 1B model's
checkpoint; a reshard only moves bytes, so it reads and writes these files on its
own. Such a file is a zip archive of stored (uncompressed) records under one
folder, named after the file:

    NAME/data.pkl               a pickle (protocol 2) of the dict; each tensor is a call of
                                torch._utils._rebuild_tensor_v2 on a storage given by key
    NAME/.format_version, NAME/.storage_alignment, NAME/byteorder
    NAME/data/0, NAME/data/1 .. each storage's bytes, aligned to 64 in the file
    NAME/version, NAME/.data/serialization_id

laid out as torch's writer (miniz) lays them out: an "FB" extra field of padding
before each record's bytes, a data descriptor with its CRC-32 after them, zip64
fields where an offset or size reaches 4 GiB, and zip64 end records always. What
`tensor_pickle` and `ZipRecords` write is byte for byte what torch.save writes, but
for half of the serialization id (tests/test_torch_file.py, bench/check_zip64.py);
`read_tensor_records` reads such files and leaves anything else (objects that only
code can rebuild, the pre-zip format) to torch.load.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ALIGNMENT = 64  # torch's storage alignment within the file
ZIP64_LIMIT = 0xFFFFFFFF  # an offset or size from here on needs zip64 fields
BATCH = 1000  # dict items per SETITEMS, as pickle batches them
_U64 = (1 << 64) - 1
SERIALIZATION_ID = ".data/serialization_id"  # the last record


@dataclass(frozen=True)
class DType:
    name: str  # torch's name for it: torch.<name>
    storage: str  # the storage class data.pkl names
    numpy: type  # what its bytes are viewed as; bfloat16, which numpy lacks, as its 16 bits

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize


DTYPES = {d.name: d for d in (
    DType("float32", "FloatStorage", np.float32), DType("bfloat16", "BFloat16Storage", np.uint16),
    DType("float16", "HalfStorage", np.float16), DType("float64", "DoubleStorage", np.float64),
    DType("int64", "LongStorage", np.int64), DType("int32", "IntStorage", np.int32),
    DType("int16", "ShortStorage", np.int16), DType("int8", "CharStorage", np.int8),
    DType("uint8", "ByteStorage", np.uint8), DType("bool", "BoolStorage", np.bool_),
)}
_BY_STORAGE = {d.storage: d for d in DTYPES.values()}


def archive_name(path: Path) -> str:
    """The folder torch.save puts a file's records in: its name without the last suffix."""
    name = Path(path).name
    return name[: name.rfind(".")] if "." in name else name


# --------------------------------------------------------------------------- reading


@dataclass
class TensorRecord:
    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    offset: int  # in elements, from the start of its storage
    storage: str  # its storage's key: the record NAME/data/<storage>
    start: int = 0  # file offset of the storage's first byte
    nbytes: int = 0  # the storage's size


class _Storage(str):
    """A storage's key as data.pkl refers to it, with its dtype."""

    dtype: DType


class _TensorsOnly(pickle.Unpickler):
    """Rebuilds a dict of tensors as TensorRecords; any other global ends the reading."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_record
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # for the hooks argument and an OrderedDict of tensors alike
        if module == "torch" and name in _BY_STORAGE:
            return _BY_STORAGE[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, DType):
            raise pickle.UnpicklingError(f"storage {pid!r}")
        storage = _Storage(key)
        storage.dtype = dtype
        return storage


def _tensor_record(storage, offset, shape, stride, *_rest) -> TensorRecord:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return TensorRecord(storage.dtype, tuple(shape), tuple(stride), offset, str(storage))


def read_tensor_records(path: Path) -> Optional[dict[str, TensorRecord]]:
    """Each tensor of a torch.save file of a flat dict, with where its storage's bytes lie.

    None where the file is not one this module reads (not a zip, a big-endian machine's,
    a compressed record, something besides tensors, or broken): torch.load then reads it,
    or says what is wrong with it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                return None
            folder = pickles[0][: -len("data.pkl")]
            # a file from before torch wrote its byte order is little-endian
            if folder + "byteorder" in archive.namelist() and archive.read(folder + "byteorder") != b"little":
                return None
            state = _TensorsOnly(io.BytesIO(archive.read(pickles[0]))).load()
            infos = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, AttributeError,
            IndexError, OSError):
        return None
    if not isinstance(state, dict) or not all(isinstance(v, TensorRecord) for v in state.values()):
        return None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for record in state.values():
            info = infos.get(f"{folder}data/{record.storage}")
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            record.start, record.nbytes = info.header_offset + 30 + name_len + extra_len, info.file_size
            if record.start + record.nbytes > size:  # a directory that claims more than the file holds
                return None
            extent = 1 + sum((n - 1) * s for n, s in zip(record.shape, record.stride))
            if min(record.shape, default=1) > 0 and (
                    record.offset < 0 or min(record.stride, default=0) < 0
                    or (record.offset + extent) * record.dtype.itemsize > record.nbytes):
                return None
    return state


# --------------------------------------------------------------------------- writing


class _Pickle:
    """Pickle opcodes as Python's pickler writes them at protocol 2, with its memo."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[object, int] = {}

    def put(self, key: object = None) -> None:
        index = len(self.memo)
        self.memo[key if key is not None else ("anonymous", index)] = index
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def recall(self, key: object) -> bool:
        index = self.memo.get(key)
        if index is not None:
            self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return index is not None

    def global_(self, module: str, name: str) -> None:
        if not self.recall(("global", module, name)):
            self.out += f"c{module}\n{name}\n".encode()
            self.put(("global", module, name))

    def string(self, text: str, shared: bool = False) -> None:
        """A str; `shared` for one object pickled many times (memoized, then fetched)."""
        if shared and self.recall(("str", text)):
            return
        data = text.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(data)) + data
        self.put(("str", text) if shared else None)

    def int_(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])
        elif 0 <= n < 65536:
            self.out += b"M" + struct.pack("<H", n)
        elif -(1 << 31) <= n < (1 << 31):
            self.out += b"J" + struct.pack("<i", n)
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def int_tuple(self, values: tuple[int, ...]) -> None:
        if not values:
            self.out += b")"
            return
        if len(values) > 3:
            self.out += b"("
        for value in values:
            self.int_(value)
        self.out += b"t" if len(values) > 3 else b"\x85\x86\x87"[len(values) - 1 : len(values)]
        self.put()


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)  # as torch strides a tensor with an empty dimension
    return tuple(reversed(stride))


def tensor_pickle(specs: dict[str, tuple[tuple[int, ...], DType]]) -> bytes:
    """data.pkl for a dict of contiguous tensors of these shapes and dtypes, in this order,
    each with a storage of its own keyed "0", "1", ...: what torch.save writes for it."""
    p = _Pickle()
    p.out += b"}"
    p.put()
    items = list(specs.items())
    for first in range(0, len(items), BATCH):
        batch = items[first : first + BATCH]
        if len(batch) > 1:
            p.out += b"("
        for index, (key, (shape, dtype)) in enumerate(batch, first):
            p.string(key)
            p.global_("torch._utils", "_rebuild_tensor_v2")
            p.out += b"(("  # its arguments, and the storage's persistent id
            p.string("storage", shared=True)
            p.global_("torch", dtype.storage)
            p.string(str(index))
            p.string("cpu", shared=True)
            p.int_(math.prod(shape))  # the storage's size in elements
            p.out += b"t"
            p.put()
            p.out += b"Q"
            p.int_(0)  # the offset into the storage
            p.int_tuple(tuple(shape))
            p.int_tuple(contiguous_stride(tuple(shape)))
            p.out += b"\x89"  # requires_grad=False
            p.global_("collections", "OrderedDict")  # no backward hooks
            p.out += b")R"
            p.put()
            p.out += b"t"
            p.put()
            p.out += b"R"
            p.put()
        p.out += b"u" if len(batch) > 1 else b"s"
    return bytes(p.out + b".")


def head_records(specs: dict[str, tuple[tuple[int, ...], DType]]) -> list[tuple[str, bytes]]:
    """The records before the storages, in torch's order."""
    return [("data.pkl", tensor_pickle(specs)), (".format_version", b"1"), (".storage_alignment", b"64"),
            ("byteorder", b"little")]


def tail_records() -> list[tuple[str, bytes]]:
    """The records after the storages, but for the last, SERIALIZATION_ID (ZipRecords.serialization_id)."""
    return [("version", b"3\n")]


def _fold(seed: int, value: int) -> int:
    """c10::hash_combine on 64 bits."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _U64)) & _U64


@dataclass
class _Entry:
    name: bytes
    offset: int
    size: int
    zip64: bytes  # the central directory's zip64 extra field; b"" if none
    flags: int
    crc: int = 0


def _field(value: int) -> int:
    """A 4-byte size or offset: 0xFFFFFFFF where the zip64 fields hold it."""
    return value if value < ZIP64_LIMIT else 0xFFFFFFFF


def _zip64_extra(fields: list[int]) -> bytes:
    return struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""


class ZipRecords:
    """The bytes around each record of a zip written front to back, as torch's writer makes them.

    For each record: header(name, offset, size) before its bytes, descriptor(crc) after
    (nothing for an empty record); directory(offset) at the end. An offset is where the
    next byte goes in the file.
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def header(self, name: str, offset: int, size: int) -> bytes:
        big_size, big_offset = size >= ZIP64_LIMIT, offset >= ZIP64_LIMIT
        local64, central64 = _zip64_extra([size, 0] * big_size + [offset] * big_offset), b""
        if local64:  # the local header says the compressed size is 0: written before the bytes
            central64 = _zip64_extra([size, size] * big_size + [offset] * big_offset)
        encoded = name.encode()
        unpadded = offset + 30 + len(encoded) + len(local64) + 4
        padding = -unpadded % ALIGNMENT
        extra = local64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        # UTF-8 names; the CRC and sizes in a data descriptor after the bytes, unless there are none
        flags = 0x0800 | (0x0008 if size else 0)
        self.entries.append(_Entry(encoded, offset, size, central64, flags))
        # version 0, stored, no time; CRC and sizes 0 here
        return (struct.pack("<4s2H3H3I2H", b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(encoded), len(extra))
                + encoded + extra)

    def descriptor(self, crc: int) -> bytes:
        entry = self.entries[-1]
        entry.crc = crc
        if not entry.size:
            return b""
        sizes = "QQ" if entry.zip64 else "II"
        return struct.pack(f"<4sI{sizes}", b"PK\x07\x08", crc, entry.size, entry.size)

    def serialization_id(self) -> bytes:
        """What torch writes last: 40 digits, 20 folded from the record names so far and 20 from
        the CRC-32s of the non-empty ones, with c10::hash_combine. The CRC half is torch's own;
        torch folds the names in the order of a C++ hash set, and this in file order (nothing
        reads the id back, but the same tensors always give the same file)."""
        names = crcs = 0
        for e in self.entries:
            name = e.name.split(b"/", 1)[-1]  # without the file's folder, as torch
            names = _fold(names, int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little"))
            crcs = _fold(crcs, e.crc) if e.size else crcs
        return b"%020d%020d" % (names, crcs)

    def directory(self, offset: int) -> bytes:
        out = bytearray()
        for e in self.entries:
            size, where = _field(e.size), _field(e.offset)
            out += struct.pack("<4s4H2H3I5H2I", b"PK\x01\x02", 0, 0, e.flags, 0, 0, 0, e.crc, size, size,
                               len(e.name), len(e.zip64), 0, 0, 0, 0, where) + e.name + e.zip64
        n, size, end = len(self.entries), len(out), offset + len(out)
        out += struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, size, offset)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
        out += struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), _field(size),
                           _field(offset), 0)
        return bytes(out)


# --------------------------------------------------------------------------- to and from torch


def dtype_of(tensor) -> DType:
    """The DType of a torch tensor or torch.dtype."""
    name = str(getattr(tensor, "dtype", tensor)).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"a {name} tensor has no place in a checkpoint here; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def as_numpy(tensor) -> np.ndarray:
    """A CPU tensor's memory as an array (bfloat16's as its 16 bits), no copy."""
    import torch

    tensor = tensor.detach()
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def as_torch(array: np.ndarray, dtype: DType):
    """The array's memory as a torch tensor of `dtype`, no copy."""
    import torch

    if dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
