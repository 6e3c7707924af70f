#!/usr/bin/env bash
# Evaluate a checkpoint on GPUS GPUs of this node with torchrun; extra arguments go to tools/test.py.
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [--cfg-options ...]
# Several nodes: the same NNODES, MASTER_ADDR and PORT on every node, and each node's NODE_RANK (see dist_train.sh).
# PYTHON selects the interpreter (default: python).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py arguments...]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3

exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${PORT:-29500}" \
  --nproc_per_node="$GPUS" \
  "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
