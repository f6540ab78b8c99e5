"""Spawn N real gloo ranks on a free port and collect what each returns.

Unlike fairscale's own helper (which keeps only world sizes up to the CUDA device
count, so on a CPU it runs nothing and passes), this one always starts exactly
`world_size` processes, re-raises the first failing rank's traceback, and fails
on a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, env: dict, args: tuple, results) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        value = fn(*args)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import fairscale.nn.model_parallel.initialize as fs_init

            if fs_init.model_parallel_is_initialized():
                fs_init.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0,
              env: dict | None = None) -> list[Any]:
    """Run fn(*args) on `world_size` spawned ranks; return each rank's result, by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, dict(env or {}), args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(collected))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s (hang?)")
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # a dying rank may still have a report in flight
                    if results.empty():
                        raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = pickle.loads(payload)
    finally:
        # after a failure or a hang nothing is worth waiting for: stop the other ranks now
        grace = 10 if len(collected) == world_size else 0
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()
    assert sorted(collected) == list(range(world_size)), "not every rank reported"
    return [collected[r] for r in range(world_size)]


# --------------------------------------------------------------------------- cleanup


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process still running and everything under it (torchrun's ranks have sessions of their own)."""
    if proc.poll() is not None:
        return
    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # gone already
        return []


def descendants(pid: int) -> list[int]:
    direct = children(pid)
    return direct + [grandchild for child in direct for grandchild in descendants(child)]


def describe_tree(pid: int) -> str:
    """One line per live process under pid (and pid): its state, the signals it ignores and
    catches (hex masks from /proc) and its command, to say why a signal went nowhere."""
    lines = []
    for each in [pid, *descendants(pid)]:
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{each}/status").read_text().splitlines()
                          if ":\t" in line)
            command = Path(f"/proc/{each}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        lines.append(f"{each} {status.get('State', '?').strip()} ignored {status.get('SigIgn', '?').strip()} "
                     f"caught {status.get('SigCgt', '?').strip()} {command[:160]}")
    return "\n".join(lines) or f"{pid}: gone"
