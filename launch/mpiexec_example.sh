#!/usr/bin/env bash
# Plain mpiexec, without `distnet launch`: what the launcher does, spelled out.
#
#   launch/mpiexec_example.sh 4 python launch/train_mlp.py data/digits   # 4 ranks here
#   HOSTS=node1:2,node2:2 launch/mpiexec_example.sh 4 distnet train job.toml
#
# Uses the mpiexec of PyPI's mpich wheel in .venv (hydra); set MPIEXEC for a site's own.
set -euo pipefail
cd "$(dirname "$0")/.."

NP=${1:?usage: $0 NP COMMAND...}
shift
[ "$#" -gt 0 ] || { echo "usage: $0 NP COMMAND..." >&2; exit 2; }
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec}
PY=${PY:-.venv/bin/python}
# `python` and `distnet` in COMMAND are the venv's, as with `distnet launch`
export PATH="$PWD/.venv/bin:$PATH"

args=(-n "$NP")
[ -n "${HOSTS:-}" ] && args+=(-hosts "$HOSTS")
# One BLAS thread per rank unless told otherwise: 2 ranks x 2 threads on 2 cores is slower.
args+=(-genv OMP_NUM_THREADS "${OMP_NUM_THREADS:-1}" -genv OPENBLAS_NUM_THREADS "${OMP_NUM_THREADS:-1}")
# Every output line gets its rank, e.g. "[1] ..."; rankexec also names a rank that dies.
args+=(-genv DISTNET_TAGGED_OUTPUT 1)

exec "$MPIEXEC" "${args[@]}" "$PY" -m distnet.parallel.mpi.rankexec -- "$@"
