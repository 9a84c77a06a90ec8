"""``distnet bench core --matrix``: the MLP step over activations, batch sizes and optimisers.

Each cell (MLP 784-1000-1000-1000-10, softmax cross-entropy, one activation in the three
hidden layers, one optimiser, one batch size) runs distnet, PyTorch and the GEMM floor
(``distnet.bench.floor``: the step's 11 GEMMs alone) in three processes, alternating rounds
as ``distnet bench core`` does; a cell reports distnet's speed over PyTorch's (median and
spread of the per-round ratios) and both step times as multiples of the floor. The update's
bandwidth floor (bytes moved over the measured copy bandwidth) is printed per optimiser.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from distnet.bench import floor, step

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu")
OPTIMISERS = ("sgd", "sgdm", "adam")
GRID_BATCHES = (64, 128, 512)


def _bandwidth(threads: int) -> float:
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    return floor.copy_bandwidth()


def run(args: argparse.Namespace) -> int:
    """Runs every cell, prints one line per cell as it finishes and the table at the end."""
    with_torch = not args.no_torch and step._torch_available()
    names = ["distnet", "distnet-ib", "torch", "floor"]
    if not with_torch:
        names = ["distnet", "distnet-ib", "floor"]
    batches = args.batch if args.batch != [128, 512] else list(GRID_BATCHES)
    load_before = os.getloadavg()
    bandwidth = _bandwidth(args.threads)
    n_params = floor.mlp_parameters()
    update_floor_ms = {o: 1e3 * floor.update_floor_s(o, n_params, bandwidth) for o in OPTIMISERS}
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; update floor over {n_params:,} "
          "parameters: " + ", ".join(f"{o} {v:.2f} ms" for o, v in update_floor_ms.items()),
          flush=True)  # fmt: skip
    cells: list[dict[str, Any]] = []
    pool: dict[str, Any] = {}  # one worker process per contender for the whole grid
    try:
        for batch in batches:
            for opt_name in args.optimisers or OPTIMISERS:
                for activation in args.activations or ACTIVATIONS:
                    r = step.measure(f"grid-{activation}-{opt_name}", batch, names,
                                     args.rounds, args.steps, args.threads, pool)  # fmt: skip
                    r.update(activation=activation, optimiser=opt_name)
                    r["floor_ms"] = 1e3 * batch / r["samples_per_s"]["floor"]
                    cells.append(r)
                    print(_line(r), flush=True)
                    if args.json:  # after every cell: a long grid cut short keeps its cells
                        _write(args, load_before, bandwidth, update_floor_ms, cells)
    finally:
        for c in pool.values():
            c.close()
    print()
    print(_table(cells))
    if args.json:
        _write(args, load_before, bandwidth, update_floor_ms, cells)
    return 0


def _write(args: argparse.Namespace, load_before: tuple[float, ...], bandwidth: float,
           update_floor_ms: dict[str, float], cells: list[dict[str, Any]]) -> None:  # fmt: skip
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "update_floor_ms": update_floor_ms,
        "cells": cells,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


def _ratio(r: dict[str, Any]) -> str:
    v = r.get("distnet/torch")
    return "-" if v is None else f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"


def _x(r: dict[str, Any], name: str) -> str:
    v = r["x_floor"].get(name)
    return "-" if v is None else f"{v:.2f}"


def _line(r: dict[str, Any]) -> str:
    return (f"batch {r['batch']:<4} {r['optimiser']:<5} {r['activation']:<10} "
            f"distnet/torch {_ratio(r):<19} floor {r['floor_ms']:.1f} ms  time/floor: "
            f"distnet {_x(r, 'distnet')}  in-backward {_x(r, 'distnet-ib')}  "
            f"torch {_x(r, 'torch')}")  # fmt: skip


def _table(cells: list[dict[str, Any]]) -> str:
    """Markdown: one row per cell; speed over PyTorch (>1: distnet faster), time / floor."""
    rows = ["| batch | optimiser | activation | distnet speed / PyTorch | time / floor: distnet "
            "| in-backward | PyTorch |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in cells:
        rows.append(f"| {r['batch']} | {r['optimiser']} | {r['activation']} | {_ratio(r)} | "
                    f"{_x(r, 'distnet')} | {_x(r, 'distnet-ib')} | {_x(r, 'torch')} |")  # fmt: skip
    return "\n".join(rows)
