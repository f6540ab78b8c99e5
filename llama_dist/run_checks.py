"""What a run checks before it trains, in the launcher (preflight, once for every rank)
and in each rank: the checkpoint it resumes or starts from, the tokenizer its checkpoints
copy, the compiler torch.compile needs, and the data as the ranks will open it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from llama_dist import distributed
from llama_dist.checkpoint import (check_compatible, check_init_weights, committed_checkpoints, latest_checkpoint,
                                   unfinished_saves)
from llama_dist.checkpoint_files import TOKENIZER_FILE, TRAIN_STATE
from llama_dist.config import Config, validate
from llama_dist.errors import UserError
from llama_dist.files import format_bytes, require_room
from llama_dist.model import count_parameters
from llama_dist.shards import read_manifest

# what a checkpoint stores per parameter: the fp32 weight and AdamW's two fp32 moments
CHECKPOINT_BYTES_PER_PARAMETER = 12


def checkpoint_tokenizer(cfg: Config) -> Optional[Path]:
    """The tokenizer every checkpoint carries a copy of: data.tokenizer, or the one prepare left
    in data.dir. A configured path that is not there is a mistake; a data dir without one (shards
    made elsewhere) means checkpoints without it."""
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise UserError(f"data.tokenizer={cfg.data.tokenizer} is not a file; fix the path, or leave it "
                            f"empty for {Path(cfg.data.dir) / TOKENIZER_FILE}")
        return path
    if not Path(cfg.data.dir).is_dir():  # said before any warning of a missing tokenizer in it
        read_manifest(cfg.data.dir)
    path = Path(cfg.data.dir) / TOKENIZER_FILE
    return path if path.is_file() else None


def check_compiler(cfg: Config, device: torch.device) -> None:
    """torch.compile on a CPU writes C++ and builds it with g++ (or $CXX); without one the run
    would fail at its first step, deep in an inductor traceback."""
    if not cfg.train.compile or device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch's layout: the first step will say
        return
    try:
        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler
        raise UserError("train.compile=true on a CPU needs a C++ compiler and none was found (g++, or the "
                        "one $CXX names); install one (e.g. apt install g++) or set train.compile=false") from None


def checkpoint_bytes(cfg: Config) -> int:
    """One checkpoint's size on disk, from the model's shape: the weights and optimizer state,
    and the tokenizer copy; params.json, the train state and RNG files are a few KB."""
    tokenizer = checkpoint_tokenizer(cfg)
    return CHECKPOINT_BYTES_PER_PARAMETER * count_parameters(cfg.model) + (tokenizer.stat().st_size if tokenizer else 0)


def save_steps(cfg: Config, start: int) -> tuple[int, int]:
    """How many checkpoints a run from step `start` saves if no signal stops it (one every
    checkpoint.interval steps, and one at the end unless that step was one of them), and how
    many of those checkpoint.keep_every keeps for good."""
    steps, every, forever = cfg.train.steps, cfg.checkpoint.interval, cfg.checkpoint.keep_every
    if start >= steps:
        return 0, 0

    def multiples(n: int) -> int:  # of n in (start, steps]
        return steps // n - start // n if n else 0

    final = 0 if every and steps % every == 0 else 1
    kept = (multiples(math.lcm(every, forever)) if every else 0) + (final if forever and steps % forever == 0 else 0)
    return multiples(every) + final, kept if forever else 0


def check_disk_space(cfg: Config) -> Optional[str]:
    """Refuse a run whose disk cannot hold one checkpoint: it would train until its first save and
    lose that work. Returns a warning when the disk holds fewer than the run will keep at once."""
    run_dir = Path(cfg.train.run_dir)
    found = committed_checkpoints(run_dir)
    ahead, kept_for_good = save_steps(cfg, found[-1][0] if found else 0)
    if not ahead:
        return None
    size = checkpoint_bytes(cfg)
    leftovers = sum(f.stat().st_size for _, path in unfinished_saves(run_dir) for f in path.iterdir() if f.is_file())
    free = require_room(run_dir, size, "one checkpoint of this model (fp32 weights and AdamW state)",
                        "the first save would fail: free space there or set train.run_dir to a larger disk",
                        reclaimable=leftovers)
    # a save writes the new checkpoint before it prunes the oldest: keep_last + 1 at once, and
    # the multiples of keep_every stay
    keep = max(1, cfg.checkpoint.keep_last)
    needed = min(ahead, max(1, keep + 1 - len(found)) + kept_for_good)
    if free < needed * size:
        every = f", checkpoint.keep_every={cfg.checkpoint.keep_every} keeps {kept_for_good}" if kept_for_good else ""
        return (f"the disk holding {run_dir} has room for {free // size} more checkpoint(s) of "
                f"{format_bytes(size)} and this run needs {needed} (checkpoint.keep_last={keep}, one more while "
                f"a save runs{every}): a later save will fail and stop the run unless space is freed")
    return None


def resume_point(cfg: Config, mp_size: int) -> Optional[Path]:
    """The checkpoint a run resumes from, checked against the config; None for a fresh start."""
    run_dir = Path(cfg.train.run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not cfg.checkpoint.resume:
        # a fresh run here would save beside them, and a later resume could pick up the old run
        raise UserError(f"{run_dir} already holds checkpoints (the latest is {ckpt.name}) and "
                        f"checkpoint.resume=false; choose a new train.run_dir, or delete "
                        f"{run_dir / 'checkpoints'} to start over")
    if ckpt is not None:
        check_compatible(ckpt, cfg, mp_size)
    return ckpt


def preflight(cfg: Config, world_size: int) -> None:
    """Check the config and open the data as the ranks will, before any rank starts."""
    from llama_dist.loader import TokenLoader

    validate(cfg, world_size=world_size)
    check_disk_space(cfg)  # its warning is the ranks' to print
    check_compiler(cfg, distributed.pick_device(cfg.train.device, cfg.parallel.backend, local_processes=world_size))
    checkpoint_tokenizer(cfg)
    dp_size = world_size // cfg.parallel.mp
    loaders = {split: TokenLoader(cfg.data.dir, split, cfg.data.seq_len, cfg.data.micro_batch_size, 0, dp_size,
                                  seed=cfg.data.seed, expected_vocab_size=cfg.model.vocab_size)
               for split in (("train", "val") if cfg.train.eval_interval else ("train",))}
    ckpt = resume_point(cfg, cfg.parallel.mp)
    if ckpt is None and cfg.checkpoint.init_from:
        check_init_weights(Path(cfg.checkpoint.init_from), cfg, cfg.parallel.mp)
    if ckpt is not None:  # the loader's position must fit this data and batch (its sha256 is the ranks' to check)
        try:
            loader_state = json.loads((ckpt / TRAIN_STATE).read_text())["loader"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # a damaged file: the ranks' manifest check names it
        loaders["train"].load_state_dict(loader_state)
