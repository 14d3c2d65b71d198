#!/usr/bin/env bash
# Scaling benchmark of the bluelm-2.5-3b decoder on this node's GPUs (weak scaling, seq 4096):
#   examples/scaling_bench.sh                 # all default layouts that fit the visible GPUs
#   examples/scaling_bench.sh --layouts dp2,tp2,pp2-vpp2 --microbatches 16
#   examples/scaling_bench.sh --vision vit-so400m --max-tiles 6 --layouts dp2,tp2,pp2,tp2-pp2   # multimodal model
set -euo pipefail
mkdir -p outputs
exec python3 tools/bench/scaling_bench.py --preset bluelm-2.5-3b --seq 4096 --out outputs/scaling.json "$@"
