#!/usr/bin/env bash
# Train on GPUS GPUs of this node with torchrun; extra arguments go to tools/train.py.
#   tools/dist_train.sh CONFIG GPUS [--work-dir DIR] [--resume] [--cfg-options ...]
# Several nodes: run it on every node with the same NNODES, MASTER_ADDR and PORT and that node's NODE_RANK, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 tools/dist_train.sh CONFIG 8   # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 PORT=29500 tools/dist_train.sh CONFIG 8   # on the other node
# PYTHON selects the interpreter (default: python, e.g. PYTHON=.venv/bin/python).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG GPUS [train.py arguments...]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
shift 2

exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${PORT:-29500}" \
  --nproc_per_node="$GPUS" \
  "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "$@"
