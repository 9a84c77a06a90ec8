#!/usr/bin/env bash
# Several machines you can ssh to: NP ranks spread over HOSTS with mpiexec (hydra, over ssh).
#
#   launch/mpi-hosts.sh node1:4,node2:4 8 distnet train job.toml
#   launch/mpi-hosts.sh cluster/hostfile.example 8 distnet train job.toml
#   DRY_RUN=1 launch/mpi-hosts.sh node1:2,node2:2 4 distnet train job.toml
#
# Checks first: distnet launch's mpiexec is installed, every host answers ssh without a
# password (BatchMode, 5 s), and the same repository path exists there. Every node needs the
# same Python environment at the same path (a shared file system, or the same venv built on
# each); the run directory may be node-local (rank 0 writes, and resumes broadcast from it).
set -euo pipefail
source "$(dirname "$0")/common.sh"

[ "$#" -ge 3 ] || die "usage: $0 HOST:SLOTS,...|HOSTFILE NP COMMAND..."
WHERE=$1 NP=$2
shift 2
[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive integer, got '$NP'"
need_cmd distnet "install distnet or activate its venv"
mpiexec=$("$PYTHON" -c 'from distnet.parallel.mpi.launcher import find_mpiexec; print(find_mpiexec())' 2>/dev/null) \
    || die "no mpiexec found: pip install mpich (or load your site's MPI module)"
if [ -f "$WHERE" ]; then
    where=(--hostfile "$WHERE")
    hosts=$(sed -e 's/#.*//' -e 's/[[:space:]].*//' -e 's/:.*//' "$WHERE" | grep . || true)
else
    where=(-H "$WHERE")
    hosts=$(tr ',' '\n' <<<"$WHERE" | sed 's/:.*//')
fi
[ -n "$hosts" ] || die "no hosts in '$WHERE'"
for host in $hosts; do
    case $host in localhost | 127.0.0.1 | "$(hostname)" | "$(hostname -f 2>/dev/null)") continue ;; esac
    need_cmd ssh "mpiexec starts remote ranks over ssh"
    ssh -o BatchMode=yes -o ConnectTimeout=5 "$host" test -d "$REPO" 2>/dev/null \
        || die "host $host is not reachable by ssh without a password, or has no $REPO"
done
echo "$(basename "$0"): mpiexec $mpiexec; hosts: $(echo $hosts)"
show_and_run distnet launch -np "$NP" "${where[@]}" -- "$@"
