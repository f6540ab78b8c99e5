"""Tiny corpora, tokenizers and prepared directories for the data tests."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from llama_dist import shards
from llama_dist.files import atomic_write_json

WORDS = ("the cat dog sat on a mat and ran to see big small red blue tree house river "
         "def return import class self value list dict for in if else while print").split()
TOKENIZER_VOCAB = 320


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Varied little documents: prose, code-ish lines with indentation, numbers, some non-ASCII."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            indent = " " * rng.choice((0, 0, 4, 8))
            lines.append(f"{indent}{words} {rng.randint(0, 99999)}" + (" café" if rng.random() < 0.1 else ""))
        out.append(f"doc {i}: " + "\n".join(lines) + "\n")
    return out


def write_text_corpus(directory: Path, n_docs: int = 200, seed: int = 0) -> list[str]:
    """One .txt file per document, named so that sorted order is document order."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = make_documents(n_docs, seed)
    for i, doc in enumerate(documents):
        (directory / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    return documents


def train_small_tokenizer(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0) -> Path:
    from llama_dist.tokenizer import train_tokenizer

    corpus = out_dir / "corpus"
    write_text_corpus(corpus, 300, seed)
    return train_tokenizer([str(corpus)], vocab_size, out_dir, progress=False)


def write_synthetic_data(directory: Path, train_sizes: list[int], val_sizes: list[int],
                         vocab_size: int = 2**16) -> dict[str, np.ndarray]:
    """A prepared directory whose tokens are their own positions: token k of a split is k.

    So a batch row names the exact sample it came from, with no tokenizer involved.
    Returns each split's whole token stream.
    """
    directory.mkdir(parents=True, exist_ok=True)
    dtype = shards.dtype_for_vocab(vocab_size)
    entries, streams = [], {}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        stream = np.arange(sum(sizes), dtype=np.int64) % vocab_size
        streams[split] = stream
        start = 0
        for i, size in enumerate(sizes):
            entry = shards.write_shard(directory / f"{split}-{i:05d}.bin", stream[start : start + size], dtype)
            entries.append({**entry, "split": split})
            start += size
    manifest = shards.make_manifest("0" * 64, vocab_size, entries)
    atomic_write_json(directory / shards.MANIFEST, manifest)
    return streams
