"""Codes of frozen encoders, written once to a Zarr store, for greedy pretraining.

Pretraining layer k of a stacked autoencoder trains on the codes of the frozen encoders
1..k-1. Computed on the fly (``EncodedLoader``), they are recomputed for every batch of every
epoch; here they are written once per layer into a distnet store under the run directory,
in parallel (rank r encodes and writes chunks r, r + N, ...), and layer k streams them with
the same loader, order and batch split as the inputs (same length and chunking, so the same
samples meet in the same batches). Layer k's store is made from layer k-1's store through
one encoder, so each encoder runs once over the data per stage. Masking noise for denoising
is still drawn per batch, on the codes, by the autoencoder.

A store is reused only when it matches: its ``distnet_codes`` attribute records the layer
and a digest of the frozen encoders' parameters (a resumed run with other weights rewrites
it). ``should_cache`` is the rule that picks this path (see its docstring).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distnet.core.tensor import no_grad
from distnet.data.store import FORMAT_VERSION, Dataset, _open_group, open_dataset
from distnet.nn.layers import as_input


def encoders_digest(model: Any, depth: int) -> str:
    """sha1 of the parameters of encoders 0..depth-1 (what the codes depend on)."""
    h = hashlib.sha1()
    for ae in model.autoencoders[:depth]:
        for p in ae.encoder.parameters():
            h.update(np.ascontiguousarray(p.data).view(np.uint8))
    return h.hexdigest()


def codes_bytes(n_samples: int, width: int) -> int:
    """Bytes of one float32 codes store (uncompressed: sigmoid codes barely compress)."""
    return n_samples * width * 4


def should_cache(epochs: int, n_samples: int, width: int, where: Path, device: str) -> bool:
    """The rule: cache codes when a layer trains more than one epoch (each later epoch
    then skips a forward pass through every frozen encoder), on CPU, and when the store
    fits on disk with room to spare (twice its size free). One epoch gains nothing: the
    codes would be computed once either way, plus a write and a read."""
    if epochs <= 1 or device != "cpu":
        return False
    where = Path(where)
    probe = where if where.exists() else next((p for p in where.parents if p.exists()), None)
    if probe is None:
        return False
    return shutil.disk_usage(probe).free > 2 * codes_bytes(n_samples, width)


def shared_by_all_ranks(directory: Path, comm: Any) -> bool:
    """Collective: whether every rank sees ``directory`` as the same place (a shared file
    system), by a marker file rank 0 writes there. Node-local run directories are not: the
    codes store written by every rank (each its own chunks) would be torn across nodes."""
    if comm.size == 1:
        return True
    marker = None
    if comm.rank == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        marker = Path(directory) / f".distnet-shared-{secrets.token_hex(8)}"
        marker.write_text("")
    name = comm.allgather(None if marker is None else marker.name)[0]
    seen = comm.allgather((Path(directory) / name).exists())
    if marker is not None:
        comm.barrier()
        marker.unlink(missing_ok=True)
    else:
        comm.barrier()
    return all(seen)


def _matches(path: Path, layer: int, digest: str, n: int) -> bool:
    try:
        ds = open_dataset(str(path))
    except Exception:
        return False
    info = ds.attrs.get("distnet_codes") or {}
    return info.get("layer") == layer and info.get("digest") == digest and len(ds) == n


def write_codes(
    model: Any,
    layer: int,
    source: Dataset,
    path: Path,
    comm: Any,
    transform: Any = None,
    from_layer: int = 0,
) -> Dataset:
    """Collective: writes the codes of encoders ``from_layer..layer-1`` of ``source`` (whose
    samples are the codes of encoders 0..from_layer-1, or inputs when 0) into a store at
    ``path``; returns it opened. Shapes: source x (N, ...) -> codes (N, h_layer).

    Every rank encodes and writes its own chunks; rank 0 creates the arrays first and marks
    the store finished last (``distnet_format``), so a store cut short is never reused.
    """
    import zarr  # noqa: PLC0415

    n, width = len(source), int(model.layer_sizes[layer])
    digest = encoders_digest(model, layer)
    path = Path(path)
    if comm.rank == 0 and not _matches(path, layer, digest, n):
        group = _open_group(str(path), "w", None)
        group.create_array("x", shape=(n, width), chunks=(source.chunk_samples, width),
                           dtype=np.float32, compressors=None,
                           config={"write_empty_chunks": True})  # fmt: skip
    comm.barrier()
    if _matches(path, layer, digest, n):  # a finished store from an earlier (resumed) run
        return open_dataset(str(path))
    x_out = zarr.open_group(str(path), mode="r+")["x"]
    dtype = model.output.weight.dtype
    for i in range(comm.rank, source.num_chunks, comm.size):
        xb, _ = source.read_chunk(i)
        h = source.to_float(xb)
        if transform is not None:
            h = transform(h)
        with no_grad():
            t = as_input(h, dtype)
            for ae in model.autoencoders[from_layer:layer]:
                t = ae.encoder(t)
        start, stop = source.chunk_bounds(i)
        x_out[start:stop] = np.asarray(t.data, dtype=np.float32)
    comm.barrier()
    if comm.rank == 0:
        group = _open_group(str(path), "r+", None)
        group.attrs.update({
            "scale": 1.0, "offset": 0.0, "split": source.split, "num_classes": None,
            "distnet_codes": {"layer": layer, "digest": digest, "source": source.path},
            "distnet_format": FORMAT_VERSION,
        })  # fmt: skip
    comm.barrier()
    return open_dataset(str(path))


class CodesCache:
    """Per-layer codes stores under ``root`` for one pretraining run (see module docstring).

    Args:
        model: a StackedAutoEncoder.
        train: the input store; ``transform`` maps its float batches to (n, n_in).
        root: folder for the stores (``<run out>/codes``).
        comm: the job's communicator (every method here is collective).
    """

    def __init__(self, model: Any, train: Dataset, root: Path, comm: Any, transform: Any = None):
        self.model, self.train, self.root = model, train, Path(root)
        self.comm, self.transform = comm, transform
        self._stores: dict[int, Dataset] = {}

    def store(self, layer: int) -> Dataset:
        """Collective: the codes store that layer ``layer`` (>= 1) pretrains on."""
        if layer < 1:
            raise ValueError(f"layer {layer}: layer 0 trains on the inputs themselves")
        prev = self._stores.get(layer - 1)
        if prev is not None and prev.attrs["distnet_codes"]["digest"] != encoders_digest(
            self.model, layer - 1
        ):
            prev = None  # encoders changed since: start again from the inputs
        source, start, transform = (
            (prev, layer - 1, None) if prev else (self.train, 0, self.transform)
        )
        ds = write_codes(self.model, layer, source, self.root / f"layer{layer}", self.comm,
                         transform, start)  # fmt: skip
        self._stores[layer] = ds
        return ds
