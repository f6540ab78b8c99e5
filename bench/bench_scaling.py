"""Data-parallel weak scaling on CPU: dp=2 (two gloo ranks, one thread each) against dp=1.

    python bench/bench_scaling.py                        # tiny.yaml widened to ~12.6M params
    python bench/bench_scaling.py --rounds 7 model.dim=256 model.n_layers=4 model.n_heads=4

Efficiency = dp=2 tokens/s over both ranks / (2 x dp=1 tokens/s), with the same
micro-batch per rank (weak scaling); issue 4's goal is >= 0.9.

Why this size: DDP all-reduces every gradient each step, and gloo on loopback moves
about 0.8 GB/s, so the all-reduce costs ~4 bytes/param / 0.8 GB/s while compute costs
~6 FLOP/param/token / ~80 GFLOP/s per core. Per 2,048 tokens per rank that is ~3% of
the step, partly hidden behind backward by DDP's buckets: a realistic ratio (a GPU
node's NVLink does better, Ethernet between nodes worse). A tiny model (1.4M) would
be all overhead; small.yaml (110M) takes ~20 s per step per core.

One launch of two ranks alternates the two measurements so that both see the same
host: in a dp=1 phase rank 0 trains a plain (no DDP) copy alone while rank 1 sleeps
in a barrier; in a dp=2 phase both ranks train a DDP model over the data-parallel
group; in a "pair" phase both train their plain copies at once without communicating,
which shows what the two cores give together (shared cache and memory bandwidth)
apart from what the all-reduce costs. Other processes share this host's two cores, so each phase is also timed
without the time its main thread spent waiting to be scheduled (/proc schedstat
run delay): 'wall' is what you get now, 'busy' estimates an otherwise idle host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from llama_dist import distributed
from llama_dist.allocator import keep_freed_memory
from llama_dist.config import load_config
from llama_dist.model import Transformer, count_parameters
from llama_dist.train import build_optimizer

DEFAULT_OVERRIDES = ["model.dim=384", "model.n_layers=6", "model.n_heads=6"]


def run_delay_s() -> float:
    """Seconds this thread has spent runnable but not running (0 where /proc lacks it)."""
    try:
        with open("/proc/thread-self/schedstat") as handle:
            return int(handle.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def timed_steps(forward, optimizer, batches) -> tuple[float, float]:
    """(wall, wall minus scheduling delay) for forward + cross-entropy + backward + AdamW."""
    wall, delay = time.perf_counter(), run_delay_s()
    for inputs, targets in batches:
        logits = forward(inputs)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    wall = time.perf_counter() - wall
    return wall, wall - (run_delay_s() - delay)


def rank_main(rank: int, world: int, port: int, opts: argparse.Namespace, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    keep_freed_memory()  # as train.train does on CPU
    info = distributed.init_distributed(mp=1, backend="gloo", device="cpu")
    cfg = load_config(opts.config, opts.overrides)
    seq_len, batch = cfg.data.seq_len, cfg.data.micro_batch_size

    distributed.seed_everything(cfg.train.seed)
    single = Transformer(cfg.model)
    single_opt = build_optimizer(single, cfg, info.device)
    distributed.seed_everything(cfg.train.seed)
    replica = Transformer(cfg.model)
    ddp = DistributedDataParallel(replica, process_group=distributed.dp_group(),
                                  gradient_as_bucket_view=opts.bucket_view)
    ddp_opt = build_optimizer(replica, cfg, info.device)

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as a loader gives
    tokens = torch.randint(0, cfg.model.vocab_size, (opts.steps, batch, seq_len + 1), generator=generator)
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]

    # warm up both (allocator, AdamW's state, DDP's bucket rebuild after its first step)
    timed_steps(single, single_opt, batches[:1])
    dist.barrier()
    timed_steps(ddp, ddp_opt, batches[:2])
    for round_index in range(opts.rounds):
        dist.barrier()
        phases = ["dp1", "pair", "dp2"] if round_index % 2 == 0 else ["dp2", "pair", "dp1"]
        for phase in phases:
            dist.barrier()
            if phase == "dp2":
                wall, busy = timed_steps(ddp, ddp_opt, batches)
            elif phase == "pair" or rank == 0:  # pair: both ranks alone at once, no communication
                wall, busy = timed_steps(single, single_opt, batches)
            else:
                continue
            results.put((round_index, phase, rank, wall, busy))
    # for scale: one all-reduce of every gradient at once, as if nothing overlapped it
    grads = torch.zeros(sum(p.numel() for p in replica.parameters()))
    dist.all_reduce(grads, group=distributed.dp_group())
    reduce_times = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads, group=distributed.dp_group())
        reduce_times.append(time.perf_counter() - start)
    if rank == 0:
        results.put(("meta", batch * seq_len, os.getloadavg()[0], statistics.median(reduce_times)))
    distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("overrides", nargs="*", default=None,
                        help=f"config overrides (default: {' '.join(DEFAULT_OVERRIDES)} data.seq_len=256)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per phase")
    parser.add_argument("--bucket-view", action="store_true",
                        help="DDP(gradient_as_bucket_view=True): grads live in the buckets, no copies")
    opts = parser.parse_args(argv)
    if not opts.overrides:
        opts.overrides = [*DEFAULT_OVERRIDES, "data.seq_len=256"]
    cfg = load_config(opts.config, opts.overrides)
    args = cfg.model
    print(f"model: dim {args.dim}, layers {args.n_layers}, heads {args.n_heads}, kv heads {args.kv_heads}, "
          f"vocab {args.vocab_size}, {count_parameters(args) / 1e6:.1f}M params "
          f"({4 * count_parameters(args) / 2**20:.0f} MiB of fp32 gradients all-reduced per step)")
    print(f"per rank: micro-batch {cfg.data.micro_batch_size} x seq {cfg.data.seq_len}, 1 thread, fp32, "
          f"{opts.steps} steps per phase, {opts.rounds} rounds; gloo on loopback, DDP over dp_group()"
          f"{', gradient_as_bucket_view' if opts.bucket_view else ''}")

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = distributed.free_port()
    load_before = os.getloadavg()[0]
    mp.start_processes(rank_main, args=(2, port, opts, results), nprocs=2, start_method="spawn", join=True)

    times: dict[tuple[int, str], list[tuple[float, float]]] = {}
    meta = None
    for _ in range(5 * opts.rounds + 1):  # per round: dp1 from rank 0, pair and dp2 from both; then meta
        item = results.get(timeout=60)
        if item[0] == "meta":
            meta = item
            continue
        round_index, phase, _rank, wall, busy = item
        times.setdefault((round_index, phase), []).append((wall, busy))
    tokens_per_rank = meta[1] * opts.steps

    # per clock: efficiency = dp2 / (2 x dp1); ceiling = pair / (2 x dp1), what two cores
    # deliver with no communication at all; dp2 / pair is what DDP's all-reduce leaves of it
    figures = {clock: {"efficiency": [], "ceiling": [], "dp2/pair": []} for clock in ("wall", "busy")}
    for round_index in range(opts.rounds):
        line = [f"round {round_index + 1}:"]
        for clock, index in (("wall", 0), ("busy", 1)):
            rate = {"dp1": tokens_per_rank / times[(round_index, "dp1")][0][index]}
            for phase in ("pair", "dp2"):  # both ranks: the phase ends with the slower one
                rate[phase] = 2 * tokens_per_rank / max(t[index] for t in times[(round_index, phase)])
            figures[clock]["efficiency"].append(rate["dp2"] / (2 * rate["dp1"]))
            figures[clock]["ceiling"].append(rate["pair"] / (2 * rate["dp1"]))
            figures[clock]["dp2/pair"].append(rate["dp2"] / rate["pair"])
            line.append(f"[{clock}] dp1 {rate['dp1']:.0f}, pair {rate['pair']:.0f}, dp2 {rate['dp2']:.0f} tok/s, "
                        f"efficiency {figures[clock]['efficiency'][-1]:.3f}")
        print(" ".join(line), flush=True)
    print(f"one all-reduce of all {4 * count_parameters(args) / 2**20:.0f} MiB of gradients: {1000 * meta[3]:.0f} ms "
          f"(median of 3); load average {load_before:.1f} before, {meta[2]:.1f} after (2 cores)")
    print("medians over rounds (pair: both ranks training alone at once, no communication):")
    for clock, values in figures.items():
        summary = ", ".join(f"{name} {statistics.median(v):.3f}" for name, v in values.items())
        spread = f"{min(values['efficiency']):.3f}-{max(values['efficiency']):.3f}"
        print(f"  [{clock}] weak-scaling {summary} (efficiency range {spread}; goal >= 0.9)")

if __name__ == "__main__":
    main()
