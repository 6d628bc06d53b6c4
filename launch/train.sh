#!/usr/bin/env bash
# Start `seqrec train` on this node under torchrun. Run the same command on every node.
#
#   launch/train.sh --config configs/demo.toml [--set train.max_steps=100 ...] [--run-dir DIR]
#
# Every argument goes to `python -m seqrec train`. The topology comes from the environment:
#   NNODES          nodes in the job (default 1; "MIN:MAX" for elastic)    also PET_NNODES
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0)              also PET_NODE_RANK,
#                                                                           JOB_COMPLETION_INDEX
#   NPROC_PER_NODE  processes on this node (default: one per GPU, else 2)   also PET_NPROC_PER_NODE
#   MASTER_ADDR     host of node 0 (required when NNODES > 1)
#   MASTER_PORT     rendezvous port on node 0 (default 29500)
#   RDZV_ENDPOINT   host:port of an existing c10d rendezvous (replaces MASTER_ADDR/PORT)
#   RDZV_ID         job id shared by all nodes (default "seqrec")          also PET_RDZV_ID
#   RDZV_TIMEOUT    seconds to wait for all nodes to join (default 900)
#   RDZV_DNS_WAIT   seconds a node waits for MASTER_ADDR to resolve (default 600)
#   MAX_RESTARTS    torchrun in-place restarts of this node's workers (default 0: the pod restarts)
#   TORCHRUN        launcher command (default: "<python> -m torch.distributed.run", i.e. torchrun)
# The PET_* names are what the Kubeflow PyTorchJob operator sets; JOB_COMPLETION_INDEX is what an
# indexed batch/v1 Job sets. A restarted node resumes from the last complete checkpoint because
# `seqrec train` does that by itself.
#
# Rendezvous is c10d: node 0 hosts the store on MASTER_PORT (is_host=1), the others connect to it.
# Ranks are assigned by the rendezvous, so --node-rank is not passed (torchrun ignores it for c10d
# and warns); NODE_RANK only decides which node hosts the store.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "train.sh: error: $*" >&2; exit 2; }
log() { echo "train.sh: $*" >&2; }

# CPUs this container may use: nproc (affinity), lowered by a cgroup CPU quota (Kubernetes limits).
num_cpus() {
    local n quota period
    n="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    if [[ -r /sys/fs/cgroup/cpu.max ]]; then
        read -r quota period < /sys/fs/cgroup/cpu.max
    elif [[ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us && -r /sys/fs/cgroup/cpu/cpu.cfs_period_us ]]; then
        quota="$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
        period="$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
    fi
    if [[ "${quota:-max}" =~ ^[0-9]+$ && "${period:-0}" =~ ^[1-9][0-9]*$ ]] && (( quota > 0 )); then
        quota=$(( (quota + period - 1) / period ))
        (( quota < n )) && n=$quota
    fi
    echo $(( n > 0 ? n : 1 ))
}

# GPUs this container sees: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES when that is set.
num_gpus() {
    local n=0 visible
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    fi
    if (( n > 0 )) && [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            n=0
        else
            IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
            (( ${#visible[@]} < n )) && n=${#visible[@]}
        fi
    fi
    echo "$n"
}

# A node other than 0 may start before node 0's DNS record exists (headless Service, PyTorchJob
# Service): wait for the name instead of failing the pod and spending a restart.
wait_for_dns() {
    local host="$1" limit="${RDZV_DNS_WAIT:-600}" waited=0
    [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* || "$host" == localhost ]] && return 0
    command -v getent >/dev/null 2>&1 || return 0
    until getent hosts "$host" >/dev/null 2>&1; do
        if (( waited >= limit )); then
            echo "train.sh: error: cannot resolve MASTER_ADDR=$host after ${limit}s (is node 0 running?)" >&2
            exit 1
        fi
        (( waited == 0 )) && log "waiting for MASTER_ADDR=$host to resolve (node 0 starting?)"
        sleep 5
        waited=$(( waited + 5 ))
    done
}

CPUS="$(num_cpus)"
GPUS="$(num_gpus)"
NNODES="${NNODES:-${PET_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${PET_NODE_RANK:-${JOB_COMPLETION_INDEX:-0}}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 2 ))}}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}"
RDZV_ID="${RDZV_ID:-${PET_RDZV_ID:-seqrec}}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-900}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be a positive integer or MIN:MAX, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be an integer >= 0, got '$NODE_RANK'"
if [[ "$NNODES" =~ ^[0-9]+$ ]] && (( NODE_RANK >= NNODES )); then
    die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES"
fi
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
[[ "$RDZV_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "RDZV_TIMEOUT must be a positive number of seconds, got '$RDZV_TIMEOUT'"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be an integer >= 0, got '$MAX_RESTARTS'"

# Processes per node as a number (torchrun also accepts auto/gpu/cpu), for the thread budget.
case "$NPROC_PER_NODE" in
    gpu) PROCS=$GPUS ;;
    cpu) PROCS=$CPUS ;;
    auto) PROCS=$(( GPUS > 0 ? GPUS : CPUS )) ;;
    *) [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, auto, gpu or cpu, got '$NPROC_PER_NODE'"
       PROCS=$NPROC_PER_NODE ;;
esac
(( PROCS >= 1 )) || die "NPROC_PER_NODE=$NPROC_PER_NODE means 0 processes on this node (no GPU visible?)"

# Each process gets an equal share of the CPUs; oversubscribed OpenMP pools make CPU steps ~2x slower.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( CPUS / PROCS ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

if (( GPUS > 0 )); then
    # Fail fast on a collective that hangs or errors on another rank instead of waiting forever.
    # (TORCH_NCCL_ASYNC_ERROR_HANDLING replaces the deprecated NCCL_ASYNC_ERROR_HANDLING.)
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # NCCL_SOCKET_IFNAME / NCCL_IB_HCA, when set by the cluster, pass through unchanged.
    ACCEL="cuda x$GPUS"
else
    # DeepSpeed picks its CPU accelerator (gloo backend) without probing for CUDA.
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    ACCEL="cpu"
fi

RDZV=(--rdzv-backend c10d --rdzv-id "$RDZV_ID")
if [[ -n "$RDZV_ENDPOINT" ]]; then
    RDZV+=(--rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-conf "join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT")
    WHERE="c10d@$RDZV_ENDPOINT"
elif [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    RDZV=(--standalone)  # one node: a private store on a free local port
    WHERE="standalone"
else
    [[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR (node 0's host) or RDZV_ENDPOINT must be set when NNODES=$NNODES"
    IS_HOST=$(( NODE_RANK == 0 ? 1 : 0 ))
    (( IS_HOST )) || wait_for_dns "$MASTER_ADDR"
    RDZV+=(--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
           --rdzv-conf "is_host=$IS_HOST,join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT")
    WHERE="c10d@$MASTER_ADDR:$MASTER_PORT"
fi

if [[ -n "${TORCHRUN:-}" ]]; then
    read -ra LAUNCHER <<< "$TORCHRUN"
else
    LAUNCHER=("$PYTHON" -m torch.distributed.run)
fi

log "torchrun nodes=$NNODES node_rank=$NODE_RANK nproc_per_node=$NPROC_PER_NODE rdzv=$WHERE accel=$ACCEL OMP_NUM_THREADS=$OMP_NUM_THREADS"
exec "${LAUNCHER[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${RDZV[@]}" \
    --max-restarts "$MAX_RESTARTS" -m seqrec train "$@"
