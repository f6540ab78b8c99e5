#!/usr/bin/env bash
# Train on this machine with torchrun --standalone: one process per GPU, or NPROC.
#
#   launch/train.sh configs/tiny.yaml train.steps=100
#   NPROC=8 launch/train.sh configs/llama2-7b.yaml parallel.mp=8 train.run_dir=runs/7b
#
# Every argument goes to `python -m llama_dist.train` unchanged. NPROC comes
# from the environment only (default: the visible GPUs, else 1 on a CPU).
# Ctrl-C or kill: the ranks save a checkpoint and leave RUN/PREEMPTED, then torchrun
# exits 1 with its own traceback (`llama-dist train --nproc N` exits 75 instead).
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

launch_usage "usage: launch/train.sh CONFIG [section.key=value ...]   (env NPROC: processes, default one per GPU, else 1)" "$@"
gpus=$(visible_gpus)
launch_torchrun "${NPROC:-$(( gpus > 0 ? gpus : 1 ))}" llama_dist.train "$@"
