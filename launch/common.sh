# Shared by the launch/*.sh scripts (sourced, not run): one clear message and a non-zero
# exit for each unmet prerequisite, and the command printed before it runs.

die() {  # die MESSAGE [STATUS]: one line on stderr, exit STATUS (default 2)
    echo "$(basename "$0"): error: $1" >&2
    exit "${2:-2}"
}

need_cmd() {  # need_cmd PROGRAM HINT: PROGRAM on PATH, or die naming it and how to get it
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}

need_file() {  # need_file PATH WHAT
    [ -f "$1" ] || die "$2 $1 does not exist"
}

show_and_run() {  # show_and_run CMD...: prints the command (shell-quoted); runs it unless DRY_RUN=1
    printf '%s:' "$(basename "$0")"
    printf ' %q' "$@"
    printf '\n'
    [ "${DRY_RUN:-0}" = 1 ] && exit 0
    exec "$@"
}

# The project's Python: the venv next to the repository if there is one, else python3 on PATH.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
