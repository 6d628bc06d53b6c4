#!/usr/bin/env bash
# CPU smoke run of the whole pipeline on one machine, in a few minutes:
# synthetic log -> Spark sequence shards -> 2-process DeepSpeed training (gloo) -> results table.
#
#   launch/local_cpu.sh                    # uses .venv when it exists (make install), else python3
#   STEPS=60 EVENTS=50000 launch/local_cpu.sh
#
# Everything lands under $WORK (default data/local_cpu: config, log, shards) and $RUN_DIR (default
# runs/local_cpu). Both are deleted first so every smoke run starts from scratch.
#   STEPS           optimizer steps (default 40)
#   EVENTS          synthetic events (default 20000)
#   NPROC_PER_NODE  training processes (default 2)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
WORK="${WORK:-data/local_cpu}"
RUN_DIR="${RUN_DIR:-runs/local_cpu}"
STEPS="${STEPS:-40}"
EVENTS="${EVENTS:-20000}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "local_cpu.sh: STEPS must be a positive integer" >&2; exit 2; }
[[ "$EVENTS" =~ ^[1-9][0-9]*$ ]] || { echo "local_cpu.sh: EVENTS must be a positive integer" >&2; exit 2; }

# Local Spark: bind to loopback, and run Python workers with this interpreter (its packages).
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$PYTHON}"
export WANDB_MODE="${WANDB_MODE:-offline}"

rm -rf "$WORK" "$RUN_DIR"
mkdir -p "$WORK"
CONFIG="$WORK/smoke.toml"
# Small and fast, but every stage is the real one. Shards are laid out for up to 2 ranks.
cat > "$CONFIG" <<EOF
name = "local-cpu"
run_dir = "$RUN_DIR"

[generate]
num_events = $EVENTS
num_items = 500
num_categories = 10
output = "$WORK/log"

[prepare]
output = "$WORK/shards"
dataset_name = "synthetic-smoke"
spark_driver_memory = "2g"
shuffle_partitions = 4

[prepare.input]
path = "$WORK/log/events"
item_features_path = "$WORK/log/items.parquet"

[prepare.shards]
files_per_split = 2
max_world_size = $NPROC_PER_NODE
row_group_rows = 256

[data]
path = "$WORK/shards"

[train]
micro_batch_size = 32
global_batch_size = $(( 32 * NPROC_PER_NODE ))
max_steps = $STEPS
log_every = 5
eval_every = $(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
save_every = $(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))

[optim]
warmup_steps = 5

[eval]
max_valid_users = 500
EOF

step() { echo "== local_cpu.sh: $* ==" >&2; }
step "1/4 generate $EVENTS synthetic events"
"$PYTHON" -m seqrec generate --config "$CONFIG"
step "2/4 build sequence shards with local Spark"
"$PYTHON" -m seqrec prepare --config "$CONFIG"
step "3/4 train $STEPS steps on $NPROC_PER_NODE CPU processes"
NNODES=1 launch/train.sh --config "$CONFIG"
step "4/4 results"
"$PYTHON" -m seqrec summary --run-dir "$RUN_DIR"
