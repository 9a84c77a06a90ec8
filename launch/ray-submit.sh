#!/usr/bin/env bash
# Submits a command to a running Ray cluster as a Ray job (ray job submit), with this
# checkout as the working directory.
#
#   launch/ray-submit.sh --address http://HEAD:8265 -- distnet train job.toml --engine ray --address auto
#   RAY_ADDRESS=http://HEAD:8265 launch/ray-submit.sh -- python launch/train_mlp.py data/digits
#   DRY_RUN=1 launch/ray-submit.sh --address http://HEAD:8265 -- distnet train job.toml
#
# Checks first: the ray CLI is installed, the cluster's dashboard answers at the address
# (GET /api/version, 5 s), and a token is at hand for a cluster with token authentication
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token: the cluster's token, see
# cluster/README.md).
set -euo pipefail
source "$(dirname "$0")/common.sh"

ADDRESS=${RAY_ADDRESS:-}
while [ "$#" -gt 0 ]; do
    case $1 in
        --address) ADDRESS=${2:-}; shift 2 ;;
        --address=*) ADDRESS=${1#--address=}; shift ;;
        --) shift; break ;;
        *) die "unknown option '$1': usage: $0 [--address URL] -- COMMAND..." ;;
    esac
done
[ "$#" -gt 0 ] || die "no command: usage: $0 [--address URL] -- COMMAND..."
[ -n "$ADDRESS" ] || die "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS"
[[ "$ADDRESS" == *://* ]] || ADDRESS=http://$ADDRESS
need_cmd ray "pip install 'ray[default]' (the same version as the cluster's)"
"$PYTHON" - "$ADDRESS" <<'PY' || die "no Ray dashboard answers at $ADDRESS (is the cluster up? is port 8265 reachable?)"
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/version", timeout=5)
except urllib.error.HTTPError as err:  # 401/403: it answers, and wants a token
    sys.exit(0 if err.code in (401, 403) else 1)
except OSError:
    sys.exit(1)
PY
if [ "${RAY_AUTH_MODE:-token}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    [ -s "$token_file" ] || die "no Ray auth token: copy the cluster's ~/.ray/auth_token to $token_file, or set RAY_AUTH_TOKEN (RAY_AUTH_MODE=disabled for a cluster without auth)"
fi
show_and_run ray job submit --address "$ADDRESS" --working-dir "$REPO" -- "$@"
