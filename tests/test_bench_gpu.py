"""bench/bench_gpu.py needs a GPU for its figures, which CI never has: this runs it on
CPU with the tiny config so that the script stays runnable for the day a GPU is lent."""

import math
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


def test_gpu_bench_runs_the_trainer_step_on_cpu():
    run = subprocess.run([sys.executable, str(BENCH), "--config", "tiny", "train.device=cpu", "train.compile=false",
                          "data.micro_batch_size=4", "--steps", "3", "--warmup", "1", "--checkpoint"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "world 1 = dp 1 x mp 1 on cpu (gloo, float32)" in out
    tokens_per_step = int(re.search(r"; (\d+) tokens/step \(micro-batch 4 x 128", out).group(1))
    assert tokens_per_step == 4 * 128
    step_ms = float(re.search(r"step time median ([\d.]+) ms over 3 steps", out).group(1))
    tokens_s = float(re.search(r"tokens/s ([\d,]+) ", out).group(1).replace(",", ""))
    assert math.isclose(tokens_s, tokens_per_step / (step_ms / 1e3), rel_tol=0.01)
    mfu = float(re.search(r"MFU ([\d.]+)%", out).group(1))
    assert 0 < mfu < 100
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert abs(first - math.log(4096)) < 0.5 and math.isfinite(last)  # random tokens: about ln(vocab)
    # --checkpoint: 8 files (the shard, its AdamW state, rng, params.json, train_state, config, manifest,
    # marker), and the resumed Trainer's next two steps give the losses the first one's did
    saved = re.search(r"checkpoint: ([\d.]+) GB \((\d+) files\); .*, verified\); the next two steps' losses "
                      r"([\d.]+) ([\d.]+) straight, ([\d.]+) ([\d.]+) resumed: the same", out)
    assert saved, out[-1500:]
    assert int(saved.group(2)) == 8 and float(saved.group(1)) > 0
    assert saved.group(3, 4) == saved.group(5, 6) and saved.group(3) != saved.group(4)


def test_gpu_bench_checkpoint_at_mp2_on_two_ranks():
    """Every rank must write into rank 0's run dir: each making its own left rank 1's files nowhere."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(BENCH), "--config", "tiny", "train.device=cpu", "train.compile=false",
                          "data.micro_batch_size=4", "parallel.mp=2", "--steps", "2", "--warmup", "1",
                          "--checkpoint"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "world 2 = dp 1 x mp 2 on cpu (gloo, float32)" in run.stdout
    # two shards, two AdamW states, two rng files, and the five rank 0 writes
    assert re.search(r"checkpoint: [\d.]+ GB \(11 files\); .* resumed: the same", run.stdout), run.stdout[-1500:]
