#!/usr/bin/env bash
# Regenerate the rendered kustomize folders from `seqrec launch k8s` (run after changing the renderer,
# the config defaults or the flags below; tests/unit/test_k8s.py fails while they are stale).
#   k8s/base         PyTorchJob, 2 nodes x 8 GPUs (the overlays patch it: small = 1 node, large = 16)
#   k8s/indexed-job  the same run as an indexed batch/v1 Job + headless Service (no operator needed)
# The global batch (8192) and the shard layout (128 ranks) fit every size from 1x8 to 16x8, so the
# overlays change only the hardware, never the math: gradient accumulation absorbs the difference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi

COMMON=(
    --nodes 2 --gpus-per-node 8
    --image registry.example.com/seqrec-train:0.1.0
    --spark-image registry.example.com/seqrec-spark:0.1.0
    --set train.global_batch_size=8192
    --set prepare.shards.max_world_size=128
)
"$PYTHON" -m seqrec launch k8s "${COMMON[@]}" --output k8s/base
"$PYTHON" -m seqrec launch k8s "${COMMON[@]}" --job-kind indexed-job --output k8s/indexed-job
