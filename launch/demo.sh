#!/usr/bin/env bash
# `make demo`: built-in log (1M events) -> Spark shards -> DeepSpeed on 2 CPU processes -> full-ranking
# test vs popularity. Every stage skips or resumes what an earlier (interrupted) run finished.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SEQREC_BIN:-.venv/bin}
CONFIG=${CONFIG:-configs/demo.toml}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}

echo "== 1/4 generate the built-in behaviour log"
"$BIN/seqrec" generate --config "$CONFIG"
echo "== 2/4 prepare sequence shards with Spark (local mode)"
"$BIN/seqrec" prepare --config "$CONFIG"
echo "== 3/4 train with DeepSpeed on $NPROC CPU processes (gloo)"
"$BIN/torchrun" --standalone --nproc-per-node "$NPROC" -m seqrec train --config "$CONFIG"
echo "== 4/4 results"
"$BIN/seqrec" summary --config "$CONFIG" --run-dir "$(
  "$BIN/python" -c 'import sys; from seqrec.config import load_config; print(load_config(sys.argv[1]).run_dir)' "$CONFIG")"
