"""Training tokens/s and MFU on GPUs: the trainer's own step on a ~1.1B model in bf16 (from Ampere on).

    python bench/bench_gpu.py                                       # one GPU: an NCCL world of one
    torchrun --nproc_per_node 8 bench/bench_gpu.py                  # dp=8 on one node
    torchrun --nproc_per_node 8 bench/bench_gpu.py parallel.mp=2    # dp=4 x mp=2
    python bench/bench_gpu.py --config tiny train.device=cpu train.compile=false --steps 3   # no GPU: a smoke run
    python bench/bench_gpu.py --checkpoint            # then save a checkpoint, resume it in a new Trainer

Each step is Trainer.train_step, unchanged: bf16 autocast, fairscale's layers, DDP over
the data-parallel group, clipping by the global norm, fused AdamW on CUDA, and each
block compiled (configs/llama-1b.yaml sets train.compile). Only the data differs from
`llama-dist train`: random tokens, written by each process into a temp dir in the
loader's own format. The first --warmup steps (compilation, the allocator's growth)
are not timed.

MFU = the model's FLOPs per step (model.flops_per_token x tokens of all data-parallel
ranks) / step time / (world size x the device's peak): on CUDA the datasheet's dense
bf16 figure (metrics.GPU_PEAK_TFLOPS), on CPU the fp32 matmul peak measured at start.
Issue 4's goal for a ~1B model on a GPU: >= 45%.

--checkpoint then times Trainer.save (weights, AdamW state, the rest; written from the GPU one
tensor at a time, fsynced, hashed) into a temp run dir, takes two more steps, frees that Trainer,
and times a new one's resume (with the sha256 check unless checkpoint.verify=false), which takes
the same two steps: the losses must come out the same, the second of which depends on the
restored AdamW moments and step too, or the bench exits 1. Rank 0 makes the run dir and every
rank writes into it, as in training: on several nodes, put it on a disk they share
(--checkpoint-dir). GB/s counts the checkpoint's files, every rank's.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench_loader import synthetic_data
from llama_dist import distributed
from llama_dist.config import load_config, validate
from llama_dist.train import StopSignal, Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="llama-1b")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--checkpoint", action="store_true", help="then time a save and a resume")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where --checkpoint's temp run dir goes (default: the system's temp dir); "
                             "on several nodes, a directory every node shares")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.micro_batch_size=4")
    opts = parser.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    cfg = load_config(opts.config, opts.overrides)
    cfg.train.eval_interval = 0  # never validates; a val split the bench writes would not fit dp=8's batch
    info = distributed.init_distributed(cfg.parallel.mp, cfg.parallel.backend, cfg.train.device,
                                        cfg.parallel.timeout_minutes)
    data_dir = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    run_dir = shared_run_dir(info, opts.checkpoint_dir)
    try:
        validate(cfg, world_size=info.world_size)
        steps = opts.warmup + opts.steps
        per_rank = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps
        # each process writes the same tokens (one seed) for itself: nodes need not share a disk
        synthetic_data(data_dir, (steps + 2) * per_rank * info.dp_size + cfg.data.seq_len + 1,
                       cfg.model.vocab_size, shard_tokens=1 << 26)
        cfg.data.dir = str(data_dir)
        cfg.data.tokenizer = ""  # synthetic tokens: no tokenizer to copy into a checkpoint
        cfg.train.run_dir = str(run_dir)
        trainer = Trainer(cfg, info)
        cuda = trainer.device.type == "cuda"
        times, losses = [], []
        with StopSignal() as stop:
            for index in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss, _, _, _ = trainer.train_step(stop, set())
                if cuda:
                    torch.cuda.synchronize()
                if index >= opts.warmup:
                    times.append(time.perf_counter() - start)
                losses.append(loss)
                trainer.step += 1
        report(trainer, times, losses, opts)
        if opts.checkpoint:
            saved, save_s, expected = save_then_step(trainer)
            del trainer
            resume_then_step(cfg, info, saved, save_s, expected)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if info.is_rank0:
            shutil.rmtree(run_dir, ignore_errors=True)
        distributed.shutdown()


def shared_run_dir(info, parent: str | None) -> Path:
    """One temp run dir for every rank, made by rank 0: a checkpoint's files go into one directory."""
    name = [tempfile.mkdtemp(prefix="bench_gpu-run-", dir=parent) if info.is_rank0 else None]
    if info.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _timed(fn, device: torch.device) -> float:
    distributed.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()
    return time.perf_counter() - start


def _two_steps(trainer: Trainer) -> list[float]:
    losses = []
    with StopSignal() as stop:
        for _ in range(2):
            losses.append(trainer.train_step(stop, set())[0])
            trainer.step += 1
    return losses


def save_then_step(trainer: Trainer) -> tuple[Path, float, list[float]]:
    """Save, then two more steps: (the checkpoint, seconds to save, the steps' losses)."""
    paths: list[Path] = []
    seconds = _timed(lambda: paths.append(trainer.save()), trainer.device)
    return paths[0], seconds, _two_steps(trainer)


def resume_then_step(cfg, info, saved: Path, save_s: float, expected: list[float]) -> None:
    gc.collect()  # the first Trainer is gone: its GPU memory goes back before the new one is built
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    resumed = Trainer(cfg, info)
    load_s = _timed(resumed.resume, resumed.device)
    got = _two_steps(resumed)
    same = got == expected  # each loss is all-reduced: every rank decides alike
    if info.is_rank0:
        files = list(saved.iterdir())
        size = sum(f.stat().st_size for f in files)
        checked = "verified" if cfg.checkpoint.verify else "not verified"
        print(f"checkpoint: {size / 1e9:.2f} GB ({len(files)} files); save {save_s:.1f} s "
              f"({size / 1e9 / save_s:.2f} GB/s), resume {load_s:.1f} s ({size / 1e9 / load_s:.2f} GB/s, {checked}); "
              f"the next two steps' losses {expected[0]:.6f} {expected[1]:.6f} straight, "
              f"{got[0]:.6f} {got[1]:.6f} resumed: {'the same' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(1)


def report(trainer: Trainer, times: list[float], losses: list[float], opts: argparse.Namespace) -> None:
    info, cfg = trainer.info, trainer.cfg
    if not info.is_rank0:
        return
    step_s = statistics.median(times)
    tokens_s = trainer.tokens_per_step / step_s
    mfu = tokens_s * trainer.flops_per_token / (info.world_size * trainer.peak_flops)
    device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    if trainer.device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(trainer.device) / 2**30:.1f} GiB peak allocated on rank 0"
    else:
        memory = "n/a on CPU"
    args = cfg.model
    print(f"model: {opts.config}, dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.kv_heads} kv), ffn {args.ffn_hidden_dim}, vocab {args.vocab_size}; "
          f"{trainer.flops_per_token / 1e9:.2f} GFLOP/token at seq {cfg.data.seq_len}")
    print(f"world {info.world_size} = dp {info.dp_size} x mp {info.mp_size} on {device} ({info.backend}, "
          f"{str(trainer.dtype).replace('torch.', '')}), compile {cfg.train.compile}, activation checkpointing "
          f"{cfg.train.activation_checkpointing}; {trainer.tokens_per_step} tokens/step "
          f"(micro-batch {cfg.data.micro_batch_size} x {cfg.data.seq_len} x accum {cfg.train.grad_accum_steps} "
          f"x dp {info.dp_size})")
    print(f"step time median {step_s * 1e3:.1f} ms over {len(times)} steps (min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f}) after {opts.warmup} untimed")
    print(f"tokens/s {tokens_s:,.0f} ({tokens_s / info.world_size:,.0f} per device); MFU {100 * mfu:.1f}% "
          f"against {trainer.peak_flops / 1e12:.1f} TFLOP/s per device ({trainer.peak_source})")
    print(f"memory: {memory}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
