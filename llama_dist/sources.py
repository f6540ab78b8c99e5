"""Where text comes from: SRC specs resolved to files, files streamed as documents.

A SRC is a file (plain text, `.jsonl`, a `.json` array; `.gz` of any of them),
a directory or glob of such files, `stdlib` (the running Python's own library
sources: a real corpus on every machine, so the demo needs no download), or
`tinystories` (downloaded and unpacked once into a cache). Documents are
streamed one at a time, so no corpus is ever held in memory whole; a `.json`
array is the one file parsed whole (TinyStories' are about 250 MB each).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sysconfig
import tarfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

from llama_dist import shards
from llama_dist.errors import UserError

# files a directory contributes; an explicitly named file is read whatever its suffix
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".json"}
# plain-text files are cut at `<|endoftext|>` lines (TinyStories' .txt) and otherwise into
# documents of about this size, so one huge file neither fills memory nor starves the workers
DOC_CHUNK_BYTES = 1 << 20
END_OF_TEXT = b"<|endoftext|>"
END_OF_TEXT_LINE = re.compile(rb"^[ \t]*<\|endoftext\|>[ \t]*\r?(?:\n|\Z)", re.MULTILINE)
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
TINYSTORIES_DIR = "TinyStories_all_data"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_DIST_CACHE") or Path.home() / ".cache" / "llama_dist")


def parse_size(text: str | int | None) -> Optional[int]:
    """'50M', '1.5G', '200k' or a plain byte count; None or '' means no limit."""
    if text is None or isinstance(text, int):
        return text
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    if not value:
        return None
    unit = units.get(value[-1], 1)
    try:
        number = float(value[:-1] if unit > 1 else value) * unit
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # 'inf', 'nan' and 1e400 are floats but no byte count
        raise UserError(f"size '{text}' is not a byte count; write e.g. 50M, 1G or 2000000")
    return int(number)


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    undecodable_bytes: int = 0
    undecodable_files: list[str] = field(default_factory=list)

    def warning(self) -> Optional[str]:
        """One line about replaced bytes, or None when the text was clean UTF-8."""
        if not self.undecodable_bytes:
            return None
        shown = ", ".join(self.undecodable_files[:3]) + (" ..." if len(self.undecodable_files) > 3 else "")
        return (f"warning: {self.undecodable_bytes} bytes that are not UTF-8 were replaced with U+FFFD "
                f"in {len(self.undecodable_files)} file(s): {shown}")


_tally = threading.local()  # bytes replaced by the decode running in this thread


def _replace_counting(err: UnicodeError) -> tuple[str, int]:
    """A codec error handler: what errors="replace" does, plus a tally of the bytes replaced."""
    _tally.bad += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("llama_dist.replace_counting", _replace_counting)


def decode_counting(data: bytes) -> tuple[str, int]:
    """UTF-8 text with bad bytes replaced, and how many bytes were bad.

    One pass: the handler counts as the decoder goes, where decoding the rest again after
    every bad byte took quadratic time on a file in another encoding.
    """
    _tally.bad = 0
    text = data.decode("utf-8", errors="llama_dist.replace_counting")
    return text, _tally.bad


# --------------------------------------------------------------------------- resolving SRC specs


def stdlib_files() -> list[Path]:
    """The standard library's .py sources, without its test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_SKIP)  # never descend into site-packages
        files.extend(Path(directory, n) for n in sorted(names) if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_prepare_output(directory: Path) -> bool:
    """Whether `llama-dist prepare` wrote here (finished, or interrupted and resumable)."""
    if (directory / shards.PROGRESS_FILE).is_file():
        return True
    try:
        with open(directory / shards.MANIFEST, "rb") as f:
            head = f.read(4096)  # ours names its format first; a corpus's own manifest.json may be huge
    except OSError:
        return False
    return f'"format": "{shards.MANIFEST_FORMAT}"'.encode() in head


def _dir_files(directory: Path) -> list[Path]:
    """Text files under `directory`, leaving out hidden ones and prepare's outputs.

    An out dir inside its input (`--input corpus --out corpus/tokens`) is skipped whole,
    and an out dir that is the input loses its manifest.json and progress file: read as
    text, they would change the inputs of the very run that wrote them.
    """
    files = []
    for root, subdirs, names in os.walk(directory):
        here = Path(root)
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and not is_prepare_output(here / d)]
        if is_prepare_output(here):
            names = [n for n in names if n not in (shards.MANIFEST, shards.PROGRESS_FILE)]
        files += [here / n for n in names if not n.startswith(".") and _suffix(Path(n)) in TEXT_SUFFIXES]
    return sorted((p for p in files if p.is_file()), key=lambda p: p.as_posix())


def _written_by_prepare(path: Path) -> bool:
    """A file `llama-dist prepare` wrote beside its shards (a shard, the manifest, the progress file,
    the tokenizer's copy): a glob such as 'corpus/**' that reaches an out dir must not read it as text.
    """
    from llama_dist.tokenizer import TOKENIZER_FILE  # tokenizer.py imports this module

    ours = shards.written_by_prepare(path.name) or path.name == TOKENIZER_FILE
    return ours and is_prepare_output(path.parent)


def _suffix(path: Path) -> str:
    """The suffix that says the format: data.jsonl.gz -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def resolve(specs: list[str]) -> list[Path]:
    """Every SRC spec to its files: each spec's sorted, in spec order, duplicates dropped.

    A bad spec is a one-line UserError.
    """
    if not specs:
        raise UserError("no --input given; pass a file, directory, glob, 'stdlib' or 'tinystories'")
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if spec == "stdlib":  # the keywords win; write ./stdlib for a directory of that name
            found = stdlib_files()
        elif spec == "tinystories":
            found = tinystories_files()
        elif path.is_dir():
            found = _dir_files(path)
            if not found:
                raise UserError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under directory {spec}")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(spec):
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
            found = [p for p in matched if not _written_by_prepare(p)]
            if not found:
                left_out = f" but prepare's own outputs, e.g. {matched[0]}" if matched else ""
                raise UserError(f"no files match the glob '{spec}'{left_out}")
        else:
            raise UserError(f"input '{spec}' does not exist; pass a file, directory, glob, 'stdlib' or 'tinystories'")
        files.extend(found)
    seen: set[tuple[int, int]] = set()
    unique = []
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:  # the same file named twice (or via a link)
            seen.add((st.st_dev, st.st_ino))
            unique.append(f)
    return unique


# --------------------------------------------------------------------------- TinyStories


def tinystories_files() -> list[Path]:
    """TinyStories' .json arrays, downloaded and unpacked into the cache on first use."""
    root = cache_dir() / "tinystories"
    unpacked = root / TINYSTORIES_DIR
    if not unpacked.is_dir():
        archive = root / "TinyStories_all_data.tar.gz"
        if not archive.is_file():
            download(os.environ.get("LLAMA_DIST_TINYSTORIES_URL") or TINYSTORIES_URL, archive)
        unpack(archive, unpacked)
    files = sorted(unpacked.rglob("*.json"))
    if not files:
        raise UserError(f"{unpacked} holds no .json files; delete it and run again to unpack TinyStories afresh")
    return files


def download(url: str, dest: Path) -> None:
    """Stream `url` into `dest` through a temporary name, with a progress bar."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"download {dest.name}") as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise UserError(
            f"could not download {url} ({reason}); when offline, fetch it elsewhere and pass the unpacked "
            f".json files as --input, or put the archive at {dest}"
        ) from None
    os.replace(part, dest)


def unpack(archive: Path, dest: Path) -> None:
    """Unpack into a temporary directory, then rename: a half-unpacked cache never looks complete."""
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.11.4: refuse members that would land outside tmp
                for member in tar.getmembers():
                    target = (tmp / member.name).resolve()
                    if not (member.isfile() or member.isdir()) or not target.is_relative_to(tmp.resolve()):
                        raise UserError(f"{archive}: unsafe member {member.name}; delete the archive")
                tar.extractall(tmp)
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{archive} is not a readable tar.gz ({err}); delete it and run again") from None
    os.replace(tmp, dest)


# --------------------------------------------------------------------------- documents


class Corpus:
    """Documents of some SRC specs, streamed in a fixed order.

    `text_field` names the JSON field holding the text; None means `text` for .jsonl
    and `story` (then `text`) for .json arrays. `max_bytes` keeps only a prefix: documents
    are taken while fewer than max_bytes raw bytes have been read.
    """

    def __init__(self, specs: list[str], text_field: Optional[str] = None, max_bytes: Optional[int] = None):
        self.specs = list(specs)
        self.text_field = text_field
        self.max_bytes = max_bytes
        if max_bytes is not None and max_bytes <= 0:
            raise UserError(f"--max-bytes must be positive, got {max_bytes}")
        self.files = resolve(self.specs)
        self.stats = CorpusStats()

    def total_bytes(self) -> Optional[int]:
        """Bytes the stream will read, for progress bars; None when gzip hides the size."""
        if any(f.suffix.lower() == ".gz" for f in self.files):
            return self.max_bytes
        total = sum(f.stat().st_size for f in self.files)
        return total if self.max_bytes is None else min(total, self.max_bytes)

    def fingerprint(self) -> str:
        """Changes when a file, its size or mtime, or an option changes: prepare's reuse key."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.text_field, self.max_bytes]).encode())
        for f in self.files:
            st = f.stat()
            digest.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        """Every non-empty document, in order; an empty corpus is a UserError at the end."""
        self.stats = CorpusStats()
        for path in self.files:
            if self.max_bytes is not None and self.stats.bytes >= self.max_bytes:
                break
            self.stats.files += 1
            for raw, text in self._file_documents(path):
                self.stats.bytes += raw
                if text.strip():
                    self.stats.documents += 1
                    yield text
                if self.max_bytes is not None and self.stats.bytes >= self.max_bytes:
                    break
        if self.stats.documents == 0:
            raise UserError(f"no text in {', '.join(self.specs)}: the corpus is empty")

    def _file_documents(self, path: Path) -> Iterator[tuple[int, str]]:
        """(raw bytes consumed, text) per document of one file."""
        kind = _suffix(path)
        try:
            with _open(path) as f:
                if kind == ".jsonl":
                    yield from self._jsonl(path, f)
                elif kind == ".json":
                    yield from self._json_array(path, f)
                else:
                    yield from self._text(path, f)
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror or err}") from None

    def _decode(self, path: Path, data: bytes) -> str:
        text, bad = decode_counting(data)
        if bad:
            self.stats.undecodable_bytes += bad
            if not self.stats.undecodable_files or self.stats.undecodable_files[-1] != str(path):
                self.stats.undecodable_files.append(str(path))
        return text

    def _text(self, path: Path, f: IO[bytes]) -> Iterator[tuple[int, str]]:
        """Documents end at `<|endoftext|>` lines, at the end of the file, or after about
        DOC_CHUNK_BYTES at a break (see _cut), so a file without line ends stays bounded too."""
        buf, eof, line_start = bytearray(), False, True  # line_start: buf begins a line
        while not eof:
            block = f.read(DOC_CHUNK_BYTES)
            eof = not block
            buf += block
            start = 0
            for match in END_OF_TEXT_LINE.finditer(buf) if END_OF_TEXT in buf else ():
                if match.start() == 0 and not line_start:
                    continue  # the rest of a line cut in two: the marker is not at its start
                if not eof and buf[match.end() - 1 : match.end()] != b"\n":
                    break  # the marker's line may continue in the next block
                yield match.end() - start, self._decode(path, buf[start : match.start()])
                start, line_start = match.end(), True
            del buf[:start]
            while len(buf) > DOC_CHUNK_BYTES:  # _cut looks at the byte after the limit
                cut = _cut(buf, DOC_CHUNK_BYTES)
                yield cut, self._decode(path, buf[:cut])
                line_start = buf[cut - 1] == ord("\n")
                del buf[:cut]
        if buf:
            yield len(buf), self._decode(path, buf)

    def _jsonl(self, path: Path, f: IO[bytes]) -> Iterator[tuple[int, str]]:
        name = self.text_field or "text"
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield len(line), ""
                continue
            try:
                record = json.loads(self._decode(path, line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
            yield len(line), _field(record, (name,), f"{path} line {lineno}")

    def _json_array(self, path: Path, f: IO[bytes]) -> Iterator[tuple[int, str]]:
        data = f.read()
        try:
            records = json.loads(self._decode(path, data))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON array of records, got {type(records).__name__}; "
                            f"to leave it out of a directory, name the files to read with a glob instead")
        names = (self.text_field,) if self.text_field else ("story", "text")
        # the file's bytes are spread over its records so that max_bytes and progress stay honest
        share, remainder = divmod(len(data), max(len(records), 1))
        for i, record in enumerate(records):
            raw = share + (remainder if i == len(records) - 1 else 0)
            yield raw, _field(record, names, f"{path} item {i}")


def _cut(buf: bytearray, limit: int) -> int:
    """Where to end a document in the first `limit` bytes: after the last line end, else the last
    CR (old Mac text), else the last space or tab, else between two UTF-8 characters."""
    for separators in (b"\n", b"\r", b" \t"):
        cut = max(buf.rfind(sep, 0, limit) for sep in separators) + 1
        if cut:
            return cut
    cut = limit
    while cut > limit - 3 and buf[cut] & 0xC0 == 0x80:  # a continuation byte: inside a character
        cut -= 1
    return cut


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _field(record: object, names: tuple[str, ...], where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for name in names:
            if name in record:
                value = record[name]
                if not isinstance(value, str):
                    raise UserError(f"{where}: field '{name}' is {type(value).__name__}, not a string")
                return value
        keys = ", ".join(sorted(map(str, record))) or "none"
        wanted = " or ".join(f"'{n}'" for n in names)
        raise UserError(f"{where}: no {wanted} field (fields: {keys}); pass --text-field NAME")
    raise UserError(f"{where}: expected an object with a text field, got {type(record).__name__}")
