#!/usr/bin/env bash
# Generate text from a checkpoint with torchrun --standalone, one process per model-parallel shard.
#
#   launch/generate.sh runs/tiny/checkpoints/step-000200 --prompt "def fib(n):" --temperature 0
#   NPROC=2 launch/generate.sh CKPT --prompt "import os" --max-gen-len 128
#
# Every argument goes to `python -m llama_dist.generation` unchanged. NPROC
# comes from the environment only (default: the checkpoint's consolidated.NN.pth count).
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

launch_usage "usage: launch/generate.sh CKPT --prompt TEXT [generation options]   (env NPROC: processes, default the checkpoint's shard count)" "$@"
shards=$(checkpoint_shards "$1")
launch_torchrun "${NPROC:-$(( shards > 0 ? shards : 1 ))}" llama_dist.generation "$@"
