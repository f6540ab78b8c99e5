"""Loader throughput per rank next to what a training step of the ~100M config consumes.

    python bench/bench_loader.py [--data DIR] [--steps 2] [--dp-size 8]

The loader reads configs/small.yaml's batch (seq_len 512, micro_batch_size 8) from
DIR, or from synthetic shards of random ids (vocab 16384, --tokens of them) when no
DIR is given. The training figure times forward + backward + AdamW of
llama_dist.model.Transformer built from load_config("small").model in a world of
one (init_distributed(mp=1)); the fastest of --steps counts (the first also allocates
the optimizer state). Goal: loader >= 100x training.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama_dist import shards
from llama_dist.files import atomic_write_json
from llama_dist.config import load_config
from llama_dist.distributed import init_distributed, seed_everything, shutdown
from llama_dist.loader import TokenLoader
from llama_dist.model import Transformer, count_parameters


def synthetic_data(directory: Path, tokens: int, vocab_size: int, shard_tokens: int = 1 << 24) -> None:
    rng = np.random.default_rng(0)
    dtype = shards.dtype_for_vocab(vocab_size)
    entries = []
    for split, count in (("train", tokens), ("val", max(tokens // 100, 100_000))):
        for i, start in enumerate(range(0, count, shard_tokens)):
            ids = rng.integers(0, vocab_size, min(shard_tokens, count - start), dtype=np.int64)
            entries.append({**shards.write_shard(directory / f"{split}-{i:05d}.bin", ids, dtype), "split": split})
    atomic_write_json(directory / shards.MANIFEST, shards.make_manifest("0" * 64, vocab_size, entries))


def loader_tokens_per_s(data_dir: str, seq_len: int, mbs: int, dp_size: int, seconds: float) -> tuple[float, int]:
    loader = TokenLoader(data_dir, "train", seq_len, mbs, dp_rank=dp_size - 1, dp_size=dp_size)
    next(loader)  # first permutation drawn outside the timing
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            next(loader)
        batches += 50
    return batches * loader.tokens_per_batch / (time.perf_counter() - start), loader.n_tokens


def training_tokens_per_s(seq_len: int, mbs: int, steps: int) -> tuple[float, float]:
    cfg = load_config("small")
    init_distributed(mp=1)
    try:
        seed_everything(0)
        model = Transformer(cfg.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inputs = torch.randint(0, cfg.model.vocab_size, (mbs, seq_len))
        targets = torch.randint(0, cfg.model.vocab_size, (mbs, seq_len))

        def step() -> None:
            logits = model(inputs)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        seconds = min(times)  # the fastest step: the first also allocates AdamW's state
        return mbs * seq_len / seconds, count_parameters(cfg.model) / 1e6
    finally:
        shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared directory (default: synthetic shards)")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="synthetic corpus size")
    parser.add_argument("--steps", type=int, default=2, help="training steps; the fastest counts")
    parser.add_argument("--dp-size", type=int, default=8, help="also time one rank of this many")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    args = parser.parse_args()
    cfg = load_config("small")
    seq_len, mbs = cfg.data.seq_len, cfg.data.micro_batch_size

    tmp = None
    data_dir = args.data
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
        synthetic_data(tmp, args.tokens, cfg.model.vocab_size)
        data_dir = str(tmp)
    try:
        print(f"batch: seq_len {seq_len} x micro_batch_size {mbs} (configs/small.yaml); "
              f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}")
        rates = {}
        for dp_size in sorted({1, args.dp_size}):
            rates[dp_size], n_tokens = loader_tokens_per_s(data_dir, seq_len, mbs, dp_size, args.seconds)
            print(f"loader, one rank of dp={dp_size:<3} {rates[dp_size]:>14,.0f} tokens/s  "
                  f"({n_tokens:,} tokens memory-mapped from {data_dir})")
        torch.set_num_threads(os.cpu_count() or 1)
        train, params = training_tokens_per_s(seq_len, mbs, args.steps)
        print(f"training step, small ({params:.0f}M params, fp32, {torch.get_num_threads()} threads) "
              f"{train:>10,.0f} tokens/s")
        worst = min(rates.values())
        print(f"loader / training: {worst / train:,.0f}x (goal >= 100x)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
