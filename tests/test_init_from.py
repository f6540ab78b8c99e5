"""checkpoint.init_from: a run that starts from another checkpoint's weights (ours, or a Meta
release with vocab_size -1 and bf16 shards) at step 0 with a fresh optimizer, at its own mp."""

import json
import re
import shutil

import pytest
import torch

from llama_dist import distributed
from llama_dist.checkpoint import latest_checkpoint
from llama_dist.errors import UserError
from llama_dist.meta_format import load_shard
from llama_dist.train import Trainer, preflight, train
from multiproc import run_ranks
from test_train import tiny_config


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
    """A committed step-2 checkpoint of another run, at mp=1."""
    run = tmp_path_factory.mktemp("source") / "run"
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=2")) == 0
    return latest_checkpoint(run)


def _started(data_dir, run, init_from, *overrides):
    cfg = tiny_config(data_dir, run, f"checkpoint.init_from={init_from}", *overrides)
    trainer = Trainer(cfg, distributed.init_distributed(cfg.parallel.mp, "gloo", "cpu"))
    trainer.resume()
    return trainer


def _same_weights(model, shard_path) -> bool:
    saved = load_shard(shard_path)
    saved.pop("rope.freqs", None)
    mine = model.state_dict()
    return saved.keys() <= mine.keys() and all(torch.equal(mine[k], saved[k].to(mine[k].dtype)) for k in saved)


def test_a_run_starts_from_the_weights_at_step_0_with_a_fresh_optimizer(data_dir, source, tmp_path):
    trainer = _started(data_dir, tmp_path / "run", source, "train.steps=3", "checkpoint.interval=1")
    assert _same_weights(trainer.model, source / "consolidated.00.pth")
    assert trainer.step == 0 and trainer.tokens_seen == 0 and not trainer.optimizer.state
    assert trainer.run() == 0
    assert latest_checkpoint(tmp_path / "run").name == "step-000003"
    # the run's own checkpoints win from now on: a restart resumes, it does not start over
    again = _started(data_dir, tmp_path / "run", source, "train.steps=4")
    assert again.step == 3 and _same_weights(again.model, tmp_path / "run/checkpoints/step-000003/consolidated.00.pth")


def test_a_meta_release_s_bf16_shards_and_vocab_size_minus_1_load(data_dir, source, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    torch.save({k: v.bfloat16() for k, v in load_shard(source / "consolidated.00.pth").items()},
               release / "consolidated.00.pth")
    params = json.loads((source / "params.json").read_text())
    (release / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    trainer = _started(data_dir, tmp_path / "run", release)
    assert _same_weights(trainer.model, release / "consolidated.00.pth")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # trained in full precision


@pytest.mark.parametrize("overrides, message", [
    (["parallel.mp=2"], r"has MP=1 shards but this run has parallel.mp=2; run `llama-dist reshard \S+ NEW_DIR --mp 2`"),
    (["model.n_layers=3"], r"has n_layers=2 in params.json but the config has model.n_layers=3"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_rank_starts(data_dir, source, tmp_path,
                                                                         overrides, message):
    cfg = tiny_config(data_dir, tmp_path / "run", f"checkpoint.init_from={source}", *overrides)
    with pytest.raises(UserError, match=r"^checkpoint.init_from=\S+ " + message) as err:
        preflight(cfg, world_size=2)
    assert "\n" not in str(err.value)


def test_a_path_that_is_not_a_checkpoint_is_one_line(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", f"checkpoint.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match=r"checkpoint.init_from=\S+nowhere is not a directory"):
        preflight(cfg, world_size=1)


def test_a_corrupt_shard_of_ours_is_caught_by_its_manifest(data_dir, source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    data = bytearray((copy / "consolidated.00.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "consolidated.00.pth").write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape("consolidated.00.pth does not match its sha256")):
        _started(data_dir, tmp_path / "run", copy)


def _start_at_mp2(data_dir, run, init_from):
    trainer = _started(data_dir, run, init_from, "parallel.mp=2")
    return trainer.info.mp_rank, _same_weights(trainer.model, init_from / f"consolidated.{trainer.info.mp_rank:02d}.pth")


def test_each_model_parallel_rank_takes_its_own_shard(data_dir, source, tmp_path):
    from llama_dist.reshard import reshard

    reshard(source, tmp_path / "mp2", 2)
    results = run_ranks(_start_at_mp2, 2, data_dir, tmp_path / "run", tmp_path / "mp2")
    assert sorted(results) == [(0, True), (1, True)]
