"""Disk space and training: a run refused up front when its disk cannot hold a checkpoint
(and warned when it cannot hold what it keeps), and a save that runs out of space midway
told to every rank in one line, giving its space back."""

import os
import re

import pytest

from llama_dist import distributed
from llama_dist.config import load_config
from llama_dist.errors import UserError
from llama_dist.train import rank_error, train
from multiproc import run_ranks
from conftest import copy_run
from test_train import tiny_config


def test_a_full_disk_during_a_save_is_one_line_and_gives_the_space_back(data_dir, tmp_path, monkeypatch):
    import errno

    from llama_dist.run_checks import resume_point
    from llama_dist.train import Trainer

    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=4")
    trainer = Trainer(cfg, distributed.init_distributed(1, "gloo", "cpu"))
    trainer.step = 2
    trainer.save()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # every tensor file's writes
    trainer.step = 4
    with pytest.raises(UserError, match=r"^no space left to save .*step-000004 \(No space left on device\); "
                                        r"its files are removed and step-000002 stays the one a rerun resumes "
                                        r"from\. Free space there"):
        trainer.save()
    assert not (tmp_path / "run" / "checkpoints" / "step-000004").exists()  # nothing half-written kept
    monkeypatch.undo()
    assert resume_point(cfg, 1).name == "step-000002"


def _save_with_a_full_disk_on_rank_1(data_dir, run):
    import errno

    from llama_dist.train import Trainer

    trainer = Trainer(tiny_config(data_dir, run, "parallel.mp=2", "train.steps=4"),
                      distributed.init_distributed(2, "gloo", "cpu"))
    trainer.step = 2
    trainer.save()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if distributed.current().rank == 1:
        os.pwrite = full  # this spawned rank's own process
    trainer.step = 4
    try:
        trainer.save()
    except UserError as err:
        return str(err)
    return None


def test_a_full_disk_on_one_rank_stops_every_rank_and_removes_the_whole_step(data_dir, tmp_path):
    run = tmp_path / "run"
    messages = run_ranks(_save_with_a_full_disk_on_rank_1, 2, data_dir, run)
    assert messages[0] == messages[1] and messages[0] is not None  # rank 0 wrote fine, and stops too
    assert re.search(r"step-000004 \(No space left on device\); its files are removed and step-000002 stays",
                     messages[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # rank 0's shard went too


def test_a_rank_error_marker_that_finds_no_space_leaves_the_error_to_raise(tmp_path, monkeypatch):
    import errno

    from llama_dist import run_markers

    def full(path, text):
        path.with_name(path.name + ".tmp").write_text("")  # begun, as atomic_write_text begins
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_markers, "atomic_write_text", full)
    run_markers.leave_rank_error(tmp_path, 1, 2, UserError("the rank's own error"))  # no OSError out of it
    assert list(tmp_path.iterdir()) == []


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(data_dir, committed_run, tmp_path,
                                                                          monkeypatch):
    """The run would train until its first save and lose that work; the launcher and the rank refuse it."""
    from llama_dist import files, run_checks
    from llama_dist.train import preflight

    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=2", "checkpoint.interval=2")
    # the estimate is a real checkpoint's size: the weights, AdamW's moments and the tokenizer copy
    saved = sum(p.stat().st_size for p in (committed_run / "checkpoints" / "step-000002").iterdir())
    size = run_checks.checkpoint_bytes(cfg)
    assert 0.97 * saved < size <= saved

    monkeypatch.setattr(files, "free_bytes", lambda path: size - 1)
    message = (rf"^the disk holding {re.escape(str(tmp_path / 'run'))} has {(size - 1) / 1e6:.1f} MB free and "
               rf"one checkpoint of this model \(fp32 weights and AdamW state\) takes {size / 1e6:.1f} MB; the "
               rf"first save would fail: free space there or set train.run_dir to a larger disk$")
    with pytest.raises(UserError, match=message):
        preflight(cfg, world_size=1)
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run dir was made

    # room for two: a fresh run that saves often and keeps 3 holds 4 while it saves, and is warned
    monkeypatch.setattr(files, "free_bytes", lambda path: 2 * size)
    often = ["train.steps=10", "checkpoint.interval=2"]
    warning = run_checks.check_disk_space(tiny_config(data_dir, tmp_path / "run", *often, "checkpoint.keep_last=3"))
    assert "has room for 2 more checkpoint(s)" in warning and "this run needs 4 (checkpoint.keep_last=3" in warning
    warning = run_checks.check_disk_space(tiny_config(data_dir, tmp_path / "run", *often, "checkpoint.keep_last=1",
                                                      "checkpoint.keep_every=4"))  # 4 and 8 stay, beside 2
    assert "this run needs 4 (checkpoint.keep_last=1, one more while a save runs, checkpoint.keep_every=4 keeps 2)" \
        in warning
    assert run_checks.check_disk_space(tiny_config(data_dir, tmp_path / "run", *often, "checkpoint.keep_last=1")) is None
    # one that saves only at its end needs room for one
    assert run_checks.check_disk_space(tiny_config(data_dir, tmp_path / "run", "checkpoint.keep_last=3")) is None
    # a resumed run already holds its step 2: keeping 2 needs one more and one while saving
    assert run_checks.check_disk_space(tiny_config(data_dir, committed_run, *often, "checkpoint.keep_last=2")) is None
    assert "this run needs 3" in run_checks.check_disk_space(tiny_config(data_dir, committed_run, *often,
                                                                         "checkpoint.keep_last=3"))
    # a run that is already done saves nothing: no room needed
    monkeypatch.setattr(files, "free_bytes", lambda path: 0)
    assert run_checks.check_disk_space(tiny_config(data_dir, committed_run, "train.steps=2")) is None


def test_save_steps_counts_interval_saves_the_final_one_and_those_kept_for_good():
    from llama_dist.run_checks import save_steps

    def saves(steps, interval, start, keep_every=0):
        return save_steps(load_config("tiny", [f"train.steps={steps}", f"checkpoint.interval={interval}",
                                               f"checkpoint.keep_every={keep_every}"]), start)

    assert saves(10, 2, 0) == (5, 0)  # 2, 4, 6, 8, 10 (the last is the final one)
    assert saves(11, 2, 0) == (6, 0)  # 2, ..., 10, and 11 at the end
    assert saves(10, 2, 4) == (3, 0) and saves(10, 3, 4) == (3, 0)  # 6, 8, 10; 6, 9, 10
    assert saves(10, 0, 0) == (1, 0) and saves(10, 0, 10) == (0, 0) and saves(10, 20, 0) == (1, 0)
    assert saves(10, 2, 0, keep_every=4) == (5, 2)  # 4 and 8 stay
    assert saves(11, 2, 0, keep_every=11) == (6, 1)  # the final save, at 11
    assert saves(12, 0, 0, keep_every=5) == (1, 0) and saves(10, 3, 2, keep_every=5) == (4, 1)  # 3, 6, 9, 10


def _train_with_a_disk_check_failing_on_rank_1(data_dir, run, fault):
    from llama_dist import files

    def fail(path):
        if fault == "no room":
            return 0
        raise {"unreadable": PermissionError(13, "Permission denied"), "a bug": RuntimeError("boom")}[fault]

    if int(os.environ["RANK"]) == 1:
        files.free_bytes = fail  # this spawned rank's own process
    try:
        train(tiny_config(data_dir, run, "train.steps=2"))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("fault, message", [
    ("no room", "UserError: the disk holding {run} has 0.0 MB free"),
    ("unreadable", "UserError: cannot read how much space the disk holding {run} has (Permission denied)"),
    ("a bug", "RuntimeError: boom"),
])
def test_a_disk_check_that_fails_on_one_rank_stops_every_rank(data_dir, tmp_path, fault, message):
    run = tmp_path / "run"
    messages = run_ranks(_train_with_a_disk_check_failing_on_rank_1, 2, data_dir, run, fault)
    assert messages[1].startswith(message.format(run=run))
    # rank 0 saw room, and stops too rather than wait for rank 1 in the first collective
    assert messages[0] == (f"AnotherRankFailed: another rank could not confirm room for one checkpoint on the disk "
                           f"holding {run}; its error says why")
    assert not (run / "checkpoints").exists()
    # --nproc and the sbatch report the failed rank's line, not rank 0's pointer to it
    assert sorted(p.name for p in run.glob("ERROR.*")) == ([] if fault == "a bug" else ["ERROR.1"])
    if fault != "a bug":
        assert rank_error(run) == messages[1].removeprefix("UserError: ")


def test_an_unfinished_save_counts_as_room(data_dir, committed_run, tmp_path, monkeypatch):
    """A save killed midway left step 4 half-written: the next save removes it, so its bytes are room."""
    from llama_dist import files, run_checks

    run = copy_run(committed_run, tmp_path)
    leftover = run / "checkpoints" / "step-000004"
    leftover.mkdir()
    (leftover / "consolidated.00.pth.tmp").write_bytes(b"\0" * 1_000_000)
    cfg = tiny_config(data_dir, run, "train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=1")
    size = run_checks.checkpoint_bytes(cfg)
    monkeypatch.setattr(files, "free_bytes", lambda path: size - 500_000)
    assert run_checks.check_disk_space(cfg) is None
    monkeypatch.setattr(files, "free_bytes", lambda path: size - 1_000_001)
    with pytest.raises(UserError, match=r"free \(counting 1\.0 MB of unfinished saves, removed as it saves\) and one"):
        run_checks.check_disk_space(cfg)
