"""The process groups: how long their collectives wait for the slowest rank."""

from datetime import timedelta

import torch
import torch.distributed as dist

from llama_dist import distributed
from multiproc import run_ranks
from test_train import tiny_config


def _group_timeouts(minutes: float) -> dict[str, timedelta]:
    distributed.init_distributed(mp=1, backend="gloo", device="cpu", timeout_minutes=minutes)

    def timeout(group) -> timedelta:
        return group._get_backend(torch.device("cpu")).options._timeout

    return {"world": timeout(dist.group.WORLD), "mp": timeout(distributed.mp_group()),
            "dp": timeout(distributed.dp_group())}


def test_every_group_waits_as_long_as_configured():
    """While one rank per shard writes a checkpoint the others wait, in world, data- and
    model-parallel collectives alike. fairscale makes its groups with torch's default
    (10 minutes under NCCL), so without care only the world group would get ours."""
    for timeouts in run_ranks(_group_timeouts, 2, 7.5):
        assert timeouts == {name: timedelta(minutes=7.5) for name in ("world", "mp", "dp")}


def test_training_passes_the_configured_timeout_on(data_dir, tmp_path, monkeypatch):
    from llama_dist import train as train_module

    seen = []
    init = train_module.distributed.init_distributed

    def recording_init(*args):
        seen.append(args)
        return init(*args)

    monkeypatch.setattr(train_module.distributed, "init_distributed", recording_init)
    assert train_module.train(tiny_config(data_dir, tmp_path / "run", "train.steps=1",
                                          "parallel.timeout_minutes=45")) == 0
    assert seen[0][3] == 45.0


def _ddp_buffer_sync(data_dir, run_dir) -> tuple[bool, list[str]]:
    import warnings

    from llama_dist.train import Trainer

    cfg = tiny_config(data_dir, run_dir)
    info = distributed.init_distributed(1, "gloo", "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, info)
    return trainer.ddp.will_sync_module_buffers(), [str(w.message) for w in caught if "buffers" in str(w.message)]


def test_data_parallel_does_not_broadcast_the_rope_buffer_at_every_forward(data_dir, tmp_path):
    """rope is computed alike on every rank; and no deprecation warning per rank per run."""
    for syncs, warned in run_ranks(_ddp_buffer_sync, 2, data_dir, tmp_path / "run"):
        assert syncs is False and warned == []
