#!/usr/bin/env bash
# GPU check, one GPU, under 5 minutes; needs only torch, torchvision and timm.
#   scripts/gpu-check.sh [OUT_DIR]     (writes OUT_DIR/gpu-check.json and .txt)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-check.txt"
PYTHONPATH=. python scripts/gpu-check.py --compile --json "$out/gpu-check.json" 2>&1 | tee -a "$out/gpu-check.txt"
