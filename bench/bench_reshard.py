"""Reshard a ~1B-parameter checkpoint, next to a plain copy of its files.

    python bench/bench_reshard.py                  # dim 2048, 18 layers, vocab 32000: 1.06B, 3.9 GiB fp32
    python bench/bench_reshard.py --dir /scratch --layers 8 --keep

Writes a synthetic mp=2 checkpoint (random tensors in Meta's names and shard
shapes, no model built, and a manifest as a training checkpoint has), then times in
child processes, each after an `os.sync()`, in a warm-up and --rounds rounds of: a copy
of its files (shutil.copytree), one sha256 and one CRC-32 pass over them (what a reshard
must add to a copy: the manifest's hashes and the zip's checksums of the new files),
`llama-dist reshard` 2 -> 1 and 1 -> 2. A reshard also checks SRC against its manifest
(another sha256 pass; --no-verify leaves it out) and fsyncs its files before it commits
them; the '+sync' columns wait for the copy's data to reach the disk too. Each step's
source is first dropped from the page cache (--sources cold, the default: a checkpoint
written long ago, and what the reshard's own O_DIRECT output is) or read into it
(--sources cached), so that all steps read alike.
On a VM the cost of writing fresh pages drifts several-fold: where the guest hands
free memory back to its host (Firecracker's free page reporting, about 2 s after it
is freed), a page written again must first be faulted back in by the host. On the
2-core VM this was written on, pwrite into a new file ran at 3.0 GB/s when the
memory had been freed 0.5 s before and at 0.3 GB/s after 1 to 5 s. The reshard
writes with O_DIRECT and does not meet this; the copy writes through the page cache
and does. So each writer first deletes its output of the round before and then waits
--settle seconds (default 3) before it starts: without that pause the copy, which
starts at once, writes into its own just-freed pages (--settle 0 shows that case).
Each figure is the median of its ratio to the copy of its own round.
Peak RSS is each child's own ru_maxrss (os.wait4); this parent never imports torch,
because a child's ru_maxrss starts from the parent's resident set at fork. Goal of
issue 5: time <= 2x the copy, peak RSS <= half the checkpoint's size. Deletes
everything it wrote unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
HASH_FILES = """
import hashlib, mmap, os, sys, zlib
for path in sorted(os.scandir(sys.argv[1]), key=lambda entry: entry.name):
    if not path.stat().st_size:  # COMMITTED: mmap refuses an empty file
        continue
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        hashlib.sha256(data).hexdigest(), zlib.crc32(data)
"""


def write_synthetic(ckpt: Path, args, mp: int) -> None:
    import torch

    from llama_dist.checkpoint_files import shard_file
    from llama_dist.meta_format import shard_dim, write_params
    from llama_dist.reshard import write_manifest_and_commit
    from llama_dist.sharded_source import expected_shapes  # full shapes, in Meta's key order

    ckpt.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for rank in range(mp):
        shard = {}
        for key, shape in expected_shapes(args, args.vocab_size).items():
            dim, local = shard_dim(key, args), list(shape)
            if dim is None:
                shard[key] = torch.ones(shape)  # replicated norms must be equal on every shard
                continue
            local[dim] //= mp
            shard[key] = torch.randn(local, generator=generator).mul_(0.02)
        torch.save(shard, ckpt / shard_file(rank))
        del shard
    write_params(ckpt, args)
    write_manifest_and_commit(ckpt)  # as a training checkpoint has: a reshard checks SRC against it


def run_child(cmd: list[str]) -> tuple[float, float, int, float]:
    """(seconds, seconds until the data is on disk, peak RSS in bytes, CPU seconds) of one child."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    os.sync()
    # ru_maxrss is in KiB on Linux; CPU time counts every thread and does not depend on other load
    return elapsed, time.perf_counter() - start, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def same_tensors(a: Path, b: Path, mp: int) -> bool:
    import torch

    from llama_dist.checkpoint_files import shard_file

    for rank in range(mp):
        x = torch.load(a / shard_file(rank), mmap=True, weights_only=True)
        y = torch.load(b / shard_file(rank), mmap=True, weights_only=True)
        if list(x) != list(y) or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def n_params(dim: int, layers: int, vocab: int, multiple_of: int = 256) -> int:
    """Parameters of a Llama 2-shaped model (no GQA), as count_parameters counts them, without torch."""
    ffn = multiple_of * ((int(2 * 4 * dim / 3) + multiple_of - 1) // multiple_of)
    return layers * (4 * dim * dim + 3 * dim * ffn + 2 * dim) + dim + 2 * vocab * dim


def child_main(argv: list[str]) -> None:
    """The parts that need torch, run in a child: `_write DIR dim layers heads vocab` or `_compare A B`."""
    if argv[0] == "_write":
        from llama_dist.model import ModelArgs

        dim, layers, heads, vocab = map(int, argv[2:6])
        write_synthetic(Path(argv[1]), ModelArgs(dim=dim, n_layers=layers, n_heads=heads, vocab_size=vocab), mp=2)
    else:
        ok = same_tensors(Path(argv[1]), Path(argv[2]), 2)
        print(f"round trip 2 -> 1 -> 2 bit for bit: {ok}")
        sys.exit(0 if ok else 1)


Row = tuple[float, float, int, float]  # run_child's figures


def set_cache(directory: Path, cached: bool) -> None:
    """Read every file of `directory` into the page cache, or drop it from there (Linux)."""
    for path in sorted(directory.iterdir()):
        with open(path, "rb", buffering=0) as handle:
            if cached:
                buffer = bytearray(16 << 20)
                while handle.readinto(buffer):
                    pass
            elif hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed_round(python: str, src: Path, root: Path, reshard_flags: list[str], settle: float,
                cached: bool) -> dict[str, Row]:
    """One copy, one sha256 + CRC-32 pass, one reshard 2 -> 1 and one 1 -> 2.

    Each step's source is first read into the page cache or dropped from it (`cached`),
    so that all of them read alike; a writer then deletes what it wrote in the round
    before and waits `settle` seconds, so that each starts from the same state of the
    VM's free memory (the first round, with nothing to delete, is a warm-up).
    """
    copy, mp1, mp2 = root / "copy", root / "mp1", root / "mp2-again"
    rows = {}

    def write(name: str, source: Path, out: Path, cmd: list[str]) -> None:
        set_cache(source, cached)
        shutil.rmtree(out, ignore_errors=True)
        time.sleep(settle)
        rows[name] = run_child(cmd + [str(source), str(out)])

    write("copy (shutil.copytree)", src, copy,
          [python, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"])
    # what a verified copy adds: the sha256 (manifest) and CRC-32 (zip) of every byte, one pass each
    set_cache(src, cached)
    rows["sha256 + CRC-32 of it"] = run_child([python, "-c", HASH_FILES, str(src)])
    cli = [python, "-m", "llama_dist.cli", "reshard", *reshard_flags, "--mp"]
    write("reshard 2 -> 1", src, mp1, cli + ["1"])
    write("reshard 1 -> 2", mp1, mp2, cli + ["2"])
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_write", "_compare"):
        return child_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (default: the temp dir)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (copy, hash, reshard 2 -> 1, 1 -> 2)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--no-verify", action="store_true",
                        help="reshard with --no-verify: leave out the sha256 check of SRC against its manifest")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between deleting a writer's previous output and starting it (see above)")
    parser.add_argument("--sources", choices=["cold", "cached"], default="cold",
                        help="each step reads its source from the disk (dropped from the page cache first, "
                             "as a checkpoint written long ago) or from the page cache (read through first)")
    opts = parser.parse_args()
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")

    free, layers = shutil.disk_usage(opts.dir).free, opts.layers
    # the mp=2 source, its copy, the mp=1 and mp=2 results, plus slack
    while layers > 1 and 4.5 * 4 * n_params(opts.dim, layers, opts.vocab) > free:
        layers -= 1
    if layers != opts.layers:
        print(f"note: only {free / GiB:.1f} GiB free in {opts.dir}; scaled down to {layers} layers")
    root = Path(tempfile.mkdtemp(prefix="bench_reshard-", dir=opts.dir))
    python, me = sys.executable, str(Path(__file__).resolve())
    try:
        src = root / "mp2"
        written = run_child([python, me, "_write", str(src), str(opts.dim), str(layers), str(opts.heads),
                             str(opts.vocab)])[0]
        size = sum(p.stat().st_size for p in src.iterdir())
        print(f"checkpoint: {n_params(opts.dim, layers, opts.vocab) / 1e9:.2f}B parameters (dim {opts.dim}, "
              f"{layers} layers, vocab {opts.vocab}), fp32 mp=2, {size / GiB:.2f} GiB; written in {written:.0f}s")

        # the reshard's process ends without the interpreter's teardown (cli.QUICK_EXIT): so does this one
        floor = run_child([python, "-c", "import os, llama_dist.reshard; os._exit(0)"])
        rounds = []
        for index in range(opts.rounds + 1):
            rounds.append(timed_round(python, src, root, ["--no-verify"] if opts.no_verify else [], opts.settle,
                                      opts.sources == "cached"))
            print(f"{f'round {index}' if index else 'warm-up'}: " + ", ".join(
                f"{name.split(' (')[0]} {row[0]:.1f}s" for name, row in rounds[-1].items()), flush=True)
        del rounds[0]

        # each figure is the median over rounds of its ratio to the copy of the same round: how fast
        # this VM writes fresh pages drifts by several times between minutes, and both sides feel it
        def median_of(name: str, pick) -> float:
            return statistics.median(pick(r[name], r["copy (shutil.copytree)"]) for r in rounds)

        print(f"\nmedians over {opts.rounds} rounds; 'x copy' is the median of each round's ratio to its own copy")
        print(f"{'':24} {'seconds':>8} {'x copy':>7} {'+sync s':>8} {'x copy':>7} {'net x':>6} {'CPU s':>6} "
              f"{'peak RSS':>10} {'/ size':>7}")
        for name in rounds[0]:
            startup = floor[0] * name.startswith("reshard")  # starting python and the reshard modules
            seconds = median_of(name, lambda row, copy: row[0])
            ratio = median_of(name, lambda row, copy: row[0] / copy[0])
            synced = median_of(name, lambda row, copy: row[1])
            synced_ratio = median_of(name, lambda row, copy: row[1] / copy[1])
            net = median_of(name, lambda row, copy, startup=startup: (row[0] - startup) / copy[0])
            cpu = median_of(name, lambda row, copy: row[3])
            rss = max(r[name][2] for r in rounds)
            print(f"{name:24} {seconds:8.1f} {ratio:7.2f} {synced:8.1f} {synced_ratio:7.2f} "
                  f"{net:6.2f} {cpu:6.1f} {rss / GiB:8.2f} G {rss / size:7.1%}")
        print(f"('+sync': until os.sync() returns; 'net x': less starting python and importing the reshard, "
              f"{floor[0]:.1f}s, {floor[3]:.1f} CPU s, {floor[2] / GiB:.2f} GiB peak RSS on its own; "
              f"peak RSS is the highest of the rounds.)")
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
              f"each writer started {opts.settle:g}s after its previous output was deleted; sources "
              f"{'read from the page cache' if opts.sources == 'cached' else 'read from the disk (cold)'}")
        print(f"goal: reshard <= 2x copy time, peak RSS <= {size / 2 / GiB:.2f} GiB (half the checkpoint)")
        subprocess.run([python, me, "_compare", str(src), str(root / "mp2-again")], check=True)
    finally:
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
