#!/usr/bin/env bash
# Start `seqrec train` with the DeepSpeed launcher and a hostfile (the alternative to launch/train.sh).
#
#   HOSTFILE=hosts launch/deepspeed_hostfile.sh --config configs/demo.toml [--set k=v ...]
#
# The hostfile lists one node per line as "<host> slots=<processes>" (e.g. "gpu-node-1 slots=8").
# Run the script once, on the first host: for more than one node the DeepSpeed launcher starts the
# other nodes over passwordless ssh (pdsh), in the same folder with the same Python, so the repo and
# its .venv must be at the same path on every node (shared file system or identical images).
#
#   HOSTFILE        hostfile path (default: a one-line "localhost slots=NPROC_PER_NODE" file)
#   NUM_NODES       nodes to use, the first N of the hostfile (default: all of them)
#   NPROC_PER_NODE  processes per node (default: one per GPU, else 2); passed as --num_gpus, which
#                   the launcher needs even on CPU to start more than one process
#   MASTER_ADDR     address of the first host (default: the first hostfile entry; 127.0.0.1 for localhost)
#   MASTER_PORT     default 29500
#   DEEPSPEED       launcher command (default: "<python> -m deepspeed.launcher.runner", i.e. deepspeed)
#
# The DeepSpeed launcher does not set OMP_NUM_THREADS (torchrun does): this script does, as
# launch/train.sh does. On other nodes the launcher only forwards variables named in an env file, so
# for several nodes this script writes the non-secret settings (threads, accelerator, NCCL, W&B
# project/mode) to one and points DS_ENV_FILE at it. WANDB_API_KEY is never written there: log in
# on each node (`wandb login`) or run offline and `wandb sync` later.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "deepspeed_hostfile.sh: error: $*" >&2; exit 2; }
log() { echo "deepspeed_hostfile.sh: $*" >&2; }

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 2 ))}"
MASTER_PORT="${MASTER_PORT:-29500}"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"

TMP_DIR="${TMPDIR:-/tmp}"
if [[ -z "${HOSTFILE:-}" ]]; then
    HOSTFILE="$TMP_DIR/seqrec-hostfile-$(id -u)"
    echo "localhost slots=$NPROC_PER_NODE" > "$HOSTFILE"
fi
[[ -r "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE does not exist or is not readable"
# Hosts in file order, skipping comments and blank lines.
mapfile -t HOSTS < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { print $1 }')
(( ${#HOSTS[@]} > 0 )) || die "HOSTFILE $HOSTFILE lists no hosts (expected lines like 'node-1 slots=8')"
NUM_NODES="${NUM_NODES:-${#HOSTS[@]}}"
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES must be a positive integer, got '$NUM_NODES'"
(( NUM_NODES <= ${#HOSTS[@]} )) || die "NUM_NODES=$NUM_NODES but $HOSTFILE lists ${#HOSTS[@]} host(s)"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR="${HOSTS[0]}"
    [[ "$MASTER_ADDR" == localhost ]] && MASTER_ADDR=127.0.0.1
fi

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
if (( GPUS > 0 )); then
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
else
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

EXTRA=()
if (( NUM_NODES == 1 )); then
    # One node runs locally: skip the launcher's ssh probe of the hostfile's first host.
    EXTRA+=(--no_ssh_check)
else
    # DeepSpeed reads DS_ENV_FILE relative to ~ and .; an absolute path wins in os.path.join.
    DS_ENV_FILE="$TMP_DIR/seqrec-deepspeed-env-$(id -u)"
    : > "$DS_ENV_FILE"
    chmod 600 "$DS_ENV_FILE"
    for name in OMP_NUM_THREADS DS_ACCELERATOR TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG \
                NCCL_SOCKET_IFNAME NCCL_IB_HCA GLOO_SOCKET_IFNAME WANDB_PROJECT WANDB_ENTITY WANDB_MODE \
                SEQREC_LOG_LEVEL; do
        if [[ -n "${!name:-}" ]]; then echo "$name=${!name}" >> "$DS_ENV_FILE"; fi
    done
    export DS_ENV_FILE
fi

if [[ -n "${DEEPSPEED:-}" ]]; then
    read -ra LAUNCHER <<< "$DEEPSPEED"
else
    LAUNCHER=("$PYTHON" -m deepspeed.launcher.runner)
fi

log "deepspeed hostfile=$HOSTFILE nodes=$NUM_NODES procs_per_node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS"
# --no_local_rank: seqrec reads LOCAL_RANK from the environment and has no --local_rank flag.
exec "${LAUNCHER[@]}" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${EXTRA[@]}" --no_local_rank \
    --module seqrec train "$@"
