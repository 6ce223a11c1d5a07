#!/usr/bin/env bash
# On a CUDA machine, in under 8 minutes: the device, steps/s, images/s and MFU of the cpu, gpu and full profiles,
# then the gpu profile trained to its headline metrics; writes assets/gpu_benchmark.json.
# `bench/gpu_check.sh --dry` checks the script on the CPU in seconds (smoke profile).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 480 python bench/gpu_check.py "$@"
