#!/usr/bin/env bash
# SFT on one node: bash examples/sft_1node.sh NUM_GPUS [--config other.yaml] [--pretrained CKPT] [--section.field V ...]
#   bash examples/sft_1node.sh 8 --pretrained outputs/pretrain/ckpt --parallel.tp 2 --parallel.pp 2
set -euo pipefail
NPROC=${1:-1}; shift || true
CONFIG=${CONFIG:-examples/sft_tiny.yaml}
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_bluelm.stages.sft --config "$CONFIG" "$@"
