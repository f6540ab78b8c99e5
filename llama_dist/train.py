"""Pretrain a LLaMA model over data x model parallelism.

One process (CPU or one GPU):
    llama-dist train configs/tiny.yaml train.steps=100
One node, 8 processes, tensor parallel 2 inside data parallel 4:
    torchrun --standalone --nproc_per_node 8 -m llama_dist.train configs/small.yaml parallel.mp=2
    llama-dist train configs/small.yaml parallel.mp=2 --nproc 8        (starts torchrun itself)
Several nodes (run on every node; HOST is the first node's address):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --rdzv-id JOB -m llama_dist.train configs/llama2-7b.yaml parallel.mp=8

The run resumes from the latest complete checkpoint in train.run_dir. On SIGTERM or
SIGUSR1 (what SLURM sends before a time limit or preemption) every rank agrees at the
next step boundary, saves a checkpoint, writes RUN/PREEMPTED and exits with
EXIT_PREEMPTED (75), so a batch script can requeue the job; Ctrl-C and a closed terminal
do the same (a second Ctrl-C stops at once, unsaved). After a rank crashes,
torchrun --max-restarts N starts every rank again and the run goes on from its latest
checkpoint (ranks that had stopped on purpose, preempted or diverged, or had met an
expected mistake such as a corrupt checkpoint, exit again at once). With
torchrun itself, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for that (`--nproc N
--max-restarts K` and slurm/train.sbatch do), or a restarted rank may fail to connect
(pytorch/pytorch#135712).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llama_dist import distributed
from llama_dist.allocator import keep_freed_memory
from llama_dist.checkpoint import latest_checkpoint, load_checkpoint, load_init_weights, prune_checkpoints, save_checkpoint
from llama_dist.checkpoint_files import TOKENIZER_FILE
from llama_dist.config import Config, load_config, validate
from llama_dist.distributed import DistInfo, get_logger
from llama_dist.errors import UserError
from llama_dist.files import atomic_write_text
from llama_dist.metrics import TensorBoard, device_peak_flops, format_duration, memory_gib
from llama_dist.model import Transformer, flops_per_token
from llama_dist.run_checks import check_compiler, check_disk_space, checkpoint_tokenizer, preflight, resume_point
from llama_dist.run_markers import (DIVERGED_MARKER, ERROR_MARKER, EXIT_DIVERGED, EXIT_PREEMPTED, PREEMPTED_MARKER,
                                    StopSignal, clear_markers, leave_rank_error, marker_step, rank_error, restarted,
                                    stopped_before_restart)

log = get_logger("llama_dist.train")


# --------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at train.steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.train.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; norms and embeddings get no weight decay unless configured."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = param.ndim < 2 or name.startswith("tok_embeddings")
        (no_decay if exempt and not cfg.optim.decay_norms_and_embeddings else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels: on CUDA, and on CPU since torch 2.4 (the step drops ~6x for 110M params)
    cpu_fused = device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    fused = {"fused": True} if device.type == "cuda" or cpu_fused else {}
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, **fused)


# The one buffer, rope, is computed alike on every rank: broadcasting it from dp rank 0 at every
# forward would only add a collective per micro-batch. torch 2.13 renamed the switch.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 autocast where the GPU has bf16 tensor cores (compute capability 8.0 on, Ampere and
    later); an older one (V100, T4) only emulates bf16, slower than fp32, so auto means fp32 there."""
    if cfg.train.dtype == "bf16":
        return torch.bfloat16
    if cfg.train.dtype == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def fault_nan_steps() -> set[int]:
    """Tests inject a non-finite loss at these steps (LLAMA_DIST_FAULT_NAN=3,4)."""
    spec = os.environ.get("LLAMA_DIST_FAULT_NAN", "")
    return {int(s) for s in spec.split(",") if s.strip()}


# --------------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        from llama_dist.loader import TokenLoader

        self.cfg, self.info = cfg, info
        self.device = info.device
        self.dtype = resolve_dtype(cfg, self.device)
        self.run_dir = Path(cfg.train.run_dir)
        self.tokenizer_path = checkpoint_tokenizer(cfg)
        if self.tokenizer_path is None and info.is_rank0:
            log.warning(f"{Path(cfg.data.dir) / TOKENIZER_FILE} is missing: checkpoints will hold no tokenizer; "
                        f"set data.tokenizer to the one the shards were made with")

        distributed.seed_everything(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.sharded = distributed.sharded_parameter_names(self.model)
        # DDP over the data-parallel group only: the world group would overwrite other mp ranks' shards
        self.ddp = (DistributedDataParallel(self.model, process_group=distributed.dp_group(),
                                            device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                            **NO_BUFFER_SYNC)
                    if info.dp_size > 1 else None)
        check_compiler(cfg, self.device)
        if cfg.train.compile:  # block by block: the same speed as the whole model, a tenth of the warm-up
            for layer in self.model.layers:
                layer.compile()
        self.forward = self.ddp or self.model

        loader_args = dict(seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size,
                           dp_rank=info.dp_rank, dp_size=info.dp_size, seed=cfg.data.seed,
                           expected_vocab_size=cfg.model.vocab_size)
        self.loader = TokenLoader(cfg.data.dir, "train", verify_checksums=cfg.data.verify_checksums, **loader_args)
        self.make_val_loader = lambda: TokenLoader(cfg.data.dir, "val", **loader_args)
        if cfg.train.eval_interval:
            self.make_val_loader()  # a val split too small for one batch is refused now, not at the first eval
        self.batches: Iterator = iter(self.loader)

        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * info.dp_size
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops, self.peak_source = device_peak_flops(self.device, self.dtype, cfg.log.cpu_peak_tflops)
        self.resumed_from: Optional[Path] = None

    # ----------------------------------------------------------------- state

    def resume(self) -> None:
        ckpt = resume_point(self.cfg, self.info.mp_size)
        init_from = self.cfg.checkpoint.init_from
        if ckpt is None:
            if init_from:
                load_init_weights(Path(init_from), self.model, self.cfg, self.info)
                log.info(f"weights from {init_from} (checkpoint.init_from); step 0, a fresh optimizer")
            return
        if init_from:
            log.info("checkpoint.init_from is for a run's first start; this one resumes from its own checkpoints")
        # each rank checks its own files: one with a corrupt shard must not leave the others training
        state = distributed.on_every_rank(lambda: load_checkpoint(ckpt, self.model, self.optimizer, self.cfg, self.info),
                                          f"load its part of {ckpt}", self.device)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.loader.load_state_dict(state["loader"])
        self.batches = iter(self.loader)
        self.resumed_from = ckpt
        log.info(f"resumed from {ckpt} at step {self.step}")

    def train_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "mp": self.info.mp_size, "dp": self.info.dp_size, "world_size": self.info.world_size,
                "loader": self.loader.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "lr": lr_at(self.step, self.cfg)}}

    def save(self) -> Path:
        start = time.perf_counter()
        path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.train_state(),
                               self.cfg, self.tokenizer_path, self.info)
        if self.info.is_rank0:
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        distributed.barrier()
        log.info(f"saved checkpoint {path} ({time.perf_counter() - start:.1f}s)")
        return path

    # ----------------------------------------------------------------- one step

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, stop: StopSignal, nan_steps: set[int]) -> tuple[float, float, bool, bool]:
        """Forward/backward over grad_accum_steps micro-batches, then maybe an update.

        Returns (mean loss over dp, grad norm, skipped, stop requested); the last
        three are the same on every rank, decided by one all-reduce.
        """
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            inputs, targets = (t.to(self.device, non_blocking=True) for t in next(self.batches))
            sync = self.ddp is None or micro == accum - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self.autocast():
                logits = self.forward(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                if self.step in nan_steps:
                    loss = loss * float("nan")
                (loss / accum).backward()
            loss_sum += loss.detach()

        norm = distributed.global_grad_norm(self.model.named_parameters(), self.sharded)
        # one all-reduce decides for every rank: the loss for the log, bad step, stop
        flags = torch.stack([loss_sum / accum,
                             (~torch.isfinite(loss_sum) | ~torch.isfinite(norm)).float(),
                             torch.tensor(1.0 if stop.received else 0.0, device=self.device)])
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_reduce(flags)
        mean_loss = flags[0].item() / self.info.world_size  # mp ranks hold the same loss
        bad, stop_now = flags[1].item() > 0, flags[2].item() > 0

        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return mean_loss, norm.item(), True, stop_now
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, norm.item(), False, stop_now

    def validate(self) -> dict:
        from llama_dist.evaluate import evaluate

        with self.autocast():
            return evaluate(self.model, self.make_val_loader(), self.cfg.train.eval_batches)

    # ----------------------------------------------------------------- the loop

    def run(self, stop: Optional[StopSignal] = None) -> int:
        if stop is not None:
            return self._loop(stop)
        with StopSignal() as stop:
            return self._loop(stop)

    def any_rank_stopped(self, stop: StopSignal) -> bool:
        """Whether a stop signal reached any rank; every rank must call this at the same point."""
        flag = torch.tensor(1.0 if stop.received else 0.0, device=self.device)
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_reduce(flag)
        return flag.item() > 0

    def stop_for_requeue(self, stop: StopSignal, last_saved: int) -> int:
        if last_saved != self.step:
            self.save()
        self.leave_marker(PREEMPTED_MARKER, {"step": self.step})
        log.warning(f"received {stop.received or 'a stop signal on another rank'}: saved step "
                    f"{self.step}; exiting with {EXIT_PREEMPTED} so the job can be requeued")
        return EXIT_PREEMPTED

    def leave_marker(self, name: str, content: dict) -> None:
        """Rank 0 writes RUN/<name>, and no rank exits before it is there: under srun
        --kill-on-bad-exit the first node whose ranks are gone has the other nodes' tasks
        killed, and a marker not yet written would leave the batch script guessing why."""
        if self.info.is_rank0:
            atomic_write_text(self.run_dir / name, json.dumps(content) + "\n")
        distributed.barrier()

    def _loop(self, stop: StopSignal) -> int:
        cfg, info = self.cfg, self.info
        nan_steps = fault_nan_steps()
        board = TensorBoard(self.run_dir / "tensorboard", cfg.log.tensorboard and info.is_rank0, self.step)
        log.info(f"world {info.world_size} = dp {info.dp_size} x mp {info.mp_size} on {self.device} "
                 f"({info.backend}, {str(self.dtype).replace('torch.', '')}); "
                 f"{self.tokens_per_step:,} tokens/step; MFU peak {self.peak_flops / 1e12:.2f} TFLOP/s "
                 f"per device ({self.peak_source})")
        consecutive_bad = 0
        last_saved = self.step if self.resumed_from else -1
        window_start, window_steps = time.perf_counter(), 0
        run_start_step, run_start = self.step, time.perf_counter()
        try:
            while self.step < cfg.train.steps:
                loss, norm, skipped, stop_now = self.train_step(stop, nan_steps)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                window_steps += 1
                if skipped:
                    self.skipped_steps += 1
                    consecutive_bad += 1
                    log.warning(f"step {self.step}: non-finite loss {loss:.4g} or grad norm {norm:.4g}; "
                                f"update skipped ({consecutive_bad} in a row, {self.skipped_steps} in all)")
                    if consecutive_bad >= cfg.train.max_bad_steps:
                        latest = latest_checkpoint(self.run_dir)
                        log.error(f"stopping: {consecutive_bad} consecutive non-finite steps "
                                  f"(train.max_bad_steps={cfg.train.max_bad_steps}); the latest good checkpoint "
                                  f"is {latest or 'none'}; lower optim.lr or check the data")
                        self.leave_marker(DIVERGED_MARKER, {"step": self.step, "latest_checkpoint": str(latest or "")})
                        return EXIT_DIVERGED
                else:
                    consecutive_bad = 0

                if self.step % cfg.log.interval == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_sec = self.tokens_per_step * window_steps / elapsed
                    mfu = tokens_per_sec * self.flops_per_token / (self.peak_flops * info.world_size)
                    eta = (time.perf_counter() - run_start) / (self.step - run_start_step) * (cfg.train.steps - self.step)
                    lr = lr_at(self.step - 1, cfg)
                    mem = memory_gib(self.device)
                    log.info(f"step {self.step}/{cfg.train.steps} | loss {loss:.4f} | lr {lr:.3e} | "
                             f"grad norm {norm:.3f} | {tokens_per_sec:,.0f} tok/s | MFU {100 * mfu:.1f}% | "
                             f"mem {mem:.2f} GiB | ETA {format_duration(eta)}")
                    board.scalars(self.step, {
                        "loss/train": loss, "lr": lr, "grad_norm": norm,
                        "throughput/tokens_per_sec": tokens_per_sec, "mfu": mfu, "memory": mem,
                        "skipped_steps": self.skipped_steps})
                    window_start, window_steps = time.perf_counter(), 0

                if stop_now and self.step < cfg.train.steps:  # on the last step: finish as usual
                    return self.stop_for_requeue(stop, last_saved)  # no validation first: the save is due

                paused, started = False, time.perf_counter()
                if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == cfg.train.steps):
                    val = self.validate()
                    log.info(f"step {self.step} | val loss {val['loss']:.4f} | val perplexity {val['perplexity']:.2f}")
                    board.scalars(self.step, {"loss/val": val["loss"], "perplexity/val": val["perplexity"]})
                    paused = True
                # during a run of bad steps an interval save would push out the last good checkpoint
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and consecutive_bad == 0:
                    self.save()
                    last_saved, paused = self.step, True
                if paused:
                    # neither is training throughput: the window's clock skips them, keeping its steps
                    window_start += time.perf_counter() - started
                    # a signal that came meanwhile is acted on now, not after one more step
                    if self.step < cfg.train.steps and self.any_rank_stopped(stop):
                        return self.stop_for_requeue(stop, last_saved)
            if last_saved != self.step:
                self.save()
            log.info(f"done: {self.step} steps, {self.tokens_seen:,} tokens, {self.skipped_steps} skipped; "
                     f"checkpoints in {self.run_dir / 'checkpoints'}")
            return 0
        finally:
            board.close()


def train(cfg: Config) -> int:
    # from the start: a preemption while the model builds or loads still ends in a save at the first step
    with StopSignal() as stop:
        try:
            info = distributed.init_distributed(cfg.parallel.mp, cfg.parallel.backend, cfg.train.device,
                                                cfg.parallel.timeout_minutes)
        except UserError as err:  # a node without the GPU that train.device=cuda asks for
            leave_rank_error(cfg.train.run_dir, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), err)
            raise
        if info.device.type == "cpu":
            keep_freed_memory()
        try:
            validate(cfg, world_size=info.world_size)
            run_dir = Path(cfg.train.run_dir)
            stopped = stopped_before_restart(run_dir, info.world_size)
            if stopped is not None:
                return stopped
            room_for_one_checkpoint(cfg, info)  # before the run dir is made: a refused run leaves nothing
            if info.is_rank0:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not restarted():
                    clear_markers(run_dir, errors=False)
            (run_dir / f"{ERROR_MARKER}.{info.rank}").unlink(missing_ok=True)  # this rank's own, from before
            distributed.barrier()
            trainer = Trainer(cfg, info)
            trainer.resume()
            return trainer.run(stop)
        except UserError as err:
            if not isinstance(err, distributed.AnotherRankFailed):  # the failed rank's marker is the one to report
                leave_rank_error(cfg.train.run_dir, info.rank, info.world_size, err)
            raise
        finally:
            distributed.shutdown()


def room_for_one_checkpoint(cfg: Config, info: DistInfo) -> None:
    """check_disk_space with one outcome on every rank: the free space each sees may differ."""
    warning = distributed.on_every_rank(lambda: check_disk_space(cfg), f"confirm room for one checkpoint on "
                                        f"the disk holding {cfg.train.run_dir}", info.device)
    if warning and info.is_rank0:
        log.warning(warning)


# --------------------------------------------------------------------------- command line


def cli(argv: list[str]) -> int:
    from llama_dist.launcher import relaunch, under_torchrun

    parser = argparse.ArgumentParser(prog="llama-dist train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a YAML file or a bundled name (tiny, small, llama2-7b, ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 parallel.mp=2")
    parser.add_argument("--nproc", type=int, default=1, help="local processes; >1 starts torchrun")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="with --nproc: after a rank fails, start all again (resuming from the latest "
                             "checkpoint) up to this many times")
    args = parser.parse_intermixed_args(argv)  # `--nproc 2 train.steps=5` as well as `train.steps=5 --nproc 2`
    if args.nproc < 1:
        parser.error(f"--nproc must be 1 or more, got {args.nproc}")
    if args.max_restarts < 0 or (args.max_restarts and args.nproc < 2):
        parser.error("--max-restarts needs --nproc 2 or more and a count >= 0")
    cfg = load_config(args.config, args.overrides)  # fail fast, before starting any process
    if args.nproc > 1 and not under_torchrun():
        preflight(cfg, world_size=args.nproc)  # one clean error line here, not one per rank
        run_dir = Path(cfg.train.run_dir)
        clear_markers(run_dir)
        code = relaunch("llama_dist.train", [args.config, *args.overrides], args.nproc, args.max_restarts)
        # torchrun reports any worker failure as 1; a marker says it was a preemption save or divergence,
        # and the last line says so in place of torchrun's report of failed workers
        if code != 0 and (run_dir / PREEMPTED_MARKER).is_file():
            print(f"llama-dist train: stopped by a signal after saving step {marker_step(run_dir / PREEMPTED_MARKER)}; "
                  f"the same command resumes there", file=sys.stderr)
            return EXIT_PREEMPTED
        if code != 0 and (run_dir / DIVERGED_MARKER).is_file():
            print(f"llama-dist train: stopped at step {marker_step(run_dir / DIVERGED_MARKER)} after "
                  f"train.max_bad_steps non-finite steps; lower optim.lr or check the data, then resume "
                  f"from the latest good checkpoint", file=sys.stderr)
            return EXIT_DIVERGED
        error = rank_error(run_dir) if code != 0 else None
        if error is not None:
            raise UserError(error)  # the last line printed, and exit 2, whatever torchrun printed above it
        return code
    return train(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    from llama_dist.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
