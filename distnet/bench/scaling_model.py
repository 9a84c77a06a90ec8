"""The step-time model of docs/scaling.md, as code: every table there comes from ``main()``.

    python -m distnet.bench.scaling_model [--measured net.json] [--loader loader.json]

Step time of synchronous data parallelism, per worker batch ``b`` and ``N`` workers
(``g`` per node, ``K = N/g`` nodes), gradient of ``M`` bytes:

    T = max(T_compute, T_input) + T_comm_exposed

- compute: ``b * 6P / F`` (6 FLOPs per parameter per sample, ``F`` FLOP/s a worker reaches);
  GPUs have a floor per step (kernel launches) that tiny models never leave;
- input: ``b / R`` with ``R`` the loader's samples/s per worker; it runs in a prefetch thread,
  hence the ``max``;
- ring allreduce: ``2(N-1) alpha + 2(N-1)/N * M / B`` (``alpha``: per message, ``B``: the
  slowest link of the ring, the network once the ring leaves a node);
- hierarchical (distnet's MPI path: node leaders only cross the network):
  ``2 (alpha_i log2 g + M / B_i)`` inside the node, plus the ring over ``K`` leaders;
- parameter server with ``S`` shards (each on its own NIC): every worker pushes and pulls
  ``M``; a shard receives and sends ``N M / S``: ``2 alpha + 2 max(N M / S, M) / B``;
- hybrid: allreduce inside the node, then one push/pull per node to ``S`` shards:
  hierarchical's intra-node part plus ``2 alpha + 2 max(K M / S, M) / B``.

``T_comm_exposed`` is all of it without overlap, and ``max(0, T_comm - o T_backward)`` with
overlap (buckets reduced while backward runs; backward is 2/3 of compute); both are given,
as the bounds between which a real run lands.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    alpha_s: float  # per-message latency
    bandwidth_Bps: float  # bytes per second, one direction


@dataclass(frozen=True)
class Machine:
    name: str
    flops: float  # FLOP/s one worker reaches on training steps
    step_floor_s: float  # per-step overhead no matter how small the model (kernel launches)
    per_node: int  # workers per node (g)
    intra: Link  # inside a node
    net: Link  # between nodes, per flow
    input_sps: float  # samples/s the loader feeds one worker


@dataclass(frozen=True)
class Job:
    name: str
    params: int
    batch_per_worker: int
    bytes_per_param: int = 4
    input_sps: float | None = None  # the loader's rate for this job, when not the machine's


def compute_s(job: Job, m: Machine) -> float:
    """Forward + backward + update of one worker's batch."""
    return max(job.batch_per_worker * 6 * job.params / m.flops, m.step_floor_s)


def input_s(job: Job, m: Machine) -> float:
    return job.batch_per_worker / (job.input_sps or m.input_sps)


def ring_s(nbytes: float, n: int, link: Link) -> float:
    """Ring allreduce of ``nbytes`` over ``n`` ranks on ``link``."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * link.alpha_s + 2 * (n - 1) / n * nbytes / link.bandwidth_Bps


def intra_node_s(nbytes: float, g: int, link: Link) -> float:
    """Reduce to the leader, then broadcast from it (tree of log2 g steps each way)."""
    if g <= 1:
        return 0.0
    return 2 * (math.ceil(math.log2(g)) * link.alpha_s + nbytes / link.bandwidth_Bps)


def comm_s(strategy: str, job: Job, m: Machine, n: int, shards: int = 1) -> float:
    """Communication time of one step of ``strategy`` over ``n`` workers."""
    nbytes = job.params * job.bytes_per_param
    g = min(m.per_node, n)
    k = max(1, n // g)
    if n <= 1:
        return 0.0
    if strategy == "ring":  # flat: as slow as its slowest hop once it spans nodes
        slowest = Link(
            max(m.intra.alpha_s, m.net.alpha_s), min(m.intra.bandwidth_Bps, m.net.bandwidth_Bps)
        )
        return ring_s(nbytes, n, slowest if k > 1 else m.intra)
    if strategy == "hierarchical":
        return intra_node_s(nbytes, g, m.intra) + ring_s(nbytes, k, m.net)
    if strategy == "ps":
        link = m.net if k > 1 or shards > 0 else m.intra
        return 2 * link.alpha_s + 2 * max(n * nbytes / shards, nbytes) / link.bandwidth_Bps
    if strategy == "hybrid":
        cross = 2 * m.net.alpha_s + 2 * max(k * nbytes / shards, nbytes) / m.net.bandwidth_Bps
        return intra_node_s(nbytes, g, m.intra) + (cross if k > 1 else 0.0)
    raise ValueError(f"unknown strategy {strategy!r}")


def step_s(strategy: str, job: Job, m: Machine, n: int, shards: int = 1, overlap: bool = False):
    """Seconds per step; with ``overlap``, communication hides behind backward (2/3 compute)."""
    work = max(compute_s(job, m), input_s(job, m))
    comm = comm_s(strategy, job, m, n, shards)
    if overlap:
        comm = max(0.0, comm - 2 / 3 * compute_s(job, m))
    return work + comm


def efficiency(strategy: str, job: Job, m: Machine, n: int, shards: int = 1, overlap=False):
    """Weak scaling (fixed batch per worker): T(1) / T(n)."""
    return step_s(strategy, job, m, 1) / step_s(strategy, job, m, n, shards, overlap)


def stops_scaling(strategy: str, job: Job, m: Machine, shards_per_node: int = 0) -> int:
    """The smallest power-of-two worker count whose efficiency (no overlap) drops below 50%."""
    n = 1
    while n < 2**20:
        n *= 2
        shards = max(1, shards_per_node * max(1, n // m.per_node)) if shards_per_node else 1
        if efficiency(strategy, job, m, n, shards) < 0.5:
            return n
    return n


# --- constants ----------------------------------------------------------------------------

# Assumed (not measurable here); sources in docs/scaling.md.
IB_NDR_PER_GPU = Link(alpha_s=5e-6, bandwidth_Bps=40e9)  # 400 Gb/s NIC per GPU, ~80% used
IB_100G_NODE = Link(alpha_s=2e-6, bandwidth_Bps=11e9)  # one 100 Gb/s NIC, MPI from host memory
NVLINK_H100 = Link(alpha_s=3e-6, bandwidth_Bps=300e9)  # NCCL inside an 8-GPU NVLink node
ROCE_25G = Link(alpha_s=10e-6, bandwidth_Bps=2.8e9)  # Horovod's 25 Gb/s RoCE, ~90% used
PCIE_P100 = Link(alpha_s=5e-6, bandwidth_Bps=10e9)  # 4 P100 on PCIe 3.0 x16 in one server


def machines(measured: dict | None, loader_sps: float) -> dict[str, Machine]:
    fit = {"alpha_s": 2e-6, "bandwidth_Bps": 3e8}
    if measured:
        from distnet.bench.network import fit_ring  # noqa: PLC0415

        rows = measured["sweep"]["rows"]
        fit = fit_ring([r["bytes"] for r in rows], [r["flat_s"] for r in rows], measured["ranks"])
    cpu_flops = (measured or {}).get("compute", {}).get("flops", 13e9)
    shm = Link(fit["alpha_s"], fit["bandwidth_Bps"])
    return {
        # distnet on CPU nodes: one rank per core at the measured FLOP/s, MPI over host memory
        # inside the node (measured), one 100 Gb/s NIC per node (assumed)
        "cpu-node (32 ranks/node)": Machine(
            "cpu", cpu_flops, 0.0, 32, shm, IB_100G_NODE, loader_sps
        ),
        # the same with an assumed 5 GB/s MPI shared-memory bandwidth (a real server's)
        "cpu-node, assumed 5 GB/s shm": Machine(
            "cpu5", cpu_flops, 0.0, 32, Link(shm.alpha_s, 5e9), IB_100G_NODE, loader_sps
        ),
        # 8 H100 per node, NCCL (NVLink inside, one NDR NIC per GPU across)
        "gpu-node (8 H100/node)": Machine(
            "h100", 100e12, 3e-4, 8, NVLINK_H100, IB_NDR_PER_GPU, loader_sps
        ),
        # Horovod's benchmark: 4 P100 per server, 25 Gb/s RoCE
        "horovod-2017 (4 P100/node)": Machine("p100", 3.3e12, 0.0, 4, PCIE_P100, ROCE_25G, 1e9),
    }


FASHION_SAE = Job("Fashion-MNIST SAE 784-500-200-10", 784 * 500 + 500 + 500 * 200 + 200 + 2010, 128)
BIG_100M = Job("100M-parameter MLP", 100_000_000, 32)
# tokens are a few bytes each: assume the input keeps up (1e7 tokens/s per worker)
BIG_100M_LARGE_BATCH = Job(
    "100M parameters, 16,384 samples (tokens)/worker", 100_000_000, 16384, input_sps=1e7
)
RESNET101 = Job("ResNet-101 (44.5M params, 7.8 GFLOP fwd)", 44_500_000, 64)
# ResNet-101's FLOPs are not 6P per sample (convolutions reuse weights): 3 x 7.8 GFLOP
RESNET101_FLOP_PER_SAMPLE = 3 * 7.8e9


def _resnet_machine(m: Machine) -> Machine:
    # express ResNet's FLOPs per sample through an equivalent FLOP rate for the 6P formula
    scale = 6 * RESNET101.params / RESNET101_FLOP_PER_SAMPLE
    return Machine(m.name, m.flops * scale, m.step_floor_s, m.per_node, m.intra, m.net, 1e9)


def report(measured: dict | None, loader_sps: float) -> str:
    lines = []
    ms = machines(measured, loader_sps)
    fit = ms["cpu-node (32 ranks/node)"].intra
    lines.append(
        f"measured here: alpha {1e6 * fit.alpha_s:.1f} us, shm bandwidth "
        f"{fit.bandwidth_Bps / 1e9:.2f} GB/s, {ms['cpu-node (32 ranks/node)'].flops / 1e9:.1f} "
        f"GFLOP/s per rank, loader {loader_sps:,.0f} samples/s per rank"
    )
    for job in (FASHION_SAE, BIG_100M, BIG_100M_LARGE_BATCH):
        lines.append(
            f"\n### {job.name}: {job.params:,} parameters, batch {job.batch_per_worker}/worker"
        )
        for mname, m in ms.items():
            if mname.startswith("horovod") or (job.batch_per_worker > 1000 and m.name != "h100"):
                continue
            lines.append(
                f"\n{mname}: compute {1e3 * compute_s(job, m):.2f} ms, "
                f"input {1e3 * input_s(job, m):.2f} ms per step\n"
            )
            lines.append(
                "| workers | ring | hierarchical | ps (S = nodes) | ps (S = workers) "
                "| hybrid (S = nodes) | hybrid (S = 4 x nodes) | ring, overlap |"
            )
            lines.append("|---|---|---|---|---|---|---|---|")
            for n in (8, 64, 512) if m.per_node == 8 else (32, 256, 2048):
                k = max(1, n // m.per_node)
                cells = [
                    efficiency("ring", job, m, n),
                    efficiency("hierarchical", job, m, n),
                    efficiency("ps", job, m, n, k),
                    efficiency("ps", job, m, n, n),
                    efficiency("hybrid", job, m, n, k),
                    efficiency("hybrid", job, m, n, 4 * k),
                ]
                over = efficiency("ring", job, m, n, overlap=True)
                lines.append(
                    f"| {n} | "
                    + " | ".join(f"{100 * c:.0f}%" for c in cells)
                    + f" | {100 * over:.0f}% |"
                )
            lines.append(
                "\nstops scaling (efficiency < 50%, no overlap) at: "
                + ", ".join(f"{s} {stops_scaling(s, job, m)}" for s in ("ring", "hierarchical"))
            )
    hm = _resnet_machine(ms["horovod-2017 (4 P100/node)"])
    lines.append("\n### Horovod's benchmark: ResNet-101, 512 P100 (128 servers x 4), 25 Gb/s RoCE")
    for strategy in ("ring", "hierarchical"):
        lo = efficiency(strategy, RESNET101, hm, 512)
        hi = efficiency(strategy, RESNET101, hm, 512, overlap=True)
        lines.append(f"{strategy}: {100 * lo:.0f}% without overlap, {100 * hi:.0f}% with overlap")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnet.bench.scaling_model")
    parser.add_argument("--measured", help="JSON of `distnet bench network --json`")
    parser.add_argument("--loader", help="JSON of `distnet bench loader --json`")
    args = parser.parse_args(argv)
    measured = json.load(open(args.measured)) if args.measured else None
    loader_sps = 50_000.0
    if args.loader:
        data = json.load(open(args.loader))
        loader_sps = float(
            data.get("loader_samples_per_s", data.get("streamloader_sps", loader_sps))
        )
    print(report(measured, loader_sps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
