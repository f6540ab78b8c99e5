"""Checkpoint save and load GB/s, next to the disk's own bandwidth measured in the same run.

    python bench/bench_checkpoint.py                     # small.yaml: 0.44 GB weights + 0.88 GB AdamW state
    python bench/bench_checkpoint.py --dir /scratch model.n_layers=24 --rounds 5

A world of one saves with llama_dist.checkpoint.save_checkpoint (weights shard,
optimizer state, RNG, train state, sha256 manifest, commit marker) and loads with
load_checkpoint, with and without the manifest check. GB/s counts the bytes of every
file in the checkpoint directory (1 GB = 1e9 bytes).

Each round, interleaved so that all see the same host:
  disk write   the same number of bytes of fp32 noise in 16 MiB blocks, then fsync;
  disk read    that file after posix_fadvise(DONTNEED) dropped it from the page cache;
  save         save_checkpoint as training calls it: it writes each file front to back
               (O_DIRECT where the file system takes it) while hashing its bytes, then
               fsyncs it (a commit marker must not outlive the data in a power cut);
  load         load_checkpoint with the files in the page cache (read once, untimed:
               direct writes leave nothing there), and after dropping them ("cold").
Figures are medians over rounds. Everything written is deleted at the end.

On a VM whose balloon reports free pages to the host (Firecracker here), memory the
guest has not used lately costs a host page fault on first touch: page-cache writes
into it ran at ~0.3 GB/s against ~2-3 GB/s into pages freed a moment before. That
would bound the save and the plain write alike and hide both the disk and our code,
so before each timed step a scratch file of the same size is written and deleted
(untimed); --no-prefault skips that to show what a save meets on such a VM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llama_dist.checkpoint import load_checkpoint, save_checkpoint
from llama_dist.config import load_config
from llama_dist.distributed import init_distributed, seed_everything, shutdown
from llama_dist.model import Transformer, count_parameters
from llama_dist.train import build_optimizer

BLOCK = 16 << 20


def drop_from_cache(path: Path) -> None:
    """Evict a file's clean pages, so the next read comes from the disk (Linux; a no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_write(path: Path, nbytes: int) -> float:
    block = torch.randn(BLOCK // 4).numpy().tobytes()  # fp32 noise, like the checkpoint's own bytes
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, block[: min(BLOCK, nbytes - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def touch_memory(path: Path, nbytes: int) -> None:
    """Write and delete a scratch file: the timed step after it reuses pages the guest just freed."""
    block = bytes(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(0, nbytes, BLOCK):
            os.write(fd, block)
    finally:
        os.close(fd)
    path.unlink()  # dirty pages of a deleted file are dropped, never written back


def read_through(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(BLOCK)
        while handle.readinto(buffer):
            pass


def disk_read(path: Path) -> float:
    drop_from_cache(path)
    start = time.perf_counter()
    read_through(path)
    return time.perf_counter() - start


def weights_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What the checkpoint's tensors take, for a disk write before the first save."""
    tensors = list(model.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.n_layers=24")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-prefault", action="store_true",
                        help="time writes into memory the VM has not touched lately too (see above)")
    opts = parser.parse_args(argv)

    cfg = load_config(opts.config, opts.overrides)
    info = init_distributed(mp=1, backend="gloo", device="cpu")
    seed_everything(0)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg, info.device)
    for param in model.parameters():  # one step with made-up gradients creates AdamW's state
        param.grad = torch.randn_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reference = {k: v.clone() for k, v in list(model.state_dict().items())[:3]}

    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=opts.dir))
    nbytes = weights_bytes(model, optimizer)

    def prefault(factor: int = 1) -> None:
        if not opts.no_prefault:
            touch_memory(root / "scratch.bin", factor * nbytes)

    figures: dict[str, list[float]] = {}
    try:
        for round_index in range(opts.rounds):
            run_dir, plain = root / f"run{round_index}", root / "plain.bin"
            train_state = {"step": round_index + 1, "tokens_seen": 0, "skipped_steps": 0, "mp": 1, "dp": 1,
                           "world_size": 1, "loader": {}, "scheduler": {"kind": "warmup_cosine", "lr": 0.0}}
            timings: dict[str, float] = {}
            os.sync()  # nothing dirty from before
            prefault()
            start = time.perf_counter()
            ckpt = save_checkpoint(run_dir, round_index + 1, model, optimizer, train_state, cfg, None, info)
            timings["save (write, fsync, sha256)"] = time.perf_counter() - start
            nbytes = directory_bytes(ckpt)

            prefault()
            timings["disk write + fsync"] = disk_write(plain, nbytes)
            prefault()
            timings["disk read, dropped from cache"] = disk_read(plain)
            plain.unlink()

            for verify in (True, False):
                cfg.checkpoint.verify = verify
                tag = "verify" if verify else "no verify"
                for path in ckpt.iterdir():
                    read_through(path)  # into the page cache
                prefault()  # room for the loaded tensors
                start = time.perf_counter()
                load_checkpoint(ckpt, model, optimizer, cfg, info)
                timings[f"load, in page cache, {tag}"] = time.perf_counter() - start
                for path in ckpt.iterdir():
                    drop_from_cache(path)
                prefault(2)  # the page cache and the tensors
                start = time.perf_counter()
                load_checkpoint(ckpt, model, optimizer, cfg, info)
                timings[f"load, cold, {tag}"] = time.perf_counter() - start
            cfg.checkpoint.verify = True
            for key, value in reference.items():
                assert torch.equal(model.state_dict()[key], value), f"{key} changed through save/load"
            shutil.rmtree(run_dir)
            print(f"round {round_index + 1}: " + ", ".join(f"{k} {nbytes / v / 1e9:.2f}" for k, v in timings.items())
                  + " GB/s", flush=True)
            for key, value in timings.items():
                figures.setdefault(key, []).append(nbytes / value / 1e9)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutdown()

    params = count_parameters(cfg.model)
    print(f"\nmodel: dim {cfg.model.dim}, layers {cfg.model.n_layers}, vocab {cfg.model.vocab_size}, "
          f"{params / 1e6:.1f}M params; checkpoint {nbytes / 1e9:.2f} GB (weights {4 * params / 1e9:.2f} GB "
          f"+ AdamW state + small files) in {root.parent}; {torch.get_num_threads()} threads")
    print(f"medians over {opts.rounds} rounds, GB/s:")
    for key, values in figures.items():
        print(f"  {key:<32} {statistics.median(values):6.2f}  (range {min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
