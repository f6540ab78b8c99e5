"""The one place that touches process groups.

torchrun's environment in, a process group plus fairscale's model- and
data-parallel groups out; rank helpers, seeding and the few
collectives the trainer needs (global grad norm, agreeing on a flag).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import fairscale.nn.model_parallel.initialize as fs_init
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)

from llama_dist.logs import get_logger  # noqa: F401 - the rank-0 logger, for callers that import it from here

from llama_dist.config import ConfigError, ParallelConfig
from llama_dist.errors import UserError

PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, VocabParallelEmbedding)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    mp_rank: int
    mp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    backend: str

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_device(device: str = "auto", backend: str = "auto", local_processes: int = 1) -> torch.device:
    """The device the ranks train on; refuses what this machine cannot do (the launcher checks first).

    `local_processes` is how many ranks share this node: one GPU each, so no more than it has."""
    if device == "auto":  # gloo moves CPU tensors: asked for, it means training on the CPU
        device = "cuda" if torch.cuda.is_available() and backend != "gloo" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if backend == "nccl" and device == "cpu":  # train.device=auto on a machine without CUDA
        raise ConfigError("parallel.backend=nccl needs a CUDA device and none is visible; "
                          "use parallel.backend=gloo or auto")
    if device == "cuda" and local_processes > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ConfigError(f"{local_processes} processes on this node but {gpus} GPU(s) visible, and each "
                          f"process takes one; start {gpus} per node (--nproc {gpus}, NPROC_PER_NODE) "
                          f"or use train.device=cpu")
    return torch.device(device)


def init_distributed(mp: int = 1, backend: str = "auto", device: str = "auto",
                     timeout_minutes: float = ParallelConfig.timeout_minutes) -> DistInfo:
    """Start (or join) the process group from torchrun's environment, then fairscale's groups.

    Without torchrun this is a world of one, so the same code runs in a plain
    `python` process. Calling it again in an initialised process reuses the groups.
    `timeout_minutes` is how long any collective waits for the slowest rank (while
    one rank per shard writes a checkpoint, the others wait) before the run fails;
    NCCL's own default is 10 minutes, which a large model's save can outlast.
    """
    dev = pick_device(device, backend, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "WORLD_SIZE" in os.environ:  # torchrun (or a test's spawned ranks)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain process: a world of one on loopback, leaving the environment alone
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    world_size = dist.get_world_size()
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.mp={mp}; "
            f"launch a multiple of {mp} processes or change parallel.mp"
        )
    if not fs_init.model_parallel_is_initialized():
        with groups_timeout(timeout):
            fs_init.initialize_model_parallel(mp)
    elif fs_init.get_model_parallel_world_size() != mp:
        raise ConfigError(
            f"model parallel is already initialised with mp={fs_init.get_model_parallel_world_size()}, not {mp}"
        )
    return current()


@contextlib.contextmanager
def groups_timeout(timeout: timedelta):
    """fairscale makes its groups with torch's default timeout, not the world's: this passes ours."""
    new_group = dist.new_group
    dist.new_group = functools.partial(new_group, timeout=timeout)
    try:
        yield
    finally:
        dist.new_group = new_group


def current() -> DistInfo:
    """Ranks and sizes of this process; a world of one when nothing is initialised."""
    if not dist.is_initialized() or not fs_init.model_parallel_is_initialized():
        return DistInfo(0, 1, 0, 0, 1, 0, 1, torch.device("cpu"), "none")
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        mp_rank=fs_init.get_model_parallel_rank(),
        mp_size=fs_init.get_model_parallel_world_size(),
        dp_rank=fs_init.get_data_parallel_rank(),
        dp_size=fs_init.get_data_parallel_world_size(),
        device=device,
        backend=backend,
    )


def shutdown() -> None:
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def mp_group() -> dist.ProcessGroup:
    return fs_init.get_model_parallel_group()


def dp_group() -> dist.ProcessGroup:
    """The group DDP must use: the default world group would overwrite other mp ranks' shards."""
    return fs_init.get_data_parallel_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":  # named, or torch warns that it guesses the rank's GPU
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """The same seed on every rank: fairscale builds the full weight and keeps a shard,
    so this makes every model-parallel size start from identical weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device; no fairscale CUDA RNG tracker needed


# --------------------------------------------------------------------------- collectives


def sharded_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that hold a model-parallel shard (fairscale leaves them untagged)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, PARALLEL_LAYERS):
            for param_name, _ in module.named_parameters(recurse=False):
                if param_name == "bias" and isinstance(module, RowParallelLinear):
                    continue  # RowParallelLinear's bias is replicated
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def global_grad_norm(named_params: Iterable[tuple[str, nn.Parameter]], sharded: set[str]) -> torch.Tensor:
    """The norm of the whole model's gradient, equal at every mp size.

    Sharded gradients are summed over the model-parallel group; replicated ones are
    identical on every mp rank and counted once. Call after DDP's backward, when
    gradients are already averaged over data parallelism.
    """
    sharded_sq = replicated_sq = None
    for name, p in named_params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if name in sharded:
            sharded_sq = sq if sharded_sq is None else sharded_sq + sq
        else:
            replicated_sq = sq if replicated_sq is None else replicated_sq + sq
    device = current().device
    sharded_sq = torch.zeros((), device=device) if sharded_sq is None else sharded_sq
    replicated_sq = torch.zeros((), device=device) if replicated_sq is None else replicated_sq
    if dist.is_initialized() and fs_init.get_model_parallel_world_size() > 1:
        dist.all_reduce(sharded_sq, group=mp_group())
    return (sharded_sq + replicated_sq).sqrt()


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when it is true on any: how ranks agree to stop or save."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or current().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class AnotherRankFailed(UserError):
    """This rank was fine and stops because another failed: that rank's error is the one to read."""


T = TypeVar("T")


def on_every_rank(action: Callable[[], T], what: str, device: Optional[torch.device] = None) -> T:
    """`action` on every rank with one outcome. A rank that failed alone would leave the others
    in their next collective (under NCCL, until its timeout); here every rank stops, the failed
    ones with their own error and the others with AnotherRankFailed."""
    result, failure = None, None
    try:
        result = action()
    except Exception as err:  # whatever it is: raised here alone, it would leave the others waiting
        failure = err
    if any_rank(failure is not None, device):
        raise failure or AnotherRankFailed(f"another rank could not {what}; its error says why")
    return result
