"""Pretokenize a corpus into shards, in parallel, with bounded memory, resumably.

The main process streams documents, hands batches of about 256 KiB of text to a
pool of worker processes (never more than two batches per worker in flight, so
memory stays flat however big the corpus), and writes the token arrays that come
back, in document order, into shards. With k = round(1/val_fraction), documents
1, 1+k, 1+2k, ... go to the val split (document 1, so that any corpus of two
documents has one). The output is identical for any worker count.

Shards are closed at document boundaries once they reach `shard_tokens`; at that
moment every open shard is closed and `prepare.progress.json` records how many
documents are done, so a rerun after an interruption continues from there and
produces the same files an uninterrupted run would. `manifest.json` is written
last: until it exists, nothing here looks complete.

Replacing a finished directory (--overwrite) leaves its manifest, shards and
tokenizer copy in place until the new run is complete: shard names carry the
run's key, so the two runs never share a file, and the old shards are removed
only once the new manifest has been written.

Disk: once 64 MiB of text (or a sixteenth of the corpus, if less) is encoded, the shards
still to come are projected from it, and a disk that will not hold them is warned of
then, not found out hours later.
A disk that fills stops the run in one line, keeping the finished shards for a rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from llama_dist import shards
from llama_dist.files import atomic_copy_file, atomic_write_json, format_bytes, free_bytes, is_disk_full, sha256_file
from llama_dist.errors import UserError
from llama_dist.sources import Corpus, parse_size
from llama_dist.tokenizer import TOKENIZER_FILE, Tokenizer, make_out_dir

DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB as uint16
BATCH_CHARS = 1 << 18  # text per worker task: big enough to hide pickling, small enough to balance
PROJECT_AFTER_BYTES = 64 << 20  # text encoded before the shards' size is projected from it,
PROJECT_AFTER_SHARE = 1 / 16  # or this share of the corpus, if that comes first (a small disk fills early)
PROJECT_AFTER_AT_LEAST = 1 << 20  # but never on less: the rate needs some text to settle
PROGRESS_FILE = shards.PROGRESS_FILE
SPLITS = shards.SPLITS


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- encoding (runs in workers)

_worker_sp: Any = None
_worker_dtype: Optional[np.dtype] = None


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    global _worker_sp, _worker_dtype
    from sentencepiece import SentencePieceProcessor

    _worker_sp = SentencePieceProcessor(model_file=tokenizer_path)
    _worker_dtype = np.dtype(dtype)


def encode_batch(sp: Any, dtype: np.dtype, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """bos + tokens + eos per document: (lengths, all tokens flat in the shard dtype)."""
    ids = sp.encode(texts, add_bos=True, add_eos=True, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    shards.check_fits(flat, dtype)  # never a silent wrap when narrowing to the shard dtype
    return lengths, flat.astype(dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_batch(_worker_sp, _worker_dtype, texts)


# --------------------------------------------------------------------------- writing (main process)


class SpaceWatch:
    """Warns once, early, when the shards still to write will not fit on the disk: the run would
    otherwise find out when the disk fills, hours in. The projection scales the bytes written per
    byte of text so far (this run's, after documents a resumed run reads past) to the text left."""

    def __init__(self, out: Path, total_bytes: Optional[int], itemsize: int):
        self.out, self.total, self.itemsize = out, total_bytes, itemsize
        self.after = max(PROJECT_AFTER_AT_LEAST, min(PROJECT_AFTER_BYTES, int(PROJECT_AFTER_SHARE * (total_bytes or 0))))
        self.skipped: Optional[int] = None  # text read before this run's first encoded document
        self.warned = total_bytes is None  # gzip without --max-bytes: no total to project to

    def started(self, read_bytes: int) -> None:
        if self.skipped is None:
            self.skipped = read_bytes

    def check(self, read_bytes: int, tokens: int) -> None:
        if self.warned or self.skipped is None or read_bytes - self.skipped < self.after:
            return
        still = tokens * self.itemsize * max(0, self.total - read_bytes) / (read_bytes - self.skipped)
        free = free_bytes(self.out)
        if still > free:
            print(f"warning: at the rate so far the shards still to write need about {format_bytes(still)} and "
                  f"the disk holding {self.out} has {format_bytes(free)} free; free space while it runs, or it "
                  f"stops when the disk fills (the same command then continues from the last finished shard)",
                  flush=True)
        self.warned = True  # once, whatever it found: the figure only firms up what it said


class ShardSink:
    """Routes each encoded document to its split's shard, rotates shards, checkpoints progress."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, val_period: int, key: str,
                 done_documents: int = 0, done_shards: Optional[list[dict[str, Any]]] = None):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.val_period, self.key = val_period, key
        self.doc_index = done_documents
        self.shards: list[dict[str, Any]] = list(done_shards or [])
        self.writers: dict[str, shards.ShardWriter] = {}
        self.tokens = {split: 0 for split in SPLITS}

    def split_of(self, doc_index: int) -> str:
        return "val" if self.val_period and doc_index % self.val_period == 1 else "train"

    def add(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        offset = 0
        for length in lengths.tolist():
            split = self.split_of(self.doc_index)
            writer = self.writers.get(split) or self._open(split)
            writer.write(flat[offset : offset + length])
            offset += length
            self.tokens[split] += length
            self.doc_index += 1
            if writer.count >= self.shard_tokens:
                self.checkpoint()

    def _open(self, split: str) -> shards.ShardWriter:
        number = sum(1 for s in self.shards if s["split"] == split)
        # the key in the name: a run replacing another (--overwrite) never writes over its shards
        writer = shards.ShardWriter(self.out / f"{split}-{number:05d}-{self.key[:8]}.bin", self.dtype)
        self.writers[split] = writer
        return writer

    def close_all(self) -> None:
        for split in SPLITS:
            if split in self.writers:
                self.shards.append({**self.writers.pop(split).close(), "split": split})

    def checkpoint(self) -> None:
        """Close every open shard at this document boundary and record that we got here."""
        self.close_all()
        atomic_write_json(self.out / PROGRESS_FILE, {
            "key": self.key, "documents": self.doc_index, "shards": self.shards,
        })

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def _stream(corpus: Corpus, sink: ShardSink, workers: int, tokenizer_path: str, bar: Any,
            watch: Optional[SpaceWatch] = None) -> None:
    """Read, encode (in a pool when workers > 1) and hand results to the sink, in order."""
    pending: deque = deque()  # (result getter, corpus bytes read once that batch was complete)

    def drain(limit: int) -> None:
        while len(pending) > limit:
            get, read_bytes = pending.popleft()
            sink.add(*get())
            if watch is not None:
                watch.check(read_bytes, sum(sink.tokens.values()))
            bar.update(read_bytes - bar.n)
            bar.set_postfix(docs=f"{sink.doc_index:,}", tokens=f"{sum(sink.tokens.values()):,}", refresh=False)

    def run(submit: Callable[[list[str]], Callable[[], tuple]], window: int) -> None:
        batch: list[str] = []
        chars = 0
        done = sink.doc_index  # documents already in finished shards: read past, not encoded
        for index, doc in enumerate(corpus.documents()):
            if index < done:
                continue
            if watch is not None and watch.skipped is None:
                watch.started(corpus.stats.bytes)  # this document's bytes too: one in 64 MiB of them
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS:
                pending.append((submit(batch), corpus.stats.bytes))
                batch, chars = [], 0
                drain(window)
        if batch:
            pending.append((submit(batch), corpus.stats.bytes))
        drain(0)

    if workers == 1:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=tokenizer_path)

        def encode_now(texts: list[str]) -> Callable[[], tuple]:
            result = encode_batch(sp, sink.dtype, texts)
            return lambda: result

        run(encode_now, window=0)
        return
    # fork where we can: spawn would re-run a caller's script without a __main__ guard in every
    # worker (endlessly, as the pool replaces them); the workers only run sentencepiece
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # an executor, not a Pool: a Pool replaces a killed worker and waits forever for its task
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker, initargs=(tokenizer_path, sink.dtype.str))
    try:
        run(lambda texts: pool.submit(_encode_in_worker, texts).result, window=2 * workers)
    except BrokenProcessPool:
        raise UserError("an encoding worker died (out of memory? try fewer --workers); rerun the same "
                        "command to continue after the last finished shard") from None
    finally:
        pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- the run


def _own_output(path: Path, out: Path) -> bool:
    """A file in `out` that a prepare run writes there, or the tokenizer trained into it."""
    ours = shards.written_by_prepare(path.name) or path.name == TOKENIZER_FILE
    return ours and path.parent.resolve() == out.resolve()


def _clean(out: Path, keep: set[str] = frozenset()) -> None:
    for path in out.iterdir():
        if path.is_file() and shards.written_by_prepare(path.name) and path.name not in keep:
            path.unlink()


def _complete(out: Path, manifest: dict[str, Any], tokenizer_sha: str) -> bool:
    """A finished run whose shards and tokenizer copy are all still in place (sizes only: fast)."""
    tok = out / TOKENIZER_FILE
    if not tok.is_file() or sha256_file(tok) != tokenizer_sha:
        return False
    width = shards.dtype_for_vocab(manifest["tokenizer"]["vocab_size"]).itemsize
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != shards.HEADER_SIZE + entry["tokens"] * width:
            return False
    return True


def _check_existing(out: Path, key: str, tokenizer: Path, tokenizer_sha: str, overwrite: bool,
                    progress: bool) -> Optional[Path]:
    """Decide what an existing out_dir means: reuse (its manifest path), replace, or refuse.

    Only a dataset that is already unusable is removed here; one replaced with --overwrite
    stays whole until the new run commits (see _published).
    """
    say = print if progress else (lambda *_: None)
    manifest_path = out / shards.MANIFEST
    copied_tokenizer = out / TOKENIZER_FILE
    # the tokenizer we were given may itself live in out_dir (the demo trains it there)
    in_place = copied_tokenizer.exists() and copied_tokenizer.resolve() == tokenizer.resolve()
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            old_sha = manifest["tokenizer"]["sha256"]
        except (ValueError, KeyError, TypeError):
            manifest, old_sha = None, None
        if manifest and manifest.get("key") == key and _complete(out, manifest, tokenizer_sha):
            say(f"prepare: {out} is up to date ({manifest_path}); nothing to do")
            return manifest_path
        if manifest and old_sha == tokenizer_sha and manifest.get("key") == key:
            say(f"prepare: {out} has missing or changed files; preparing again")
        elif old_sha != tokenizer_sha and in_place:
            say(f"prepare: {out} holds shards of an older tokenizer (sha256 {str(old_sha)[:12]}), "
                f"replaced since by {tokenizer}; starting clean")
        elif not overwrite:
            if manifest is None:
                what = f"an unreadable {shards.MANIFEST}"
            elif old_sha != tokenizer_sha:
                what = f"shards made with a different tokenizer (sha256 {old_sha[:12]} vs {tokenizer_sha[:12]})"
            else:
                what = "shards made with other inputs or settings"
            raise UserError(f"{out} already holds {what}; choose another --out or pass --overwrite to replace them")
        else:
            say(f"prepare: replacing the shards in {out} (--overwrite) once the new ones are complete")
            return None
        manifest_path.unlink()  # from here on nothing in out_dir looks complete
        _clean(out)
    elif copied_tokenizer.exists() and not in_place and not overwrite \
            and sha256_file(copied_tokenizer) != tokenizer_sha:
        raise UserError(f"{copied_tokenizer} is a different tokenizer than {tokenizer}; "
                        "choose another --out or pass --overwrite to replace it")
    return None


def _published(out: Path) -> set[str]:
    """The files of the finished dataset in out_dir, which a run replacing it must not touch."""
    try:
        manifest = json.loads((out / shards.MANIFEST).read_text())
        return {shards.MANIFEST} | {entry["file"] for entry in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: nothing to keep
        return set()


def _intact(path: Path, tokens: int) -> bool:
    try:
        return path.is_file() and shards.read_header(path).count == tokens
    except UserError:  # truncated or foreign: the run starts clean instead
        return False


def _resume_point(out: Path, key: str, progress: bool, keep: set[str]) -> tuple[int, list[dict[str, Any]]]:
    """Documents and shards an interrupted run with the same key finished; (0, []) otherwise.

    Other files of ours are removed, except those named in `keep`.
    """
    say = print if progress else (lambda *_: None)
    path = out / PROGRESS_FILE
    state: Optional[dict[str, Any]] = None
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = None
    if state and state.get("key") == key and all(_intact(out / s["file"], s["tokens"]) for s in state["shards"]):
        _clean(out, keep | {s["file"] for s in state["shards"]} | {PROGRESS_FILE})
        say(f"prepare: continuing an interrupted run after {state['documents']:,} documents "
            f"({len(state['shards'])} shards kept)")
        return int(state["documents"]), list(state["shards"])
    if any(shards.written_by_prepare(p.name) and p.name not in keep for p in out.iterdir()):
        say(f"prepare: discarding an unfinished run in {out} (other inputs, settings or tokenizer)")
    _clean(out, keep)
    return 0, []


def prepare(
    inputs: list[str],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    workers: Optional[int] = None,
    val_fraction: float = 0.01,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_bytes: Optional[int] = None,
    text_field: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize `inputs` into shards in `out_dir`; return the path of its manifest.json.

    A finished out_dir with the same inputs, tokenizer and settings is reused as is;
    an interrupted one continues; shards of another tokenizer are never mixed in.
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not 0.0 <= val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    tokenizer_file = Path(tokenizer_path)
    tokenizer = Tokenizer(tokenizer_file)
    tokenizer_sha = sha256_file(tokenizer_file)
    dtype = shards.dtype_for_vocab(tokenizer.n_words)
    out = Path(out_dir)
    corpus = Corpus(inputs, text_field=text_field, max_bytes=max_bytes)
    # a glob that reaches this run's own out dir matches its shards and the tokenizer trained there,
    # even before a first manifest marks the dir as prepare's
    corpus.files = [f for f in corpus.files if not _own_output(f, out)]
    if not corpus.files:
        raise UserError(f"the inputs hold nothing but this run's own files in {out}; name the text to tokenize")
    val_period = round(1 / val_fraction) if val_fraction > 0 else 0
    key = hashlib.sha256(json.dumps(
        [shards.VERSION, tokenizer_sha, corpus.fingerprint(), val_period, shard_tokens]).encode()).hexdigest()

    make_out_dir(out)
    reused = _check_existing(out, key, tokenizer_file, tokenizer_sha, overwrite, progress)
    if reused is not None:
        return reused
    done_documents, done_shards = _resume_point(out, key, progress, keep=_published(out))

    from tqdm import tqdm

    start = time.perf_counter()
    sink = ShardSink(out, dtype, shard_tokens, val_period, key, done_documents, done_shards)
    bar = tqdm(total=corpus.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
               desc="prepare", disable=not progress)
    try:
        watch = SpaceWatch(out, corpus.total_bytes(), dtype.itemsize)
        _stream(corpus, sink, workers, str(tokenizer_file), bar, watch)
        sink.close_all()
    except BaseException as err:
        sink.abort()  # finished shards and the progress file stay for the next run
        if is_disk_full(err):
            raise UserError(f"no space left to write the shards in {out} ({err.strerror}); free some space "
                            f"there and run the same command again to continue, or choose another --out") from None
        raise
    finally:
        bar.close()

    copied = out / TOKENIZER_FILE
    if not (copied.exists() and copied.resolve() == tokenizer_file.resolve()):
        # before the manifest: should we die in between, a rerun resumes with every shard done
        atomic_copy_file(tokenizer_file, copied)
    stats = corpus.stats
    manifest = shards.make_manifest(
        tokenizer_sha, tokenizer.n_words, sink.shards, key=key, inputs=list(inputs),
        max_bytes=max_bytes, text_field=text_field, val_fraction=val_fraction, shard_tokens=shard_tokens,
        documents=stats.documents, bytes=stats.bytes, undecodable_bytes=stats.undecodable_bytes,
    )
    manifest_path = out / shards.MANIFEST
    atomic_write_json(manifest_path, manifest)  # last: now the directory is complete
    _clean(out, keep={entry["file"] for entry in sink.shards} | {shards.MANIFEST})  # a replaced run's shards

    if warning := stats.warning():
        print(warning)
    if progress:
        seconds = time.perf_counter() - start
        splits = manifest["splits"]
        print(f"prepare: {stats.documents:,} documents, {stats.bytes / 2**20:.1f} MiB -> "
              f"{splits.get('train', 0):,} train + {splits.get('val', 0):,} val tokens in "
              f"{len(sink.shards)} {dtype.name} shards; {workers} workers, {seconds:.1f}s "
              f"({stats.bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) -> {manifest_path}")
        if val_period and not splits.get("val"):
            print(f"warning: the val split is empty: only {stats.documents} documents, and every "
                  f"{val_period}th goes to val; raise --val-fraction or add data")
    return manifest_path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-dist prepare",
        description="Pretokenize a corpus into token shards plus manifest.json (train and val splits).",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="SRC",
                        help="files, directories, globs, 'stdlib' or 'tinystories'")
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="a tokenizer.model")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--workers", type=int, metavar="N", help="encoding processes (default: all cores)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="F")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N")
    parser.add_argument("--max-bytes", metavar="B", help="read only this much of the corpus (e.g. 50M)")
    parser.add_argument("--text-field", metavar="NAME", help="JSON field with the text (default: text / story)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other inputs")
    args = parser.parse_args(argv)
    prepare(args.input, args.tokenizer, args.out, workers=args.workers, val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens, max_bytes=parse_size(args.max_bytes), text_field=args.text_field,
            overwrite=args.overwrite)
    return 0
