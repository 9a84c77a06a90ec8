#!/usr/bin/env bash
# One machine, N GPUs: N ranks (one per GPU), gradients through NCCL.
#
#   launch/multi-gpu.sh 4 launch/jobs/fashion_sae.toml [--set finetune.epochs=5 ...]
#   DRY_RUN=1 launch/multi-gpu.sh 4 JOB      # check and print, do not run
#
# Checks first: N is a positive integer, the job file exists, `distnet` and its mpiexec are
# installed, and at least N GPUs are visible (nvidia-smi -L, limited by CUDA_VISIBLE_DEVICES).
set -euo pipefail
source "$(dirname "$0")/common.sh"

[ "$#" -ge 2 ] || die "usage: $0 N JOB.toml [distnet train options...]"
N=$1 JOB=$2
shift 2
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
need_file "$JOB" "job file"
need_cmd distnet "install distnet (pip install -e '.[gpu]') or activate its venv"
need_cmd nvidia-smi "no NVIDIA driver here: use 'distnet launch -np $N -- distnet train $JOB' for CPU ranks"
visible=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    listed=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
    [ "$listed" -lt "$visible" ] && visible=$listed
fi
[ "$visible" -ge "$N" ] || die "$N ranks need $N GPUs, but $visible are visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES)"

# Each rank takes GPU local_rank; run.device=cuda moves model and batches there.
show_and_run distnet launch -np "$N" -- distnet train "$JOB" --set run.device=cuda "$@"
