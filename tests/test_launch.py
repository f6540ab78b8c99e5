"""launch/*.sh: usage lines, process counts, and arguments reaching torchrun unchanged.

A stand-in `torchrun` first on PATH records the argv and environment it was
given, so each check compares what the script ran with what the user typed;
one test runs the real torchrun to show the module entry points work under it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"train.sh": "llama_dist.train", "generate.sh": "llama_dist.generation", "eval.sh": "llama_dist.evaluate"}

FAKE_TORCHRUN = """#!{python}
import json, os, sys
with open(os.environ["FAKE_TORCHRUN_LOG"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"),
               "shutdown": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}}, f)
sys.exit(int(os.environ.get("FAKE_TORCHRUN_EXIT", "0")))
"""


@pytest.fixture
def fake_torchrun(tmp_path: Path):
    """Run a launch script with a recording torchrun; returns (completed process, record or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "torchrun"
    stub.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    stub.chmod(0o755)
    log = tmp_path / "torchrun.json"

    def run(script: str, *args: str, **env: str):
        full_env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "OMP_NUM_THREADS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
        full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_TORCHRUN_LOG=str(log), CUDA_VISIBLE_DEVICES="")
        full_env.update(env)
        log.unlink(missing_ok=True)
        done = subprocess.run([str(REPO / "launch" / script), *args], env=full_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
        return done, (json.loads(log.read_text()) if log.exists() else None)

    return run


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_usage(fake_torchrun, script):
    done, record = fake_torchrun(script)
    assert done.returncode == 2 and record is None
    assert done.stderr.startswith(f"usage: launch/{script} ")
    done, record = fake_torchrun(script, "--help")
    assert done.returncode == 0 and record is None
    assert done.stdout.startswith(f"usage: launch/{script} ")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_arguments_pass_through(fake_torchrun, script):
    args = ["first", "train.steps=5", "--prompt", "two words", "it's \"quoted\"", "*"]
    done, record = fake_torchrun(script, *args, NPROC="3")
    assert done.returncode == 0, done.stderr
    assert record["argv"] == ["--standalone", "--nproc_per_node", "3", "-m", SCRIPTS[script], *args]
    # the cores this process may use, which is what `nproc` counts
    assert record["omp"] == str(max(1, len(os.sched_getaffinity(0)) // 3))


def test_exit_status_is_torchrun_s(fake_torchrun):
    done, _ = fake_torchrun("train.sh", "configs/tiny.yaml", NPROC="2", FAKE_TORCHRUN_EXIT="75")
    assert done.returncode == 75


def test_torchrun_waits_for_a_save_as_long_as_under_llama_dist(fake_torchrun):
    """After Ctrl-C or kill, torchrun gives its ranks 30 s by default before it kills them,
    which a large model's save outlasts; the scripts give what `llama-dist train --nproc` does."""
    from llama_dist.launcher import SHUTDOWN_TIMEOUT_S

    _, record = fake_torchrun("train.sh", "configs/tiny.yaml", NPROC="2")
    assert record["shutdown"] == str(SHUTDOWN_TIMEOUT_S)
    _, record = fake_torchrun("train.sh", "configs/tiny.yaml", NPROC="2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="45")
    assert record["shutdown"] == "45"


def test_bad_nproc(fake_torchrun):
    done, record = fake_torchrun("train.sh", "configs/tiny.yaml", NPROC="two")
    assert done.returncode == 2 and record is None
    assert "NPROC must be a positive whole number, got 'two'" in done.stderr


def test_default_nproc(fake_torchrun, tmp_path):
    # training: one process per visible GPU, else one
    _, record = fake_torchrun("train.sh", "configs/tiny.yaml")
    assert record["argv"][:3] == ["--standalone", "--nproc_per_node", "1"]
    _, record = fake_torchrun("train.sh", "configs/tiny.yaml", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert record["argv"][:3] == ["--standalone", "--nproc_per_node", "4"]
    # generation and evaluation: one process per model-parallel shard of the checkpoint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for i in range(2):
        (ckpt / f"consolidated.{i:02d}.pth").write_bytes(b"")
    for script in ("generate.sh", "eval.sh"):
        _, record = fake_torchrun(script, str(ckpt), "--data", "d")
        assert record["argv"][:3] == ["--standalone", "--nproc_per_node", "2"]
        _, record = fake_torchrun(script, str(ckpt), "--data", "d", NPROC="4")
        assert record["argv"][:3] == ["--standalone", "--nproc_per_node", "4"]


def test_real_torchrun_reaches_the_module(tmp_path):
    """Through the real torchrun, the options reach llama_dist.generation's own parser."""
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run([str(REPO / "launch" / "generate.sh"), str(tmp_path), "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: llama-dist generate" in done.stdout
    assert "--max-gen-len" in done.stdout
