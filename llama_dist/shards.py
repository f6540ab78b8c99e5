"""Token shards that describe themselves, and the manifest that lists them.

A shard is a 32-byte header followed by the tokens, little-endian:

    offset  size  field
    0       8     magic b"LLDTOKNS"
    8       4     format version (uint32)
    12      4     bytes per token: 2 (uint16) or 4 (uint32)
    16      8     token count (uint64)
    24      8     reserved, zero

so a reader can memory-map the tokens at offset 32 without the manifest, and a
truncated or foreign file is caught before any training step reads it.
`manifest.json` beside the shards records the tokenizer and every shard's split,
token count and sha256; it is written last, so a directory without one is an
unfinished `llama-dist prepare`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np

from llama_dist.errors import UserError
from llama_dist.files import sha256_file

MAGIC = b"LLDTOKNS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_SIZE = HEADER.size  # 32
MANIFEST = "manifest.json"
PROGRESS_FILE = "prepare.progress.json"  # an unfinished prepare's checkpoint, beside its shards
MANIFEST_FORMAT = "llama_dist.tokens"
SPLITS = ("train", "val")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (ids run 0..vocab_size-1), uint32 beyond."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return DTYPES[2]
    if vocab_size <= 2**32:
        return DTYPES[4]
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def check_fits(tokens: np.ndarray, dtype: np.dtype) -> None:
    """Refuse ids the shard dtype cannot hold: a silent wrap would corrupt training."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    limit = np.iinfo(dtype).max
    if low < 0 or high > limit:
        raise ValueError(f"token ids span [{low}, {high}] but shard dtype {dtype.name} holds [0, {limit}]")


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    count: int


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check a shard header; a wrong magic, version or length is a UserError."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise UserError(f"{path}: truncated shard ({len(raw)} bytes, no complete header); rerun llama-dist prepare")
    magic, version, width, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path}: not a llama_dist token shard (bad magic {magic!r}); rerun llama-dist prepare")
    if version != VERSION:
        raise UserError(
            f"{path}: shard format version {version}, this llama_dist reads version {VERSION}; "
            "rerun llama-dist prepare"
        )
    if width not in DTYPES:
        raise UserError(f"{path}: unknown token width {width} bytes in the header; rerun llama-dist prepare")
    expected = HEADER_SIZE + count * width
    actual = path.stat().st_size
    if actual != expected:
        raise UserError(
            f"{path}: header says {count} tokens ({expected} bytes) but the file has {actual} bytes "
            "(truncated or overwritten); rerun llama-dist prepare"
        )
    return ShardHeader(version, DTYPES[width], count)


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only memory map: every process shares the page cache."""
    header = read_header(path)
    if header.count == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.count,))


def written_by_prepare(name: str) -> bool:
    """Whether `name` is a file prepare writes into its out dir: a shard, the manifest or the
    progress file, or the NAME.tmp of one. The only files prepare deletes, and files no input
    should read back."""
    stem = name.removesuffix(".tmp")
    return (stem.endswith(".bin") and stem.split("-", 1)[0] in SPLITS) or stem in (PROGRESS_FILE, MANIFEST)


class ShardWriter:
    """Streams tokens into `<path>.tmp` and renames it to `path` on close.

    Tokens go straight to disk, so memory stays bounded however large the shard.
    Until `close()` returns, only the temporary name exists.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in DTYPES:
            raise ValueError(f"shard dtype must be uint16 or uint32, got {dtype}")
        self.count = 0
        self._file: Optional[BinaryIO] = open(self.tmp_path, "wb")
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:  # ids already in the shard dtype cannot be out of its range
            check_fits(tokens, self.dtype)
        assert self._file is not None, "write after close"
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.count += int(tokens.size)

    def close(self) -> dict[str, Any]:
        """Fill in the count, sync, rename into place; return the shard's manifest entry."""
        assert self._file is not None, "closed twice"
        try:
            self._file.seek(0)
            self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count))
            self._file.flush()  # where a full disk often shows first: the writes only filled the buffer
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            digest = sha256_file(self.tmp_path)
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        return {"file": self.path.name, "tokens": self.count, "sha256": digest}

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # flushes what is buffered, which fails again on a full disk
            except OSError:
                pass
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> dict[str, Any]:
    """One whole shard at once (tests and small tools); returns its manifest entry."""
    writer = ShardWriter(path, dtype)
    try:
        writer.write(tokens)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------- manifest


def make_manifest(tokenizer_sha256: str, vocab_size: int, shards: list[dict[str, Any]],
                  **extra: Any) -> dict[str, Any]:
    """The manifest for `shards` (entries with file, split, tokens, sha256)."""
    dtype = dtype_for_vocab(vocab_size)
    splits: dict[str, int] = {}
    for entry in shards:
        splits[entry["split"]] = splits.get(entry["split"], 0) + entry["tokens"]
    return {
        "format": MANIFEST_FORMAT,
        "version": VERSION,
        "tokenizer": {"sha256": tokenizer_sha256, "vocab_size": vocab_size},
        "dtype": dtype.name,
        "splits": splits,
        "shards": shards,
        **extra,
    }


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory; every way it can be missing or broken says what to run."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    hint = f"run `llama-dist prepare --input SRC --tokenizer PATH --out {data_dir}`"
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} is a file, not a directory; give the directory "
                        f"`llama-dist prepare` wrote, or {hint}")
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; {hint}")
    if not path.is_file():
        if any(data_dir.glob("*.progress.json")) or any(data_dir.glob("*.tmp")):
            raise UserError(f"{data_dir} holds an unfinished prepare (no {MANIFEST}); rerun it to finish: {hint}")
        raise UserError(f"no prepared data in {data_dir} ({MANIFEST} is missing); {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a llama_dist token manifest; {hint}")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} has format version {manifest.get('version')}, expected {VERSION}; {hint}")
    return manifest
