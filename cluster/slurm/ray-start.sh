# Sourced by ray-cpu.sbatch / ray-gpu.sbatch: starts a Ray cluster over the SLURM allocation,
# the head on the first node and one worker on each of the others, as Ray's SLURM guide does
# (https://docs.ray.io/en/latest/cluster/vms/user-guides/community/slurm.html), with token
# authentication on.

ray_cluster_start() {  # ray_cluster_start GPUS_PER_NODE; exports RAY_ADDRESS
    local gpus=$1 port=${RAY_PORT:-6379} cpus=${SLURM_CPUS_PER_TASK:-1}
    local venv=${VENV:-${DISTNET_REPO:-$SLURM_SUBMIT_DIR}/.venv}
    [ -x "$venv/bin/ray" ] || { echo "no ray in VENV=$venv" >&2; exit 2; }
    export PATH=$venv/bin:$PATH

    # A fresh token for this job, readable by you only; srun passes these to every node
    # (the home directory is shared across the nodes at nearly every site).
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH=$HOME/.ray/distnet-slurm-$SLURM_JOB_ID.token
    mkdir -p "$HOME/.ray"
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
    trap 'ray stop --force >/dev/null 2>&1 || true; rm -f "$RAY_AUTH_TOKEN_PATH"' EXIT

    local nodes head head_ip
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    head=${nodes[0]}
    head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
    export RAY_HEAD_ADDRESS=$head_ip:$port RAY_ADDRESS=$head_ip:$port

    echo "ray head on $head ($RAY_HEAD_ADDRESS), workers on ${nodes[*]:1}"
    srun --nodes=1 --ntasks=1 -w "$head" \
        ray start --head --node-ip-address="$head_ip" --port="$port" \
        --num-cpus="$cpus" --num-gpus="$gpus" --block &
    # The head must be up before workers join (Ray's guide waits the same way).
    local tries=0
    until ray status --address="$RAY_HEAD_ADDRESS" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -le 60 ] || { echo "ray head did not start in 120 s" >&2; exit 1; }
        sleep 2
    done
    local node
    for node in "${nodes[@]:1}"; do
        srun --nodes=1 --ntasks=1 -w "$node" \
            ray start --address="$RAY_HEAD_ADDRESS" --num-cpus="$cpus" --num-gpus="$gpus" --block &
    done
    sleep 5
    ray status --address="$RAY_HEAD_ADDRESS"
}
