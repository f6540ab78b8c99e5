"""How a run stops: stop signals at every point of the loop (a save, an eval step, the
start, the last step), the markers its launcher reads, and ranks that torchrun restarts."""

import json
import os
import signal

import pytest

from llama_dist.checkpoint import latest_checkpoint
from llama_dist.train import train
from test_train import tiny_config


def test_a_stop_signal_on_the_last_step_finishes_the_run(data_dir, tmp_path, monkeypatch):
    """Nothing is left to resume: exit 0 with the final checkpoint, not 75 and a pointless
    requeue; a stop before the last step still saves and exits 75."""
    from llama_dist.train import EXIT_PREEMPTED, PREEMPTED_MARKER, Trainer

    train_step, stop_at = Trainer.train_step, {}

    def stop_during(self, *args):
        loss, norm, skipped, stop_now = train_step(self, *args)
        return loss, norm, skipped, stop_now or self.step + 1 == stop_at["step"]

    monkeypatch.setattr(Trainer, "train_step", stop_during)
    stop_at["step"] = 3
    assert train(tiny_config(data_dir, tmp_path / "last", "train.steps=3")) == 0
    assert latest_checkpoint(tmp_path / "last").name == "step-000003"
    assert not (tmp_path / "last" / PREEMPTED_MARKER).exists()
    stop_at["step"] = 2
    assert train(tiny_config(data_dir, tmp_path / "early", "train.steps=5")) == EXIT_PREEMPTED
    assert latest_checkpoint(tmp_path / "early").name == "step-000002"
    assert (tmp_path / "early" / PREEMPTED_MARKER).exists()


def _record_saves(monkeypatch, then=None) -> list[int]:
    """Patch Trainer.save to note each step it saves (and run `then(trainer)` after the save)."""
    from llama_dist.train import Trainer

    save, saved = Trainer.save, []

    def recording(self):
        saved.append(self.step)
        path = save(self)
        if then is not None:
            then(self)
        return path

    monkeypatch.setattr(Trainer, "save", recording)
    return saved


def test_a_signal_during_an_interval_save_stops_right_after_it(data_dir, tmp_path, monkeypatch):
    """No extra step and second save: the ranks agree on the signal once the save is done."""
    from llama_dist.train import EXIT_PREEMPTED, PREEMPTED_MARKER

    saved = _record_saves(monkeypatch, then=lambda _: os.kill(os.getpid(), signal.SIGUSR1))
    run = tmp_path / "run"
    assert train(tiny_config(data_dir, run, "train.steps=6", "checkpoint.interval=2")) == EXIT_PREEMPTED
    assert saved == [2]
    assert json.loads((run / PREEMPTED_MARKER).read_text()) == {"step": 2}


def test_a_stop_on_an_eval_step_saves_without_validating_first(data_dir, tmp_path, monkeypatch):
    from llama_dist.train import EXIT_PREEMPTED, Trainer

    train_step, validated = Trainer.train_step, []

    def stop_at_step_2(self, *args):
        loss, norm, skipped, stop_now = train_step(self, *args)
        return loss, norm, skipped, stop_now or self.step + 1 == 2

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_2)
    monkeypatch.setattr(Trainer, "validate", lambda self: validated.append(self.step))
    saved = _record_saves(monkeypatch)
    assert train(tiny_config(data_dir, tmp_path / "run", "train.steps=6", "train.eval_interval=2")) == EXIT_PREEMPTED
    assert saved == [2] and validated == []


@pytest.fixture
def sigint_as_in_a_terminal():
    """SIGINT at Python's own handler, whatever this pytest inherited (ignored, under `cmd &`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_or_a_closed_terminal_ask_for_a_save_and_a_second_ctrl_c_stops_at_once(sigint_as_in_a_terminal):
    from llama_dist.run_markers import StopSignal

    with StopSignal() as stop:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C stopped the run without a save")
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous_hup = signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        with StopSignal() as stop:
            signal.raise_signal(signal.SIGHUP)
            signal.raise_signal(signal.SIGTERM)
            assert stop.received == "SIGHUP"  # the first one is the reason given
    finally:
        signal.signal(signal.SIGHUP, previous_hup)


def test_signals_the_process_was_started_ignoring_stay_ignored(sigint_as_in_a_terminal):
    """nohup leaves SIGHUP ignored, and a script's `cmd &` SIGINT: the user asked for no stop."""
    from llama_dist.run_markers import StopSignal

    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignal() as stop:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGHUP)
            assert stop.received is None
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous_hup)


def test_a_signal_while_the_run_starts_is_a_save_at_the_first_step(data_dir, tmp_path, monkeypatch):
    """SIGTERM while the model builds or a checkpoint loads (minutes for a large one) is kept."""
    from llama_dist.train import EXIT_PREEMPTED, PREEMPTED_MARKER, Trainer

    # where the trainer's own handler is missing, this one keeps pytest alive and the run finishes (0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    resume = Trainer.resume

    def resume_under_a_signal(self):
        os.kill(os.getpid(), signal.SIGTERM)
        resume(self)

    monkeypatch.setattr(Trainer, "resume", resume_under_a_signal)
    run = tmp_path / "run"
    try:
        code = train(tiny_config(data_dir, run, "train.steps=4"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == EXIT_PREEMPTED
    assert json.loads((run / PREEMPTED_MARKER).read_text()) == {"step": 1}
    assert latest_checkpoint(run).name == "step-000001"


def test_no_interval_save_during_a_run_of_bad_steps(data_dir, tmp_path, monkeypatch):
    """With keep_last=1 a save at step 4 (after a non-finite step) would delete step 2, the last
    checkpoint taken before the bad run began; the next save comes once a step is good again."""
    monkeypatch.setenv("LLAMA_DIST_FAULT_NAN", "3,4")  # the updates of steps 4 and 5
    saved = _record_saves(monkeypatch)
    cfg = tiny_config(data_dir, tmp_path / "run", "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=1",
                      "train.max_bad_steps=5")
    assert train(cfg) == 0
    assert saved == [2, 6]


@pytest.mark.parametrize("case", ["preempted", "diverged"])
def test_no_rank_leaves_before_rank0_has_written_its_marker(data_dir, tmp_path, monkeypatch, case):
    """On several nodes, srun --kill-on-bad-exit kills every task once one node's ranks are
    gone: ranks that left before the marker was written would cost the batch script its reason."""
    from llama_dist import train as train_module
    from llama_dist.train import DIVERGED_MARKER, EXIT_DIVERGED, EXIT_PREEMPTED, PREEMPTED_MARKER, Trainer

    run = tmp_path / "run"
    marker, code, extra = {
        "preempted": (PREEMPTED_MARKER, EXIT_PREEMPTED, []),
        "diverged": (DIVERGED_MARKER, EXIT_DIVERGED, ["train.max_bad_steps=2"]),
    }[case]
    if case == "diverged":
        monkeypatch.setenv("LLAMA_DIST_FAULT_NAN", "0,1")  # steps 1 and 2
    else:
        train_step = Trainer.train_step

        def stop_at_step_2(self, *args):
            loss, norm, skipped, stop_now = train_step(self, *args)
            return loss, norm, skipped, stop_now or self.step + 1 == 2

        monkeypatch.setattr(Trainer, "train_step", stop_at_step_2)
    seen = []
    barrier = train_module.distributed.barrier

    def recording_barrier():
        seen.append((run / marker).is_file())
        barrier()

    monkeypatch.setattr(train_module.distributed, "barrier", recording_barrier)
    assert train(tiny_config(data_dir, run, "train.steps=6", *extra)) == code
    assert seen[-1] is True and json.loads((run / marker).read_text())["step"] == 2


def test_a_starting_run_keeps_the_errors_other_ranks_just_left(data_dir, tmp_path):
    """A rank on a node whose GPU is missing writes ERROR.<rank> before any process group exists,
    while rank 0 elsewhere goes on starting: rank 0 must not delete it as an old run's marker.
    Its own old one, and an old PREEMPTED, do go."""
    from llama_dist.train import ERROR_MARKER, PREEMPTED_MARKER

    run = tmp_path / "run"
    run.mkdir()
    for name in (f"{ERROR_MARKER}.3", f"{ERROR_MARKER}.0", PREEMPTED_MARKER):
        (run / name).write_text('{"rank": 3, "error": "train.device=cuda but no CUDA device is visible", "step": 1}\n')
    assert train(tiny_config(data_dir, run, "train.steps=1")) == 0
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [f"{ERROR_MARKER}.3"]


@pytest.mark.parametrize("marker, code", [("PREEMPTED", 75), ("DIVERGED", 3)])
def test_ranks_restarted_after_a_deliberate_stop_exit_again(data_dir, tmp_path, monkeypatch, marker, code):
    """A stop signal that reached the ranks but not torchrun (or a divergence) looks to torchrun
    like a failure; under --max-restarts the restarted ranks must not train on, which would
    delete the marker and undo the preemption. In torchrun's first attempt the marker is old."""
    from llama_dist.train import EXIT_DIVERGED, EXIT_PREEMPTED

    assert (EXIT_PREEMPTED, EXIT_DIVERGED) == (75, 3)
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).write_text('{"step": 5}\n')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=1")) == code
    assert (run / marker).is_file() and latest_checkpoint(run) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=1")) == 0
    assert not (run / marker).exists() and latest_checkpoint(run).name == "step-000002"


def test_ranks_restarted_after_a_mistake_exit_2_at_once(data_dir, tmp_path, monkeypatch):
    """torchrun restarts the ranks after one fails with an expected mistake too; they must stop
    before building the model, not meet it again once per restart. An ERROR file of a rank
    beyond this world is an older run's and stops nothing."""
    from llama_dist.train import ERROR_MARKER

    run = tmp_path / "run"
    run.mkdir()
    mistake = run / f"{ERROR_MARKER}.0"
    mistake.write_text('{"rank": 0, "error": "checkpoint step-000002: sha256 of consolidated.00.pth differs"}\n')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=1")) == 2
    assert mistake.is_file() and latest_checkpoint(run) is None
    mistake.rename(run / f"{ERROR_MARKER}.1")  # a rank this world of one does not have
    assert train(tiny_config(data_dir, run, "train.steps=2", "checkpoint.interval=1")) == 0
    assert latest_checkpoint(run).name == "step-000002"
