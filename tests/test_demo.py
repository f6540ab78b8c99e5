"""The README's first command, end to end, with fewer steps and a smaller corpus."""

import os
import subprocess
import sys

from llama_dist.checkpoint import latest_checkpoint


def test_demo_runs_end_to_end_and_reuses_its_data(tmp_path):
    cmd = [sys.executable, "-m", "llama_dist.cli", "demo", "--dir", str(tmp_path), "--steps", "20",
           "--max-bytes", "1500000", "--max-gen-len", "8"]
    # the CPU path (2 gloo ranks at mp=2) also on a machine with GPUs, where the demo would use NCCL
    # (and with a single GPU, one process)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    out = first.stdout
    assert first.returncode == 0, out + first.stderr
    for stage in range(1, 6):
        assert f"[{stage}/5]" in out
    assert "world 2 = dp 1 x mp 2" in out and "step 20/20" in out
    ckpt = latest_checkpoint(tmp_path / "runs" / "demo")
    assert ckpt.name == "step-000020"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    single = tmp_path / "runs" / "demo" / "step-000020-mp1"
    assert [p.name for p in single.glob("*.pth")] == ["consolidated.00.pth"]
    assert any((tmp_path / "runs" / "demo" / "tensorboard").iterdir())
    assert "tensorboard --logdir" in out and "llama-dist generate" in out

    # a rerun reuses the tokenizer, the shards and the finished run
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing" in again.stdout and "nothing to do" in again.stdout
    assert "resumed from" in again.stdout and "step 1/" not in again.stdout


def test_a_step_count_below_one_is_refused_before_any_work(tmp_path, capsys):
    import pytest

    from llama_dist.demo import cli

    with pytest.raises(SystemExit) as exited:
        cli(["--dir", str(tmp_path), "--steps", "0"])
    assert exited.value.code == 2 and "--steps must be 1 or more, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no tokenizer trained, no data prepared
