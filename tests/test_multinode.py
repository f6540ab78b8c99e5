"""Several nodes through torchrun's c10d rendezvous, as slurm/train.sbatch starts them:
one torchrun agent per "node", here two on this machine. Nothing in training may assume
one node: two nodes must train exactly as one node with the same ranks, and a SIGTERM
that reaches one node only must still stop every rank at one step, with one checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama_dist.checkpoint import committed_checkpoints
from llama_dist.distributed import free_port
from llama_dist.train import PREEMPTED_MARKER
from multiproc import kill_tree
from test_train import TINY


def _train_args(data_dir, run_dir, *extra):
    return ["tiny", *TINY, f"data.dir={data_dir}", f"train.run_dir={run_dir}", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60")


class Nodes:
    """`nodes` torchrun agents joining one rendezvous on loopback, each with `nproc` ranks."""

    def __init__(self, tmp_path: Path, nodes: int, nproc: int, train_args: list[str]):
        port = free_port()
        self.logs = [tmp_path / f"node{n}-{port}.log" for n in range(nodes)]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                   f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   f"--rdzv-id=test-{port}"]
        self.agents = []
        for node, log in enumerate(self.logs):
            # node 0 hosts the rendezvous store: were the port taken meanwhile, it fails at once
            # instead of every agent joining someone else's store as a client
            host = f"--rdzv-conf=is_host={int(node == 0)}"
            with open(log, "w") as out:
                self.agents.append(subprocess.Popen([*command, host, "-m", "llama_dist.train", *train_args],
                                                    stdout=out, stderr=subprocess.STDOUT, env=_env()))

    def output(self, node: int) -> str:
        return self.logs[node].read_text()

    def wait_for(self, text: str, timeout: float = 120) -> int:
        """The node whose output shows `text` (rank 0 logs on one node only)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in range(len(self.logs)):
                if text in self.output(node):
                    return node
            if all(agent.poll() is not None for agent in self.agents):
                break
            time.sleep(0.2)
        raise AssertionError(f"no node printed {text!r}:\n" + self.outputs())

    def wait(self, timeout: float = 180) -> list[int]:
        return [agent.wait(timeout=timeout) for agent in self.agents]

    def outputs(self) -> str:
        return "\n".join(f"--- node {n}\n{self.output(n)}" for n in range(len(self.logs)))

    def kill(self) -> None:
        """On a failed test: no agent or rank left running."""
        for agent in self.agents:
            kill_tree(agent)


def _losses(output: str) -> list[str]:
    return [line.split("|")[1].strip() for line in output.splitlines() if line.startswith("step ")]


def test_two_nodes_train_exactly_as_one_node(data_dir, tmp_path):
    """2 nodes x 2 ranks at mp=2 (model parallel inside a node, data parallel across nodes)."""
    extra = ["parallel.mp=2", "train.steps=4", "checkpoint.interval=2"]
    nodes = Nodes(tmp_path, 2, 2, _train_args(data_dir, tmp_path / "two", *extra))
    try:
        codes = nodes.wait()
    finally:
        nodes.kill()
    assert codes == [0, 0], nodes.outputs()
    one = subprocess.Popen([sys.executable, "-m", "llama_dist.train",
                            *_train_args(data_dir, tmp_path / "one", *extra), "--nproc", "4"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        out, err = one.communicate(timeout=180)
    finally:
        kill_tree(one)
    assert one.returncode == 0, out + err
    logged = [_losses(nodes.output(n)) for n in range(2)]
    assert sorted(map(len, logged)) == [0, 4]  # rank 0, and so the log, is on one node only
    assert max(logged, key=len) == _losses(out)
    for run in ("two", "one"):
        assert [step for step, _ in committed_checkpoints(tmp_path / run)] == [2, 4]
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        two = torch.load(tmp_path / "two/checkpoints/step-000004" / shard, weights_only=True)
        ref = torch.load(tmp_path / "one/checkpoints/step-000004" / shard, weights_only=True)
        assert two.keys() == ref.keys()
        for key in ref:
            assert torch.equal(two[key], ref[key]), (shard, key)


def test_sigterm_on_one_node_stops_every_rank_at_one_step(data_dir, tmp_path):
    """A preemption notice that reaches one node only (its torchrun, which passes SIGTERM on
    to its ranks) still ends in one checkpoint of every shard, and both nodes resume from it.
    Here mp=2 spans the two nodes, so either node alone holds half of every layer."""
    run = tmp_path / "run"
    nodes = Nodes(tmp_path, 2, 1, _train_args(data_dir, run, "parallel.mp=2", "train.steps=100000"))
    try:
        logging_node = nodes.wait_for("step 3/")
        os.kill(nodes.agents[1 - logging_node].pid, signal.SIGTERM)  # the node without rank 0
        codes = nodes.wait()
    finally:
        nodes.kill()
    # torchrun reports a worker's 75 as 1 on every node; the marker is what a batch script reads
    assert all(code != 0 for code in codes), nodes.outputs()
    saved = json.loads((run / PREEMPTED_MARKER).read_text())["step"]
    assert saved >= 3 and [step for step, _ in committed_checkpoints(run)] == [saved], nodes.outputs()
    ckpt = committed_checkpoints(run)[0][1]
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert "received SIGTERM" in nodes.output(1 - logging_node)
    assert "received a stop signal on another rank" in nodes.output(logging_node)

    resumed = Nodes(tmp_path, 2, 1, _train_args(data_dir, run, "parallel.mp=2", f"train.steps={saved + 2}"))
    try:
        codes = resumed.wait()
    finally:
        resumed.kill()
    assert codes == [0, 0], resumed.outputs()
    out = resumed.outputs()
    assert f"at step {saved}" in out and f"step {saved + 1}/" in out and f"step {saved + 2}/" in out
    assert not (run / PREEMPTED_MARKER).exists()
