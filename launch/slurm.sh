#!/usr/bin/env bash
# Submits a distnet job to SLURM with one of the templates in cluster/slurm/.
#
#   launch/slurm.sh mpi-cpu JOB.toml [sbatch options...]     # MPI ranks via srun, CPU nodes
#   launch/slurm.sh mpi-gpu JOB.toml --nodes=4               # one rank per GPU
#   launch/slurm.sh ray-cpu JOB.toml                         # Ray head + workers, then the job
#   DRY_RUN=1 launch/slurm.sh mpi-gpu JOB.toml               # check and print only
#
# Checks first: sbatch is found, the template and job file exist, and the job file loads.
set -euo pipefail
source "$(dirname "$0")/common.sh"

[ "$#" -ge 2 ] || die "usage: $0 mpi-cpu|mpi-gpu|ray-cpu|ray-gpu JOB.toml [sbatch options...]"
KIND=$1 JOB=$2
shift 2
TEMPLATE=$REPO/cluster/slurm/$KIND.sbatch
[ -f "$TEMPLATE" ] || die "no template '$KIND': expected one of mpi-cpu, mpi-gpu, ray-cpu, ray-gpu"
need_file "$JOB" "job file"
need_cmd sbatch "this is not a SLURM login node (or load the slurm module)"
"$PYTHON" -c 'import sys; from distnet.train.jobs.load import load_job; load_job(sys.argv[1])' "$JOB" \
    || die "job file $JOB does not load (see above)"
export DISTNET_REPO=$REPO  # the templates find cluster/slurm/ray-start.sh through it
case $KIND in
    mpi-gpu) extra=(--set run.device=cuda) ;;
    ray-*) extra=(--engine ray --address auto) ;;
    *) extra=() ;;
esac
show_and_run sbatch "$@" "$TEMPLATE" distnet train "$(realpath "$JOB")" "${extra[@]}"
