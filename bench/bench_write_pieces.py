"""pwrite GB/s into a new file by the size of each write, after a pause: why streamed_save's page-cache
fallback (for file systems that refuse O_DIRECT) writes in 1 MiB pieces.

    python bench/bench_write_pieces.py                    # 1 GiB per write, 4 s pause, in the temp dir
    python bench/bench_write_pieces.py --dir /scratch --pause 0

Each timed write fills a new file of --size bytes from one resident buffer, in pieces
of the given size, --pause seconds after the previous file was deleted. A write of
2 MiB or more lets the kernel put the file in 2 MiB page-cache folios. On a VM that
hands free memory back to its host (Firecracker's free page reporting, about 2 s after
it is freed), those came from memory the host had to fault back in, and ran ~10x
slower than smaller writes; on a machine without that, all sizes should run alike.
Sizes run in two passes, the second in reverse order, so that order does not decide.
Nothing is synced to the disk: this is the page cache's speed, not the disk's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 32 * MiB]


def timed_write(path: Path, buffer: memoryview, piece: int, size: int) -> float:
    """Seconds to write `size` bytes into a new file in pieces of `piece` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for pos in range(0, size, piece):
            os.pwrite(fd, buffer[: min(piece, size - pos)], pos)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (default: the temp dir)")
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes per file (default 1 GiB)")
    parser.add_argument("--pause", type=float, default=4.0, help="seconds between deleting a file and the next write")
    opts = parser.parse_args()

    buffer = memoryview(bytearray(b"\x5a" * max(SIZES)))  # resident before the first timed write
    path = Path(tempfile.mkdtemp(prefix="bench_write_pieces-", dir=opts.dir)) / "out"
    seconds: dict[int, list[float]] = {size: [] for size in SIZES}
    try:
        for order in (SIZES, SIZES[::-1]):
            for piece in order:
                path.unlink(missing_ok=True)
                time.sleep(opts.pause)
                seconds[piece].append(timed_write(path, buffer, piece, opts.size))
                print(f"{piece // KiB:6d} KiB pieces: {opts.size / seconds[piece][-1] / 1e9:.2f} GB/s", flush=True)
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    print(f"\n{opts.size / 2**30:.2f} GiB per file, each written {opts.pause:g}s after the last was deleted; "
          f"median of {len(seconds[SIZES[0]])} runs per size:")
    for piece, runs in seconds.items():
        print(f"  {piece // KiB:6d} KiB  {opts.size / statistics.median(runs) / 1e9:5.2f} GB/s  "
              f"({', '.join(f'{run:.2f}' for run in runs)} s)")


if __name__ == "__main__":
    main()
