#!/usr/bin/env bash
# The one torchrun command line of bt_fast. Every launcher ends here: `make train
# LAUNCHER=torchrun`, each trainer service of the compose file, and each node of the
# SLURM script. Run it once per node; the c10d rendezvous on RDZV_HOST gathers them.
#
#   NODES=4 GPUS=8 RDZV_HOST=node0 CONFIG=configs/imagenet.yaml scripts/train.sh [--set k=v ...]
#
# NODES may be MIN:MAX for an elastic job (torchrun then proceeds with any node count in
# that range; the global batch stays data.batch_size, split over the ranks present).
set -euo pipefail

NODES="${NODES:-1}"              # torchrun --nnodes (N or MIN:MAX)
GPUS="${GPUS:-1}"                # processes per node (one per GPU; CPU runs: any)
CONFIG="${CONFIG:-configs/smoke.yaml}"
RDZV_HOST="${RDZV_HOST:-}"       # host of the c10d rendezvous (the first node); empty = this one
RDZV_PORT="${RDZV_PORT:-29500}"
RUN_ID="${RUN_ID:-bt_fast}"      # rendezvous id: the same on every node of one job
MAX_RESTARTS="${MAX_RESTARTS:-3}" # worker-group restarts after a failure (each resumes from last.pt)
PREFLIGHT="${PREFLIGHT:-1}"      # 1: check config and data before torchrun (see below); 0: skip

# Restarts with torchrun's shared rendezvous TCP store failed 2 times in 3 in our tests;
# a separate store made them reliable (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# A dead peer makes NCCL collectives raise (then torchrun restarts) instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Each rank runs its own DALI threads; do not let OpenMP oversubscribe the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ -z "$RDZV_HOST" && "$NODES" == "1" ]]; then
  rdzv=(--standalone)            # one node: a private rendezvous on a free port
  job=()                         # torchrun picks a fresh job id: no node can join
else
  rdzv=(--rdzv-backend=c10d --rdzv-endpoint="${RDZV_HOST:-127.0.0.1}:${RDZV_PORT}" --rdzv-id="$RUN_ID")
  job=(--run-id "$RUN_ID")       # a node joining this job finds the run folder locked by it
fi

# Configuration errors are not retried: torchrun restarts a failed worker group whatever
# its exit code, so the config, the batch against every world size NODES allows, the file
# list and the run folder are checked once here, before any worker starts (exit 2, one
# line). The python beside torchrun is the environment bt_fast is installed in.
TORCHRUN="${TORCHRUN:-torchrun}"
if [[ "${PREFLIGHT:-1}" == "1" ]]; then
  PYTHON="${PYTHON:-$(dirname "$(command -v "$TORCHRUN")")/python}"
  [[ -x "$PYTHON" ]] || PYTHON=python
  IFS=: read -r nmin nmax <<< "$NODES"
  sizes=()
  for ((n = nmin; n <= ${nmax:-$nmin}; n++)); do sizes+=("$((n * GPUS))"); done
  "$PYTHON" -m bt_fast.preflight --world-sizes "${sizes[@]}" ${job[@]+"${job[@]}"} -- --config "$CONFIG" "$@"
fi

exec "$TORCHRUN" \
  --nnodes="$NODES" --nproc-per-node="$GPUS" "${rdzv[@]}" \
  --max-restarts="$MAX_RESTARTS" --monitor-interval=1 \
  -m bt_fast train --config "$CONFIG" "$@"
