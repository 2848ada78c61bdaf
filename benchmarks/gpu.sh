#!/usr/bin/env bash
# One short GPU run (under 10 minutes): training throughput + MFU (bf16, ~100M params, SDPA flash),
# data loader vs step, batched decoding, Lightning fit on the GPU, CPU/GPU parity.
#   bash benchmarks/gpu.sh [--quick] [--compile]
# Results: stdout and gpu_results.json (or $OUT/gpu_results.json on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}/gpu_results.json
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out "$out" "$@"
