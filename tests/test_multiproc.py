"""The spawn helper itself must be able to fail: a failing rank, a hang, zero ranks."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from multiproc import run_ranks


def _all_reduce_rank() -> float:
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank one is broken")


def _hang_on_rank_zero() -> None:
    if int(os.environ["RANK"]) == 0:
        time.sleep(60)


def test_every_rank_runs_and_reports():
    assert run_ranks(_all_reduce_rank, 3) == [3.0, 3.0, 3.0]


def test_failure_carries_the_rank_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*ValueError: rank one is broken"):
        run_ranks(_fail_on_rank_one, 2)


def test_hang_fails_with_timeout():
    # long enough for rank 1 to start (import torch) and report on a loaded machine: at 5 s, under
    # pytest -n 12 on 16 cores, it had not, and the error named ranks [0, 1]
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2"):
        run_ranks(_hang_on_rank_zero, 2, timeout=15)


def test_zero_ranks_is_an_error():
    with pytest.raises(ValueError):
        run_ranks(_all_reduce_rank, 0)
