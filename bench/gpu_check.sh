#!/usr/bin/env bash
# The one GPU command: bench/gpu_check.py's phases (speed eager vs compiled, the gpu runs, the full runs) with its
# arguments passed through, under a hard timeout ($GPU_CHECK_TIMEOUT, default 580 s) above its own --time-limit
# (default 540 s). The report is rewritten after every measurement and run, so a call cut short keeps what it finished.
#   bench/gpu_check.sh --fresh --phases speed,gpu          # first call: the profiles' speed, the two gpu runs
#   bench/gpu_check.sh --phases full --full-steps fit      # second call: the two full runs, as many steps as fit
#   bench/gpu_check.sh --dry                               # on the CPU: every phase on the smoke profile
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout -k 10 "${GPU_CHECK_TIMEOUT:-580}" python bench/gpu_check.py "$@"
