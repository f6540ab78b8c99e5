"""Validation loss and perplexity: a library function for the trainer, and `llama-dist eval`.

`evaluate` needs only a model and an iterable of (inputs, targets) batches, so
the trainer calls it on its live (possibly DDP-wrapped) model for periodic
validation, and the command calls it on a loaded checkpoint:

    llama-dist eval runs/tiny/checkpoints/step-000200 --data data/stdlib --batches 20
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fairscale.nn.model_parallel.initialize as fs_init

from llama_dist import meta_format
from llama_dist.distributed import current, dp_group, shutdown
from llama_dist.errors import UserError
from llama_dist.launcher import relaunch, under_torchrun

IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it are not scored


def evaluate(model: nn.Module, loader: Iterable, batches: Optional[int] = None) -> dict[str, float]:
    """Mean token cross-entropy (fp32) over up to `batches` batches of `iter(loader)`.

    `batches=None` means one pass: the loader's `batches_per_epoch` if it has one
    (TokenLoader is endless), else until the iterable ends. The loader is consumed
    from where it stands: give a fresh one to score the same batches every time.

    Every data-parallel rank evaluates its own batches; the sums are all-reduced
    over the data-parallel group, so each rank returns the same figures. Model-
    parallel ranks see the same batches and compute the same loss. Each rank
    must see the same number of batches (or the all-reduce waits forever). The
    model's train/eval mode is restored afterwards. Run it inside the trainer's
    autocast if the trainer uses one; the loss is computed in fp32 either way.
    """
    if batches is None:
        batches = getattr(loader, "batches_per_epoch", None)
    was_training = model.training
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = 0
    model.eval()
    try:
        with torch.no_grad():
            for inputs, targets in loader:
                if batches is not None and n_batches >= batches:
                    break
                inputs, targets = inputs.to(device), targets.to(device)
                logits = model(inputs)  # (B, T, V)
                loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum").double()
                n_tokens += (targets != IGNORE_INDEX).sum()
                n_batches += 1
    finally:
        model.train(was_training)
    if dist.is_initialized() and fs_init.model_parallel_is_initialized() and fs_init.get_data_parallel_world_size() > 1:
        totals = torch.stack([loss_sum, n_tokens])
        dist.all_reduce(totals, group=dp_group())
        loss_sum, n_tokens = totals[0], totals[1]
    if n_tokens.item() == 0:
        raise UserError("the validation data gave no tokens to score; is the val split empty?")
    loss = (loss_sum / n_tokens).item()
    return {"loss": loss, "perplexity": _perplexity(loss), "tokens": int(n_tokens.item()), "batches": n_batches}


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a double past ~709


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-dist eval",
        description="Validation loss and perplexity of a checkpoint; an MP=N checkpoint starts N ranks.",
    )
    parser.add_argument("ckpt", help="checkpoint directory: consolidated.NN.pth + params.json")
    parser.add_argument("--data", required=True, help="a `llama-dist prepare` output directory (its val split)")
    parser.add_argument("--batches", type=int, default=20, help="batches per data-parallel rank; 0: the whole split")
    parser.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len of CKPT/config.yaml, else 256")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per batch; default: data.micro_batch_size of CKPT/config.yaml, else 8")
    parser.add_argument("--seed", type=int, default=1234, help="the loader's order seed")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def _run_config(ckpt_dir: str) -> dict:
    """data.seq_len and data.micro_batch_size of the run that wrote the checkpoint, if it says."""
    import yaml

    path = Path(ckpt_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
    except (yaml.YAMLError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:  # 0 used to mean the default, silently
            raise UserError(f"{flag} must be 1 or more, got {value}; leave it out for the checkpoint's run's own")
    n_shards = len(meta_format.shard_paths(args.ckpt))
    if not Path(args.data).is_dir():
        raise UserError(f"data directory {args.data} does not exist; run `llama-dist prepare` first")
    if args.batches < 0:
        raise UserError(f"--batches must be 0 (the whole split) or more, got {args.batches}")
    if n_shards > 1 and not under_torchrun():
        print(f"{args.ckpt} has {n_shards} model-parallel shards: starting {n_shards} ranks", file=sys.stderr)
        return relaunch("llama_dist.evaluate", argv, n_shards)
    started_here = not dist.is_initialized()
    try:
        return _eval(args, n_shards)
    finally:
        if started_here:
            shutdown()


def _eval(args: argparse.Namespace, n_shards: int) -> int:
    from llama_dist.generation import load_model
    from llama_dist.loader import TokenLoader

    run = _run_config(args.ckpt)
    seq_len = args.seq_len or int(run.get("seq_len", 256))
    batch_size = args.batch_size or int(run.get("micro_batch_size", 8))
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % n_shards:
        raise UserError(f"{args.ckpt} has {n_shards} shards but there are {world_size} processes; "
                        f"launch a multiple of {n_shards}")
    # extra processes beyond the shard count evaluate more data in parallel (dp = world / shards)
    with contextlib.redirect_stdout(sys.stderr):  # fairscale's set-up chatter; stdout is for the figures
        model = load_model(args.ckpt, seq_len, batch_size, model_parallel_size=n_shards, device=args.device,
                           vocab_size=_tokenizer_vocab(args.ckpt))
    info = current()
    loader = TokenLoader(args.data, split="val", seq_len=seq_len, micro_batch_size=batch_size,
                         dp_rank=info.dp_rank, dp_size=info.dp_size, seed=args.seed,
                         expected_vocab_size=model.args.vocab_size)
    start = time.perf_counter()
    # one pass at most: more batches would score the same windows twice
    batches = min(args.batches, loader.batches_per_epoch) if args.batches else loader.batches_per_epoch
    result = evaluate(model, loader, batches)
    seconds = time.perf_counter() - start
    if info.is_rank0:
        print(f"val loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}")
        print(f"{result['tokens']} tokens in {result['batches']} batches per rank x {info.dp_size} data-parallel "
              f"(seq_len {seq_len}, batch {batch_size}, mp {info.mp_size}) in {seconds:.1f} s", file=sys.stderr)
    return 0


def _tokenizer_vocab(ckpt_dir: str) -> Optional[int]:
    """The vocabulary of CKPT/tokenizer.model, needed only for a params.json with vocab_size -1."""
    path = Path(ckpt_dir) / meta_format.TOKENIZER_FILE
    if meta_format.read_params(ckpt_dir).vocab_size != -1 or not path.is_file():
        return None
    from llama_dist.tokenizer import Tokenizer

    return Tokenizer(str(path)).n_words


if __name__ == "__main__":
    from llama_dist.cli import main as _cli_main

    sys.exit(_cli_main(["eval", *sys.argv[1:]]))
