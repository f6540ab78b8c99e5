"""Pretokenization throughput: prepare with 1 and N workers next to raw sentencepiece.

    python bench/bench_prepare.py [--max-bytes 8M|all] [--workers N] [--repeat 3]

Corpus: the Python standard library (the demo's), with a tokenizer this script
trains on it first. Figures:
  * sentencepiece: one process encoding the same documents in memory (no I/O, no
    shards): the ceiling for one worker;
  * sentencepiece xN: N processes encoding at once, what this machine's cores really
    deliver together (on a shared or throttled machine that is less than N times one);
  * prepare with 1 and N workers, end to end (reading, encoding, shards, checksums);
  * parallel efficiency = prepare(N) / (N x sentencepiece), the goal is >= 0.9 at N = 2,
    and prepare(N) / sentencepiece xN, the same against the cores' real capacity.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from llama_dist.prepare import BATCH_CHARS, default_workers, prepare
from llama_dist.sources import Corpus, parse_size
from llama_dist.tokenizer import train_tokenizer


def batches(documents: list[str]) -> list[list[str]]:
    """The same task size prepare hands its workers."""
    out, batch, chars = [], [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS:
            out.append(batch)
            batch, chars = [], 0
    return out + ([batch] if batch else [])


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def encode_seconds(tokenizer: str, documents: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds to encode every document in this process."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=tokenizer)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches(documents):
        sp.encode(batch, add_bos=True, add_eos=True, num_threads=1)
    return time.perf_counter() - start, time.process_time() - cpu


def _encode_worker(args: tuple[str, list[str]]) -> float:
    return encode_seconds(*args)[0]


def concurrent_rate(tokenizer: str, documents: list[str], n: int, mb: float) -> float:
    """N processes each encoding the whole corpus at once: what N cores deliver together."""
    with multiprocessing.get_context("fork").Pool(n) as pool:
        pool.map(_noop, range(n))  # workers started outside the timing
        start = time.perf_counter()
        pool.map(_encode_worker, [(tokenizer, documents)] * n)
        return n * mb / (time.perf_counter() - start)


def _noop(_: int) -> None:
    return None


def prepare_rate(tokenizer: str, out: Path, workers: int, max_bytes: int | None) -> tuple[float, float, int]:
    """(MB/s, CPU seconds of the main process and its workers together, tokens)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    prepare(["stdlib"], tokenizer, out, workers=workers, max_bytes=max_bytes, progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["bytes"] / 1e6 / seconds, cpu, sum(manifest["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-bytes", default="8M", help="stdlib prefix to use (default 8M; 'all': ~12 MB)")
    parser.add_argument("--workers", type=int, default=max(2, default_workers()))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each figure is its best round")
    args = parser.parse_args()
    max_bytes = None if args.max_bytes == "all" else parse_size(args.max_bytes)
    n = args.workers

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        tokenizer = str(train_tokenizer(["stdlib"], args.vocab_size, root / "tok", max_bytes=max_bytes,
                                        progress=False))
        documents = list(Corpus(["stdlib"], max_bytes=max_bytes).documents())
        mb = sum(len(d.encode()) for d in documents) / 1e6
        print(f"corpus: stdlib, {len(documents)} documents, {mb:.1f} MB; vocab {args.vocab_size}; "
              f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} before")
        # rounds interleave the measurements, so that load from elsewhere hits them alike
        best = {"single": 0.0, "together": 0.0, 1: 0.0, n: 0.0}
        cpu = {"single": float("inf"), 1: float("inf"), n: float("inf")}
        for _ in range(args.repeat):
            wall, cpu_s = encode_seconds(tokenizer, documents)
            best["single"], cpu["single"] = max(best["single"], mb / wall), min(cpu["single"], cpu_s)
            best["together"] = max(best["together"], concurrent_rate(tokenizer, documents, n, mb))
            for workers in (1, n):
                rate, cpu_s, tokens = prepare_rate(tokenizer, root / "out", workers, max_bytes)
                best[workers], cpu[workers] = max(best[workers], rate), min(cpu[workers], cpu_s)
        single, together = best["single"], best["together"]

        print(f"{'sentencepiece, 1 process':<34} {single:7.2f} MB/s")
        print(f"{f'sentencepiece, {n} processes at once':<34} {together:7.2f} MB/s  "
              f"({together / single:.2f}x one process: what {n} cores deliver here)")
        print(f"{'prepare, 1 worker':<34} {best[1]:7.2f} MB/s  ({best[1] / single:.2f} of sentencepiece)")
        print(f"{f'prepare, {n} workers':<34} {best[n]:7.2f} MB/s  ({best[n] / best[1]:.2f}x 1 worker)")
        print(f"parallel efficiency at {n} workers: {best[n] / (n * single):.2f} of {n} x sentencepiece "
              f"(goal >= 0.9), {best[n] / together:.2f} of what {n} concurrent processes reach")
        print(f"CPU seconds: sentencepiece {cpu['single']:.2f}, prepare 1 worker {cpu[1]:.2f}, "
              f"{n} workers {cpu[n]:.2f} (all processes): the parallel path spends "
              f"{cpu['single'] / cpu[n]:.2f} of its CPU time encoding, so on {n} idle cores it can reach "
              f"about that efficiency")
        print(f"{tokens:,} tokens ({mb * 1e6 / tokens:.2f} bytes/token); best of {args.repeat} rounds; "
              f"load average {os.getloadavg()[0]:.1f} after")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
