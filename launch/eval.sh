#!/usr/bin/env bash
# Validation loss and perplexity of a checkpoint with torchrun --standalone.
#
#   launch/eval.sh runs/tiny/checkpoints/step-000200 --data data/stdlib
#   NPROC=4 launch/eval.sh CKPT --data DIR --batches 0     (mp=2 x dp=2: the whole val split)
#
# Every argument goes to `python -m llama_dist.evaluate` unchanged. NPROC comes
# from the environment only (default: the checkpoint's consolidated.NN.pth count;
# a multiple of it adds data parallelism).
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

launch_usage "usage: launch/eval.sh CKPT --data DIR [evaluation options]   (env NPROC: processes, default the checkpoint's shard count)" "$@"
shards=$(checkpoint_shards "$1")
launch_torchrun "${NPROC:-$(( shards > 0 ? shards : 1 ))}" llama_dist.evaluate "$@"
