"""Which checkpoints a run keeps: the newest keep_last, every keep_every-th, and no leftovers."""

from pathlib import Path

from llama_dist.checkpoint import COMMIT_MARKER, committed_checkpoints, prune_checkpoints, step_dir
from llama_dist.train import train

from test_train import tiny_config


def _fake_checkpoints(run, committed, partial=()):
    for step in committed:
        step_dir(run, step).mkdir(parents=True)
        (step_dir(run, step) / "consolidated.00.pth").write_bytes(b"weights")
        (step_dir(run, step) / COMMIT_MARKER).write_text(f"{step}\n")
    for step in partial:
        step_dir(run, step).mkdir(parents=True)
        (step_dir(run, step) / "consolidated.00.pth").write_bytes(b"half")


def _on_disk(run):
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())


def test_keeps_the_newest_and_every_mth(tmp_path):
    _fake_checkpoints(tmp_path, committed=range(1, 11))
    removed = prune_checkpoints(tmp_path, keep_last=2, keep_every=4)
    assert [step for step, _ in committed_checkpoints(tmp_path)] == [4, 8, 9, 10]
    assert _on_disk(tmp_path) == [4, 8, 9, 10]
    assert sorted(p.name for p in removed) == [f"step-{s:06d}" for s in (1, 2, 3, 5, 6, 7)]


def test_keep_last_zero_still_keeps_the_newest_and_no_keep_every_keeps_none_extra(tmp_path):
    _fake_checkpoints(tmp_path, committed=[2, 4, 6])
    prune_checkpoints(tmp_path, keep_last=0, keep_every=0)
    assert _on_disk(tmp_path) == [6]


def test_leftovers_of_crashed_saves_go_only_once_a_newer_checkpoint_exists(tmp_path):
    # step 3 crashed mid-save; step 7 is being written right now (not committed yet)
    _fake_checkpoints(tmp_path, committed=[2, 4, 6], partial=[3, 7])
    prune_checkpoints(tmp_path, keep_last=5, keep_every=0)
    assert _on_disk(tmp_path) == [2, 4, 6, 7]
    empty = tmp_path / "fresh"
    _fake_checkpoints(empty, committed=[], partial=[1])
    assert prune_checkpoints(empty, keep_last=1, keep_every=0) == []
    assert _on_disk(empty) == [1]


def test_a_checkpoint_linked_into_the_run_loses_the_link_only(tmp_path):
    """A step directory may be a symlink to a checkpoint kept elsewhere; pruning must not
    uncommit or delete what it points at (nor fail on it, which would end the run)."""
    imported = tmp_path / "elsewhere" / "step-000000"
    imported.mkdir(parents=True)
    (imported / COMMIT_MARKER).write_text("0\n")
    run = tmp_path / "run"
    _fake_checkpoints(run, committed=[100, 200])
    step_dir(run, 0).symlink_to(imported, target_is_directory=True)
    assert [step for step, _ in committed_checkpoints(run)] == [0, 100, 200]
    removed = prune_checkpoints(run, keep_last=2, keep_every=0)
    assert [p.name for p in removed] == ["step-000000"] and _on_disk(run) == [100, 200]
    assert sorted(p.name for p in imported.iterdir()) == [COMMIT_MARKER]


def test_a_run_keeps_what_the_config_says(data_dir, tmp_path):
    run = tmp_path / "run"
    # a crashed save at step 3 of an earlier attempt with another interval: this run never saves step 3
    _fake_checkpoints(run, committed=[], partial=[3])
    cfg = tiny_config(data_dir, run, "train.steps=7", "checkpoint.interval=2",
                      "checkpoint.keep_last=2", "checkpoint.keep_every=4")
    assert train(cfg) == 0
    assert [step for step, _ in committed_checkpoints(run)] == [4, 6, 7]
    assert _on_disk(run) == [4, 6, 7]


def test_a_new_checkpoint_s_entry_is_synced_before_older_ones_are_pruned(data_dir, tmp_path, monkeypatch):
    """Else a power cut could keep the prune's deletions and lose the new step's directory entry."""
    from llama_dist import checkpoint

    events = []
    real_prune = checkpoint.prune_checkpoints
    monkeypatch.setattr(checkpoint, "fsync_path", lambda path: events.append(("sync", Path(path))))
    monkeypatch.setattr("llama_dist.train.prune_checkpoints",
                        lambda *args: (events.append(("prune",)), real_prune(*args))[1])
    run = tmp_path / "run"
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=1", "checkpoint.keep_last=1")) == 0
    assert _on_disk(run) == [2]
    first_prune = events.index(("prune",))
    assert ("sync", run / "checkpoints") in events[:first_prune]
