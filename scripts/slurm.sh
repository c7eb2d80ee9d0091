#!/usr/bin/env bash
# bt_fast on a SLURM cluster without containers: one torchrun agent per node, each
# running scripts/train.sh (the same torchrun command line as every other launcher).
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/slurm.sh configs/imagenet.yaml [--set k=v ...]
#
# runs/ must be on a filesystem every node sees: after a restart or a requeue, every
# rank resumes from RUN_DIR/checkpoints/last.pt.
#SBATCH --job-name=bt_fast
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --requeue
# SIGTERM to the job steps 120 s before the time limit: torchrun forwards it, every rank
# stops at the same step and writes one checkpoint, and the job ends; submitting the
# same command again resumes from it. --requeue covers node failure and preemption.
#SBATCH --signal=TERM@120
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail

CONFIG="${1:-configs/imagenet.yaml}"
shift || true

head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export NODES="$SLURM_JOB_NUM_NODES"
export GPUS="${SLURM_GPUS_ON_NODE:-8}"
export RDZV_HOST="$head_node"
export RDZV_PORT="${RDZV_PORT:-29500}"
export RUN_ID="${RUN_ID:-bt_fast-$SLURM_JOB_ID}"
export CONFIG
# Cluster NIC for NCCL bootstrap and gloo (e.g. ib0, eth0); NCCL_IB_HCA for InfiniBand.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"

# --kill-on-bad-exit=0: one failing agent does not tear the others down; torchrun's
# rendezvous lets the restarted worker group (MAX_RESTARTS) continue from last.pt.
srun --kill-on-bad-exit=0 --cpu-bind=none scripts/train.sh "$@"
