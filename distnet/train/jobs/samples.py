"""A store's samples as the models take them (flat vectors for dense models, (N, C, H, W)
images for convolutions), and pictures of what a model's first layer learnt from them
(``filters.png``, ``reconstructions.png`` in the run directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "as_images",
    "draw_pictures",
    "flatten",
    "image_shape",
    "read_store",
    "sample_image_shape",
]


def read_store(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole (small) store as float32 x (N, features) and labels y (N,), for evaluation."""
    from distnet.data import open_dataset  # noqa: PLC0415

    ds = open_dataset(path)
    xs, ys = zip(*(ds.read_chunk(i) for i in range(ds.num_chunks)), strict=True)
    return flatten(ds.to_float(np.concatenate(xs))), np.concatenate(ys)


def flatten(x: np.ndarray) -> np.ndarray:
    """(N, 28, 28) images -> (N, 784): dense models take one feature vector per sample."""
    return x.reshape(len(x), -1)


def sample_image_shape(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(C, H, W) of a store's samples: (H, W) images get one channel; None when not images."""
    if len(shape) == 2:
        return (1, *shape)
    return tuple(shape) if len(shape) == 3 else None  # type: ignore[return-value]


def as_images(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, C, H, W) unchanged: what convolutions take."""
    return x[:, None] if x.ndim == 3 else x


def image_shape(n_in: int) -> tuple[int, int] | None:
    """(side, side) when inputs of width ``n_in`` are square images (8x8 digits, 28x28)."""
    side = int(round(n_in**0.5))
    return (side, side) if side * side == n_in else None


def draw_pictures(
    model: Any, x: np.ndarray, out: Path, suffix: str = "", reconstructions: bool = True
) -> dict[str, str]:
    """filters{suffix}.png of the first layer (each unit's normalised weights) and, for an
    autoencoder, reconstructions{suffix}.png of the first 16 samples of ``x``."""
    from distnet.viz import conv_filter_grid, filter_grid, reconstruction_grid  # noqa: PLC0415

    if x.ndim == 4:  # a cnn: its first convolution's kernels
        path = str(out / f"filters{suffix}.png")
        conv_filter_grid(model[0].weight.data, path)
        return {"filters" + suffix: path}
    shape = image_shape(x.shape[1])
    if shape is None:
        return {}
    first = model.autoencoders[0] if hasattr(model, "autoencoders") else model[0]
    weight = first.encoder.weight if hasattr(first, "encoder") else first.weight
    pictures = {"filters" + suffix: str(out / f"filters{suffix}.png")}
    filter_grid(weight.data, shape, pictures["filters" + suffix])
    if reconstructions and hasattr(first, "encoder"):
        from distnet.nn.module import on_device_of  # noqa: PLC0415

        with first.evaluating():  # no masking noise; host samples go to the model's device
            x_hat = first(on_device_of(first, x[:16])).data
        pictures["reconstructions" + suffix] = str(out / f"reconstructions{suffix}.png")
        reconstruction_grid(x[:16], x_hat, shape, pictures["reconstructions" + suffix])
    return pictures
