"""slurm/train.sbatch on a real one-node SLURM cluster, in its CPU mode.

The job trains the tiny model on 2 gloo processes at mp=2; once it has saved a
checkpoint the test preempts it the way SLURM does before a time limit (USR1 to
the batch shell) and checks that it saved a checkpoint where it stopped,
requeued itself, resumed at exactly that step and ran to the end. Skipped, with
the reason, where SLURM cannot be installed (not root, no apt-get, no network);
`.ci/install-slurm.sh` installs it in CI.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import pytest

from slurm_cluster import Cluster, ClusterError, free_port, install, wait_until

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "slurm" / "train.sbatch"
STEPS = 40
INTERVAL = 5
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (ClusterError, OSError, TimeoutError) as err:
        cluster.stop()
        pytest.fail(f"SLURM is installed but the test cluster did not start: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tokenizer and shards made from a 1 MB prefix of the bundled corpus."""
    from llama_dist.cli import main

    data = tmp_path_factory.mktemp("data")
    assert main(["tokenizer", "--input", "stdlib", "--vocab-size", "4096", "--out", str(data),
                 "--max-bytes", "1M"]) == 0
    assert main(["prepare", "--input", "stdlib", "--tokenizer", str(data / "tokenizer.model"),
                 "--out", str(data), "--max-bytes", "1M", "--workers", "1"]) == 0
    return data


def read_marker(path: Path) -> Optional[int]:
    """The step in RUN/PREEMPTED, once it is there and whole."""
    try:
        return json.loads(path.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def test_log_folder_of_the_script_exists():
    """sbatch does not create the --output folder: the script's must come with the repository."""
    match = re.search(r"^#SBATCH --output=(\S+)$", SBATCH.read_text(), re.M)
    assert match, "train.sbatch has no #SBATCH --output line"
    assert (REPO / match.group(1)).parent.is_dir()


def test_exit_codes_are_the_trainers():
    """The script decides from these codes; they must be the ones llama_dist.train exits with."""
    from llama_dist.train import EXIT_DIVERGED, EXIT_PREEMPTED

    text = SBATCH.read_text()
    assert re.search(rf"^EXIT_PREEMPTED={EXIT_PREEMPTED}\b", text, re.M)
    assert re.search(rf"^EXIT_DIVERGED={EXIT_DIVERGED}\b", text, re.M)


def test_preempted_job_requeues_and_resumes(cluster: Cluster, corpus: Path, tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    overrides = [f"train.run_dir={run_dir}", f"data.dir={corpus}", f"train.steps={STEPS}",
                 f"checkpoint.interval={INTERVAL}", "checkpoint.keep_last=20", "parallel.mp=2",
                 "log.interval=1", "log.tensorboard=false", "train.eval_interval=0",
                 "data.seq_len=64", "data.micro_batch_size=4"]
    job = cluster.sbatch([f"--output={log}", str(SBATCH), str(REPO / "configs" / "tiny.yaml"), *overrides],
                         cwd=tmp_path, env={"LLAMA_DIST_DEVICE": "cpu", "NPROC_PER_NODE": "2",
                                            "PYTHON": sys.executable,
                                            # a free port, not 29500 + job id: other tests may hold that one
                                            "RDZV_PORT": str(free_port())})

    def explain() -> str:
        text = log.read_text(errors="replace") if log.exists() else "(no job log)"
        return f"job {job}: {cluster.job(job)}\n--- {log}\n{text[-6000:]}\n{cluster.logs()}"

    def state() -> str:
        return cluster.job(job).get("JobState", "GONE")

    def committed(step: int) -> bool:
        return (run_dir / "checkpoints" / f"step-{step:06d}" / "COMMITTED").is_file()

    def watch(check, timeout: float, what: str):
        """wait_until, failing at once with the logs if the job ends first."""
        def probe():
            value = check()
            if not value and state() in ENDED:
                value = check()  # it may have come true just before the job ended
                if not value:
                    pytest.fail(f"job ended ({state()}) while waiting for {what}\n{explain()}")
            return value
        try:
            return wait_until(probe, timeout, what, interval=0.2)
        except TimeoutError as err:
            pytest.fail(f"{err}\n{explain()}")

    # 1. it trains past its first checkpoint
    watch(lambda: committed(INTERVAL), 180, f"the checkpoint at step {INTERVAL}")
    # 2. preempted on demand, as SLURM would before a time limit
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    marker = run_dir / "PREEMPTED"
    preempted_at = watch(lambda: read_marker(marker), 60, "the trainer's PREEMPTED marker")
    assert preempted_at >= INTERVAL
    assert committed(preempted_at), f"no complete checkpoint at the preemption step {preempted_at}"
    assert preempted_at < STEPS, "preempted at the last step, nothing left to resume: raise STEPS"
    # 3. it requeued itself and runs again to the end
    watch(lambda: cluster.job(job).get("Restarts") == "1", 60, "the job to be requeued")
    watch(lambda: state() == "COMPLETED" or None, 240, "the requeued job to complete")
    fields = cluster.job(job)
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0", explain()

    text = log.read_text(errors="replace")
    assert re.search(rf"job {job} restart 0: 1 node\(s\) x 2 cpu process", text), explain()
    assert re.search(rf"job {job} restart 1: 1 node\(s\) x 2 cpu process", text), explain()
    assert "SIGUSR1: asking every rank to checkpoint and stop" in text
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", text)
    assert len(resumed) == 1, explain()
    assert Path(resumed[0][0]).name == f"step-{preempted_at:06d}" and int(resumed[0][1]) == preempted_at
    # the first run stopped at the step it saved; the second starts right after it: no step is
    # trained twice or skipped
    before, after = text.split("resumed from")
    steps_before = [int(s) for s in re.findall(rf"step (\d+)/{STEPS} \|", before)]
    steps_after = [int(s) for s in re.findall(rf"step (\d+)/{STEPS} \|", after)]
    assert steps_before == list(range(1, preempted_at + 1)), steps_before
    assert steps_after == list(range(preempted_at + 1, STEPS + 1)), steps_after
    assert committed(STEPS) and not marker.exists()


def test_a_gpu_job_on_a_node_without_gpus_stops_with_the_reason(cluster: Cluster, corpus: Path, tmp_path: Path):
    """Submitted without LLAMA_DIST_DEVICE=cpu on a node with no GPU (forgotten --gpus-per-node,
    a CPU partition), the job must not train on CPU at a thousandth of the speed: every rank
    refuses, and the job's last line says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a node without CUDA")
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch([f"--output={log}", str(SBATCH), str(REPO / "configs" / "tiny.yaml"),
                          f"train.run_dir={run_dir}", f"data.dir={corpus}", "train.steps=2", "log.tensorboard=false",
                          "train.eval_interval=0"],
                         cwd=tmp_path, env={"NPROC_PER_NODE": "2", "PYTHON": sys.executable,
                                            "RDZV_PORT": str(free_port())})
    wait_until(lambda: cluster.job(job).get("JobState", "GONE") in ENDED, 180, "the job to end", interval=0.2)
    text = log.read_text(errors="replace")
    assert cluster.job(job)["ExitCode"] == "2:0", f"{cluster.job(job)}\n{text[-4000:]}"
    last = text.strip().splitlines()[-1]
    assert "error: train.device=cuda but no CUDA device is visible" in last, text[-4000:]
    assert not (run_dir / "checkpoints").exists()


def test_a_config_the_ranks_would_refuse_ends_the_job_before_they_start(cluster: Cluster, corpus: Path,
                                                                        tmp_path: Path):
    """Checked once, on the batch node, in one line, with the config error's exit code."""
    log = tmp_path / "job.out"
    job = cluster.sbatch([f"--output={log}", str(SBATCH), str(REPO / "configs" / "tiny.yaml"),
                          f"train.run_dir={tmp_path / 'run'}", f"data.dir={corpus}", "parallel.mp=3"],
                         cwd=tmp_path, env={"LLAMA_DIST_DEVICE": "cpu", "NPROC_PER_NODE": "2",
                                            "PYTHON": sys.executable, "RDZV_PORT": str(free_port())})
    wait_until(lambda: cluster.job(job).get("JobState", "GONE") in ENDED, 120, "the job to end", interval=0.2)
    text = log.read_text(errors="replace")
    assert cluster.job(job)["ExitCode"] == "2:0", f"{cluster.job(job)}\n{text}"
    assert text.strip().splitlines()[-1].startswith("train.sbatch: error: "), text
    assert "parallel.mp=3" in text and "Traceback" not in text and "srun" not in text
