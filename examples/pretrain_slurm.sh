#!/usr/bin/env bash
# Multi-node pretraining under Slurm: one torchrun per node, c10d rendezvous on the first node.
#   sbatch --nodes 4 --gpus-per-node 8 examples/pretrain_slurm.sh examples/pretrain_bluelm_2.5_3b.yaml \
#       --parallel.tp 2 --parallel.pp 2
#SBATCH --job-name=bluelm-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?usage: sbatch $0 CONFIG.yaml [overrides]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Preemption: Slurm sends SIGTERM (or --signal=USR1@120); the trainer saves a checkpoint and exits.
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" \
  -m megatron_bluelm.stages.pretrain --config "$CONFIG" "$@"
