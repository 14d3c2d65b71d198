#!/usr/bin/env bash
# Pretraining on one node with torchrun. Usage:
#   NPROC=8 examples/pretrain_1node.sh examples/pretrain_bluelm_2.5_3b.yaml --parallel.tp 2 --parallel.pp 2
# NPROC defaults to the number of GPUs (or 4 CPU ranks with no GPU). Extra arguments are config overrides.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [--section.field value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(torch.cuda.device_count() or 4)")
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP/SP comm overlap ordering
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_bluelm.stages.pretrain --config "$CONFIG" "$@"
