# shellcheck shell=bash
# Shared by launch/*.sh (sourced, not run): usage, process count, the torchrun call.

# launch_usage USAGE "$@": no arguments -> USAGE on stderr, exit 2; -h/--help -> stdout, exit 0
launch_usage() {
    local usage=$1
    shift
    if (( $# == 0 )); then
        echo "$usage" >&2
        exit 2
    fi
    if [[ $1 == -h || $1 == --help ]]; then
        echo "$usage"
        exit 0
    fi
}

# visible_gpus: what CUDA_VISIBLE_DEVICES allows, else what nvidia-smi lists, else 0
visible_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local ids
        IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# checkpoint_shards DIR: how many consolidated.NN.pth a checkpoint has (its model-parallel size)
checkpoint_shards() {
    local files=("$1"/consolidated.*.pth)
    [[ -e ${files[0]} ]] && echo "${#files[@]}" || echo 0
}

# launch_torchrun NPROC MODULE ARGS...: replace this shell with torchrun on NPROC local processes
launch_torchrun() {
    local nproc=$1 module=$2
    shift 2
    if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
        echo "${0##*/}: NPROC must be a positive whole number, got '$nproc'" >&2
        exit 2
    fi
    # torchrun would set 1 thread per process; on a CPU-only run that wastes the other cores
    local cores
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
    # after Ctrl-C or kill the ranks save before they exit; torchrun's default 30 s before it
    # kills them is shorter than a large model's save (llama_dist/launcher.py gives the same)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
    echo "+ torchrun --standalone --nproc_per_node $nproc -m $module $*" >&2
    exec torchrun --standalone --nproc_per_node "$nproc" -m "$module" "$@"
}
