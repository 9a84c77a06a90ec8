"""Checkpoints: a directory with ``.npz`` arrays (never pickle) and a JSON manifest.

Layout of ``path/``:
    manifest.json        the commit record: format, step, stage, optimiser scalars, loader
                         state, RNG state, user extras, and the name of the arrays file
    arrays-<token>.npz   model parameters and buffers (``model/<name>``), optimiser state
                         arrays (``optimizer/<name>``), array extras (``extra/<name>``)

Both files are written under temporary names, flushed to disk, and renamed; the manifest is
renamed last, and only then is the previous arrays file deleted. A crash at any point leaves
the old manifest pointing at the old, complete arrays (or, for a first save, no manifest, so
the directory does not count as a checkpoint): never a half-written checkpoint as the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from distnet import backend, trace

FORMAT = "distnet-checkpoint/1"
MANIFEST = "manifest.json"
# manifest key -> the JSON types it may hold (a manifest edited into anything else is refused)
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "arrays": (str,),
    "arrays_sha256": (str,),
    "model_class": (str,),
    "optimizer_class": (str, type(None)),
    "optimizer": (dict, type(None)),
    "loader": (dict, type(None)),
    "rng": (dict, type(None)),
    "extra": (dict,),
}


class CheckpointError(ValueError):
    """A checkpoint that is damaged, tampered with, or does not fit what loads it (names the
    checkpoint and the key)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_write(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_class(optimizer: Any) -> str:
    """The update rule doing the updates (``algorithm()`` of the loop's protocol: a
    DistributedOptimizer over SGD says SGD, as do ZeRO's gathered state and the Ray engine's
    wrappers), so that a run saved on N ranks resumes on M, or in one process. Anything else
    with a ``state_dict()`` is named by its class."""
    from distnet.optim import LoopProtocol  # noqa: PLC0415  (train imports lazily)

    if isinstance(optimizer, LoopProtocol):
        return optimizer.algorithm()
    return type(optimizer).__name__


def _split_extras(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    scalars, arrays = {}, {}
    for k, v in extra.items():
        if isinstance(v, np.ndarray) or backend.is_gpu_array(v):
            arrays[f"extra/{k}"] = backend.to_device(v, "cpu")
        else:
            scalars[k] = v
    return scalars, arrays


def save_checkpoint(
    path: str | os.PathLike,
    model: Any,
    optimizer: Any = None,
    *,
    loader: Any = None,
    rng: bool = True,
    **extra: Any,
) -> Path:
    """Writes a checkpoint of ``model`` (and ``optimizer``, ``loader``, RNG state) atomically.

    Args:
        path: the checkpoint directory (created; an earlier checkpoint there is replaced).
        optimizer: anything with ``state_dict()``: array values go to the npz, the rest to
            the manifest.
        loader: anything with ``state_dict()`` returning JSON values (``StreamLoader``).
        rng: record ``distnet.backend``'s generator state (corruption noise, dropout).
        **extra: JSON values (``step``, ``stage``, ``epoch``, ...) or arrays, returned by
            ``load_checkpoint``.
    Returns:
        the directory.
    """
    with trace.span("checkpoint", path=str(path)):
        return _save_checkpoint(Path(path), model, optimizer, loader, rng, extra)


def _save_checkpoint(
    path: Path, model: Any, optimizer: Any, loader: Any, rng: bool, extra: dict[str, Any]
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim_scalars: dict[str, Any] | None = None
    if optimizer is not None:
        optim_scalars = {}
        for k, v in optimizer.state_dict().items():
            if isinstance(v, np.ndarray) or backend.is_gpu_array(v):
                arrays[f"optimizer/{k}"] = backend.to_device(v, "cpu")
            else:
                optim_scalars[k] = v
    scalars, extra_arrays = _split_extras(extra)
    arrays.update(extra_arrays)

    token = secrets.token_hex(6)
    arrays_name = f"arrays-{token}.npz"
    manifest = {
        "format": FORMAT,
        "arrays": arrays_name,
        "model_class": type(model).__name__,
        "optimizer_class": _optimizer_class(optimizer) if optimizer is not None else None,
        "optimizer": optim_scalars,
        "loader": loader.state_dict() if loader is not None else None,
        "rng": backend.default_rng().bit_generator.state if rng else None,
        "extra": scalars,
    }
    tmp_arrays = path / f".{arrays_name}.tmp"
    _fsync_write(tmp_arrays, lambda f: np.savez(f, **arrays))
    manifest["arrays_sha256"] = _sha256(tmp_arrays)  # load refuses arrays that differ
    os.replace(tmp_arrays, path / arrays_name)
    tmp_manifest = path / f".{MANIFEST}.{token}.tmp"
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _fsync_write(tmp_manifest, lambda f: f.write(text))
    os.replace(tmp_manifest, path / MANIFEST)  # the commit point
    _fsync_dir(path)
    # the previous arrays, and any orphans and temporaries of an earlier crashed save
    # (one writer per checkpoint directory: rank 0)
    for stale in [*path.glob("arrays-*.npz"), *path.glob(".*.tmp")]:
        if stale.name != arrays_name:
            stale.unlink(missing_ok=True)
    return path


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a committed checkpoint (manifest and its arrays file)."""
    manifest = _read_manifest(Path(path))
    if manifest is None or not isinstance(manifest.get("arrays"), str):
        return False
    return (Path(path) / Path(manifest["arrays"]).name).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint (no arrays loaded), its keys' types checked."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: no complete checkpoint (missing or never committed)")
    manifest = _read_manifest(Path(path))
    assert manifest is not None
    for key, types in _MANIFEST_TYPES.items():
        if key == "arrays_sha256" and key not in manifest:
            continue  # written before checksums were recorded
        if key not in manifest:
            raise CheckpointError(f"{path}/{MANIFEST}: key {key!r} is missing")
        if not isinstance(manifest[key], types):
            got = type(manifest[key]).__name__
            raise CheckpointError(f"{path}/{MANIFEST}: key {key!r} has a {got} value")
    if Path(manifest["arrays"]).name != manifest["arrays"]:
        raise CheckpointError(f"{path}/{MANIFEST}: 'arrays' must name a file in the checkpoint")
    return manifest


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently committed complete checkpoint directory under ``root`` (or itself)."""
    root = Path(root)
    candidates = [root, *(p for p in root.glob("*") if p.is_dir())] if root.is_dir() else []
    complete = [p for p in candidates if is_complete(p)]
    return max(complete, key=lambda p: (p / MANIFEST).stat().st_mtime_ns, default=None)


def _read_files(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(manifest, arrays) from disk, checksum and types checked; None when not complete."""
    if not is_complete(path):
        return None
    manifest = read_manifest(path)
    arrays_path = path / manifest["arrays"]
    if "arrays_sha256" in manifest and _sha256(arrays_path) != manifest["arrays_sha256"]:
        raise CheckpointError(
            f"{arrays_path}: contents differ from the manifest's sha256 (corrupt or tampered)"
        )
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as e:  # never unpickles: object arrays refused
        raise CheckpointError(f"{arrays_path}: cannot read: {e}") from None
    return manifest, arrays


def read_checkpoint(
    path: str | os.PathLike, comm: Any = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(manifest, arrays by name) of the checkpoint at ``path``, or None when there is none.

    With a communicator of several ranks, rank 0 alone reads the files and broadcasts what
    it read (Horovod's ``broadcast_parameters`` / ``broadcast_optimizer_state``): the manifest
    as one object, each array as a buffer broadcast. The other ranks' ``path`` may be
    node-local and empty; every rank returns rank 0's checkpoint, so all resume at the
    same stage, epoch and step. Collective then: every rank must call it.
    """
    path = Path(path)
    if comm is None or comm.size == 1:
        return _read_files(path)
    found: Any = None
    header: Any = None
    if comm.rank == 0:
        try:
            with comm.working("reading a checkpoint"):  # the others wait in the broadcast
                found = _read_files(path)
        except Exception as exc:  # noqa: BLE001  (the other ranks must hear of it, not hang)
            found = exc
        if isinstance(found, Exception):
            header = ("error", f"{type(found).__name__}: {found}")
        elif found is not None:
            manifest, arrays = found
            header = ("ok", manifest, [(k, a.shape, a.dtype.str) for k, a in arrays.items()])
    header = comm.broadcast_object(header, root=0)
    if header is None:
        return None
    if header[0] == "error":
        if comm.rank == 0:
            raise found
        raise CheckpointError(f"{path}: rank 0 could not read the checkpoint: {header[1]}")
    _, manifest, specs = header
    arrays = found[1] if comm.rank == 0 else {}
    for name, shape, dtype in specs:
        buf = arrays[name] if comm.rank == 0 else np.empty(shape, dtype=np.dtype(dtype))
        buf = np.asarray(buf, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        comm.broadcast(buf.reshape(-1).view(np.uint8), root=0)  # bytes: any dtype, 0-d too
        arrays[name] = buf
    return manifest, arrays


def load_checkpoint(
    path: str | os.PathLike,
    model: Any = None,
    optimizer: Any = None,
    *,
    loader: Any = None,
    restore_rng: bool = True,
    comm: Any = None,
) -> dict[str, Any]:
    """Restores what ``save_checkpoint`` wrote into ``model`` / ``optimizer`` / ``loader``.

    ``comm``: in a distributed run, rank 0 reads and broadcasts (see ``read_checkpoint``);
    every rank must call it then, and no rank but 0 needs the files.

    Returns:
        the extras (``step``, ``stage``, ``epoch``, array extras, ...) plus ``"manifest"``.
    Raises:
        FileNotFoundError: no complete checkpoint at ``path`` (on rank 0).
        CheckpointError: a damaged or tampered checkpoint (checksum, manifest types), or one
            that does not fit the model / optimiser / loader (names the keys).
    """
    found = read_checkpoint(path, comm)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (missing or never committed)")
    return apply_checkpoint(path, *found, model, optimizer, loader=loader, restore_rng=restore_rng)


def apply_checkpoint(
    path: str | os.PathLike,
    manifest: dict[str, Any],
    arrays: dict[str, np.ndarray],
    model: Any = None,
    optimizer: Any = None,
    *,
    loader: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """``load_checkpoint`` on what ``read_checkpoint`` returned; same returns and errors."""
    try:
        if model is not None:
            state = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
            model.load_state_dict(state)
        if optimizer is not None:
            if manifest["optimizer"] is None:
                raise CheckpointError(f"{path}: the checkpoint holds no optimiser state")
            if manifest["optimizer_class"] != _optimizer_class(optimizer):
                raise CheckpointError(
                    f"{path}: optimiser state of {manifest['optimizer_class']}, "
                    f"loading into {_optimizer_class(optimizer)}"
                )
            state = dict(manifest["optimizer"])
            state.update({k[10:]: v for k, v in arrays.items() if k.startswith("optimizer/")})
            from distnet.optim.protocol import BATCH_SPLIT_KEY  # noqa: PLC0415

            if not optimizer.takes_batch_split:
                state.pop(BATCH_SPLIT_KEY, None)  # how ranks split a batch: not the update's
            optimizer.load_state_dict(state)
        if loader is not None and manifest["loader"] is not None:
            loader.load_state_dict(manifest["loader"])
        if restore_rng and manifest["rng"] is not None:
            backend.default_rng().bit_generator.state = manifest["rng"]
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, OverflowError) as e:  # shapes, names, classes, ranges
        raise CheckpointError(f"{path}: does not fit what loads it: {e}") from None
    out = dict(manifest["extra"])
    out.update({k[6:]: v for k, v in arrays.items() if k.startswith("extra/")})
    out["manifest"] = manifest
    return out
