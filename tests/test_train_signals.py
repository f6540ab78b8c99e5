"""Real processes, real signals: preemption saves and exits 75; a rank killed while a
checkpoint is being written leaves the previous checkpoint as the one resumed from."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from llama_dist.checkpoint import committed_checkpoints, is_committed
from llama_dist.train import DIVERGED_MARKER, EXIT_DIVERGED, EXIT_PREEMPTED, PREEMPTED_MARKER
from multiproc import children, describe_tree, kill_tree
from test_train import TINY


def _command(data_dir, run_dir, *extra, nproc=1):
    return [sys.executable, "-m", "llama_dist.train", "tiny", *TINY, f"data.dir={data_dir}",
            f"train.run_dir={run_dir}", *extra, "--nproc", str(nproc)]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _run_until_step(cmd, step, timeout=120, **popen):
    """Start training and return the process once it has logged `step N/`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), **popen)
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"step {step}/" in line:
            return proc, lines
        if time.monotonic() > deadline:
            break
    kill_tree(proc)  # torchrun and its ranks too: they run in sessions of their own
    raise AssertionError("training never reached step %d:\n%s" % (step, "".join(lines)))


def _finish(proc, lines, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as timed_out:  # say where it stood, not a truncated repr
        processes = describe_tree(proc.pid)
        kill_tree(proc)
        out = timed_out.output or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise AssertionError(f"still running after {timeout} s:\n{processes}\nits output ends:\n"
                             + ("".join(lines) + out)[-4000:]) from None
    return "".join(lines) + out


def test_sigterm_saves_and_exits_with_the_preempted_code(data_dir, tmp_path):
    run = tmp_path / "run"
    proc, lines = _run_until_step(_command(data_dir, run, "train.steps=100000"), 3)
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc, lines)
    assert proc.returncode == EXIT_PREEMPTED, output
    saved = json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    assert [step for step, _ in committed_checkpoints(run)] == [saved]
    assert saved >= 3 and "received SIGTERM" in output
    # the next start resumes exactly there and clears the marker
    resumed = subprocess.run(_command(data_dir, run, f"train.steps={saved + 2}"),
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {saved}" in resumed.stdout and f"step {saved + 1}/" in resumed.stdout
    assert not (run / PREEMPTED_MARKER).exists()


def test_ctrl_c_in_a_single_process_saves_too(data_dir, tmp_path):
    """Without --nproc there is no launcher to turn Ctrl-C into SIGTERM: the trainer itself
    takes it as SIGTERM, rather than dying of KeyboardInterrupt with its steps unsaved."""
    run = tmp_path / "run"
    proc, lines = _run_until_step(_command(data_dir, run, "train.steps=100000"), 3, start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does, to its foreground job
    output = _finish(proc, lines)
    assert proc.returncode == EXIT_PREEMPTED, output
    saved = json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    assert [step for step, _ in committed_checkpoints(run)] == [saved]
    assert saved >= 3 and "Ctrl-C: saving a checkpoint" in output and "received SIGINT" in output


def test_ctrl_c_under_launch_train_sh_saves_too(data_dir, tmp_path):
    """There torchrun is the terminal's job and hands its ranks the SIGINT itself."""
    from pathlib import Path

    from test_train import TINY

    run = tmp_path / "run"
    script = Path(__file__).resolve().parent.parent / "launch" / "train.sh"
    cmd = [str(script), "tiny", *TINY, f"data.dir={data_dir}", f"train.run_dir={run}", "train.steps=100000",
           "parallel.mp=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(NPROC="2"), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2/" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    output = _finish(proc, lines)
    saved = json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    assert committed_checkpoints(run)[-1][1].name == f"step-{saved:06d}", output
    assert sorted(p.name for p in committed_checkpoints(run)[-1][1].glob("*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]


def test_sigusr1_to_the_launcher_reaches_both_torchrun_ranks(data_dir, tmp_path):
    run = tmp_path / "run"
    proc, lines = _run_until_step(_command(data_dir, run, "train.steps=100000", "parallel.mp=2", nproc=2), 2)
    # SLURM's signal: the launcher turns it into the SIGTERM that torchrun passes to its ranks
    proc.send_signal(signal.SIGUSR1)
    output = _finish(proc, lines)
    assert proc.returncode == EXIT_PREEMPTED, output
    saved = json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    ckpt = committed_checkpoints(run)[-1][1]
    assert ckpt.name == f"step-{saved:06d}"
    assert output.strip().splitlines()[-1] == (f"llama-dist train: stopped by a signal after saving step {saved}; "
                                               f"the same command resumes there")
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert "Traceback" not in output and "torchrun: stopped its ranks on SIGTERM" in output  # not torchrun's 30 lines


def test_ctrl_c_in_a_terminal_saves_and_exits_with_the_preempted_code(data_dir, tmp_path):
    """Ctrl-C sends SIGINT to the terminal's whole foreground process group. Were torchrun in
    it, it would hand its ranks a SIGINT, which stops them without a save (and exits 1)."""
    run = tmp_path / "run"
    cmd = _command(data_dir, run, "train.steps=100000", "parallel.mp=2", nproc=2)
    # a process group, as a shell's job, with SIGINT as a terminal's foreground job has it: a
    # pytest started as `cmd &` by a script inherits SIGINT ignored, and the launcher keeps ignored
    # signals ignored, as it must for `nohup`
    proc, lines = _run_until_step(cmd, 2, start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    torchrun = children(proc.pid)
    processes = [proc.pid, *torchrun, *(pid for parent in torchrun for pid in children(parent))]
    try:
        # which signal torchrun would pass on is a race; that it is outside the group is not
        assert len(torchrun) == 1 and os.getpgid(torchrun[0]) != proc.pid
        os.killpg(proc.pid, signal.SIGINT)
        output = _finish(proc, lines)
    finally:  # on a failure, no training left running for 100000 steps
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == EXIT_PREEMPTED, output
    saved = json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    assert committed_checkpoints(run)[-1][1].name == f"step-{saved:06d}"


def test_torchrun_waits_long_enough_for_the_save(monkeypatch):
    """torchrun kills its ranks 30 s after SIGTERM by default; a large model's save takes longer."""
    from llama_dist import launcher

    started = {}

    class Child:
        def __init__(self, command, env, **kwargs):
            started.update(command=command, env=env, **kwargs)

        def wait(self):
            return 0

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.setattr(launcher.subprocess, "Popen", Child)
    assert launcher.relaunch("llama_dist.train", ["tiny"], 2) == 0
    assert started["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(launcher.SHUTDOWN_TIMEOUT_S)
    assert launcher.SHUTDOWN_TIMEOUT_S >= 300 and started["start_new_session"] is True
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")  # the user's own choice stands
    launcher.relaunch("llama_dist.train", ["tiny"], 2)
    assert started["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "45"


def test_the_launcher_passes_on_one_signal_and_leaves_ignored_ones_ignored(monkeypatch):
    """Ctrl-C pressed three times must not make torchrun give up waiting for the save (a second
    SIGTERM does), and `nohup llama-dist train --nproc N` must outlive the closed terminal."""
    from llama_dist import launcher

    sent = []

    class Child:
        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return None

        def send_signal(self, sig):
            sent.append(sig)

        def wait(self):
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGINT, signal.SIGUSR1):
                os.kill(os.getpid(), sig)
            return 0

    monkeypatch.setattr(launcher.subprocess, "Popen", Child)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        assert launcher.relaunch("llama_dist.train", ["tiny"], 2) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert sent == [signal.SIGTERM]


def test_rank_killed_while_saving_leaves_the_previous_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = _command(data_dir, run, "train.steps=6", "checkpoint.interval=2", "parallel.mp=2", nproc=2)
    crashed = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                             env=_env(LLAMA_DIST_FAULT_KILL="save:4:1"))
    assert crashed.returncode != 0
    partial = run / "checkpoints" / "step-000004"
    assert partial.is_dir() and not is_committed(partial)  # rank 1 died mid-save
    assert [step for step, _ in committed_checkpoints(run)] == [2]
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "step-000002 at step 2" in resumed.stdout
    assert [step for step, _ in committed_checkpoints(run)][-1] == 6


def test_divergence_under_torchrun_exits_3_and_says_why(data_dir, tmp_path):
    """torchrun turns any failed worker into 1; the DIVERGED marker gives the launcher code 3 back."""
    run = tmp_path / "run"
    cmd = _command(data_dir, run, "train.steps=8", "checkpoint.interval=2", "train.max_bad_steps=2",
                   "parallel.mp=2", nproc=2)
    diverged = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                              env=_env(LLAMA_DIST_FAULT_NAN="2,3"))  # step indices: steps 3 and 4
    output = diverged.stdout + diverged.stderr
    assert diverged.returncode == EXIT_DIVERGED, output
    assert "stopping: 2 consecutive non-finite steps (train.max_bad_steps=2)" in output
    assert "the latest good checkpoint is" in output and "step-000002" in output
    assert json.loads((run / DIVERGED_MARKER).read_text())["step"] == 4
    assert "Traceback" not in output and re.search(r"torchrun: rank [01] ended with exit code 3 \(its output is above\)",
                                                  output)
    assert [step for step, _ in committed_checkpoints(run)] == [2]
    assert diverged.stderr.strip().splitlines()[-1].startswith("llama-dist train: stopped at step 4 after "
                                                               "train.max_bad_steps non-finite steps")
    # a new start clears the marker
    again = subprocess.run(_command(data_dir, run, "train.steps=3", "parallel.mp=2", nproc=2),
                           capture_output=True, text=True, timeout=180, env=_env())
    assert again.returncode == 0, again.stdout + again.stderr
    assert not (run / DIVERGED_MARKER).exists()


@pytest.mark.parametrize("restarts", [0, 2])
def test_a_mistake_met_inside_the_ranks_ends_in_one_line_and_exit_2(data_dir, tmp_path, restarts):
    """A corrupt shard passes `--nproc`'s checks and is found by the ranks' sha256 check;
    torchrun reports it as 1 with its own traceback, so the last line must say what it was.
    Under --max-restarts torchrun starts the ranks again, which must stop at once, before
    building the model and reading the shard again: a restart cannot mend the file."""
    run = tmp_path / "run"
    first = subprocess.run(_command(data_dir, run, "train.steps=2", "checkpoint.interval=2"),
                           capture_output=True, text=True, env=_env(), timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    shard = committed_checkpoints(run)[-1][1] / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = subprocess.run([*_command(data_dir, run, "train.steps=4", nproc=2), "--max-restarts", str(restarts)],
                            capture_output=True, text=True, env=_env(), timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llama-dist train: error: ") and "sha256" in last and shard.name in last, last
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    said = [line for line in output.splitlines() if "a mistake a restart cannot mend" in line]
    assert len([line for line in said if not line.startswith("[rank")]) == restarts, output  # rank 0's, once a restart


def test_a_rank_that_cannot_start_its_device_leaves_its_error_too(data_dir, tmp_path):
    """On a node that lacks the GPU train.device=cuda asks for, the rank fails before any process
    group exists; the batch script still finds its one line in RUN/ERROR.<rank>."""
    import pytest
    import torch

    from llama_dist.train import rank_error

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "llama_dist.train", "tiny", *TINY, f"data.dir={data_dir}", f"train.run_dir={run}",
                             "train.device=cuda", "parallel.backend=auto"], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode != 0
    # the first rank to fail writes its file before it exits; torchrun then stops the other,
    # which may not have got as far as its own (a race, not a fault)
    assert {p.name for p in run.glob("ERROR.*")} in ({"ERROR.0"}, {"ERROR.1"}, {"ERROR.0", "ERROR.1"}), result.stderr
    assert "train.device=cuda but no CUDA device is visible" in rank_error(run)


def test_a_rank_killed_mid_run_is_restarted_and_the_run_ends_as_an_unbroken_one(data_dir, tmp_path):
    """`--max-restarts`: torchrun starts every rank again after one dies, and the run resumes
    from its latest checkpoint. torch's shared rendezvous store used to make the restarted
    ranks fail to connect; the end must equal, bit for bit, a run that was never broken.
    Rank 1 dies while it writes step 10's checkpoint (in the first attempt only), so the
    restarted run must also pass over that half-written directory and resume from step 5."""
    import torch

    steps, extra = 14, ("checkpoint.interval=5", "parallel.mp=2")
    runs = {}
    for name, fault, restarts in (("broken", "save:10:1", ["--max-restarts", "1"]), ("straight", "", [])):
        runs[name] = tmp_path / name
        proc = subprocess.Popen(_command(data_dir, runs[name], f"train.steps={steps}", *extra, nproc=2) + restarts,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(LLAMA_DIST_FAULT_KILL=fault))
        try:
            output, _ = proc.communicate(timeout=180)
        finally:  # on a failure, no ranks left running (they have sessions of their own)
            kill_tree(proc)
        assert proc.returncode == 0, output
        if name == "broken":
            assert "step-000005 at step 5" in output and "(exitcode: 9)" in output, output
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        got = torch.load(runs["broken"] / f"checkpoints/step-{steps:06d}" / shard, weights_only=True)
        want = torch.load(runs["straight"] / f"checkpoints/step-{steps:06d}" / shard, weights_only=True)
        assert all(torch.equal(got[key], want[key]) for key in want), shard
