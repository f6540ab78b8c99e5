"""`llama-dist reshard`: the command line, which starts checking SRC first thing.

Checking a training checkpoint against its manifest (a sha256 of each file the
reshard reads) needs a core for seconds, and hashlib lets go of the GIL while it
hashes: started before the reshard's own modules are imported and its sources
read, it gets a head start on the writes, which want both cores. The reshard
itself is in llama_dist.reshard; neither imports torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

from llama_dist.checkpoint_files import (CONFIG_FILE, MANIFEST, OPTIMIZER_FILE, PARAMS_FILE, SHARD_NAME,
                                         TOKENIZER_FILE, TRAIN_STATE, BackgroundCheck)

# --dtype's names, and the torch dtypes they stand for
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SOURCE_FIX = "reshard an earlier checkpoint, or pass --no-verify to reshard this one as it is"


def start_source_check(src: Path) -> Optional[BackgroundCheck]:
    """SRC against its manifest, in a thread: every file a reshard reads or carries over, so that
    a corrupt file cannot come out under a fresh, valid manifest. None where SRC has no
    manifest (Meta's releases have none) or is no directory (the reshard says so itself)."""
    if not (src / MANIFEST).is_file():
        return None
    names = sorted(p.name for p in src.iterdir() if SHARD_NAME.match(p.name) or OPTIMIZER_FILE.match(p.name))
    names += [name for name in (PARAMS_FILE, TRAIN_STATE, CONFIG_FILE, TOKENIZER_FILE) if (src / name).is_file()]
    return BackgroundCheck(src, names, SOURCE_FIX)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-dist reshard",
        description="Write a checkpoint with another model-parallel size (weights and training state).",
    )
    parser.add_argument("src", help="checkpoint directory: consolidated.NN.pth + params.json")
    parser.add_argument("dst", help="new directory (must not exist or be empty, unless --force)")
    parser.add_argument("--mp", type=int, required=True, help="the new model-parallel size")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), help="cast the weights, e.g. bf16 for a release")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST once the new one is complete")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking SRC's files against its sha256 manifest")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    check = None if args.no_verify else start_source_check(Path(args.src))

    from llama_dist.reshard import reshard

    reshard(args.src, args.dst, args.mp, dtype=args.dtype, force=args.force, verify=not args.no_verify,
            source_check=check, progress=True)
    size = sum(p.stat().st_size for p in Path(args.dst).iterdir())
    print(f"resharded {args.src} -> {args.dst} (mp={args.mp}, {size / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
