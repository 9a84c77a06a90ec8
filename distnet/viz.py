"""Pictures of what a network learned: filter grids and inputs beside their reconstructions.

Images are assembled as arrays and written pixel-exact: grey ones as 8-bit PNGs with Pillow,
coloured ones with matplotlib's Agg backend (both imported lazily: only code that draws pays).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from distnet import backend


def _tile(images: np.ndarray, ncols: int, pad: int) -> np.ndarray:
    """(n, h, w) images in [0, 1] -> one (rows*(h+pad)+pad, cols*(w+pad)+pad) grid."""
    n, h, w = images.shape
    rows = math.ceil(n / ncols)
    grid = np.ones((rows * (h + pad) + pad, ncols * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def _upscale(pixels: np.ndarray, scale: int) -> np.ndarray:
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels


def _save(grid: np.ndarray, path: str | os.PathLike, cmap: str, scale: int) -> tuple[int, int]:
    """Writes the grid as a PNG, each value a ``scale`` x ``scale`` block. Returns (h, w) px."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if cmap == "gray":
        # 8-bit grey straight to PNG: a 1000-filter grid of 28x28 tiles (3716 px square) took
        # 1.6 s through matplotlib's colormap and RGBA; this way a tenth of that
        from PIL import Image  # noqa: PLC0415  (Pillow comes with matplotlib)

        pixels = _upscale(np.rint(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8), scale)
        Image.fromarray(pixels, mode="L").save(path, format="png", compress_level=1)
        return pixels.shape  # type: ignore[return-value]
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    from matplotlib import image  # noqa: PLC0415

    grid = _upscale(grid, scale)
    image.imsave(path, grid, cmap=cmap, vmin=0.0, vmax=1.0, format="png")
    return grid.shape  # type: ignore[return-value]


def grey_tiles(
    images: np.ndarray, path: str | os.PathLike, ncols: int, pad: int = 1, scale: int = 4
) -> tuple[int, int]:
    """Writes (n, h, w) images, values clipped to [0, 1], as one grey PNG grid of ``ncols``
    tiles a row, each value a ``scale`` x ``scale`` block. Returns (height, width) in px."""
    return _save(_tile(np.clip(images, 0.0, 1.0), ncols, pad), path, "gray", scale)


def normalised_filters(weights: Any) -> np.ndarray:
    """Each hidden unit's input that maximally activates it under ||x||_2 <= 1.

    Shapes: weights (n_in, n_hidden) -> (n_hidden, n_in); row j is W[:, j] / ||W[:, j]||
    (the seed lectures' x_j = W_ij / sqrt(sum_j W_ij^2), by Cauchy-Schwarz).
    """
    w = np.asarray(backend.to_device(getattr(weights, "data", weights), "cpu"), np.float64)
    if w.ndim != 2:
        raise ValueError(f"normalised_filters: weights must be (n_in, n_hidden), got {w.shape}")
    norms = np.sqrt((w * w).sum(axis=0))
    return (w / np.where(norms > 0, norms, 1.0)).T


def filter_grid(
    weights: Any,
    image_shape: tuple[int, int],
    path: str | os.PathLike,
    ncols: int | None = None,
    pad: int = 1,
    scale: int = 4,
    cmap: str = "gray",
) -> tuple[int, int]:
    """Writes a PNG grid of the first layer's filters (one tile per hidden unit).

    Args:
        weights: (n_in, n_hidden) with n_in = h * w of ``image_shape``.
        ncols: tiles per row (default: about square). Each tile is contrast-stretched to
            [0, 1] on its own, so mid-grey is zero weight only when the tile is symmetric.
        scale: pixels per weight, so 8x8 digits stay visible.
    Returns:
        (height, width) of the PNG in pixels.
    """
    h, w = image_shape
    filters = normalised_filters(weights)
    if filters.shape[1] != h * w:
        raise ValueError(f"filter_grid: {filters.shape[1]} inputs do not form {image_shape}")
    lo = filters.min(axis=1, keepdims=True)
    span = filters.max(axis=1, keepdims=True) - lo
    tiles = ((filters - lo) / np.where(span > 0, span, 1.0)).reshape(-1, h, w)
    ncols = ncols or math.ceil(math.sqrt(len(tiles)))
    return _save(_tile(tiles, ncols, pad), path, cmap, scale)


def reconstruction_grid(
    x: Any,
    x_hat: Any,
    image_shape: tuple[int, int],
    path: str | os.PathLike,
    n: int = 16,
    pad: int = 1,
    scale: int = 4,
    cmap: str = "gray",
) -> tuple[int, int]:
    """Writes a PNG with the first ``n`` inputs (top row) above their reconstructions.

    Shapes: x, x_hat (N, h * w), values in [0, 1] (clipped). Returns (height, width) in pixels.
    """
    x = np.asarray(backend.to_device(getattr(x, "data", x), "cpu"), np.float64)
    x_hat = np.asarray(backend.to_device(getattr(x_hat, "data", x_hat), "cpu"), np.float64)
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction_grid: x {x.shape} and x_hat {x_hat.shape} differ")
    n = min(n, len(x))
    pairs = np.concatenate([x[:n], x_hat[:n]]).reshape(2 * n, *image_shape)
    return _save(_tile(np.clip(pairs, 0.0, 1.0), n, pad), path, cmap, scale)


def conv_filter_grid(
    weight: Any, path: str | os.PathLike, ncols: int | None = None, scale: int = 8
) -> tuple[int, int]:
    """Writes a PNG grid of a convolution's kernels, one tile per output channel.

    Shapes: weight (O, C, KH, KW); with C > 1 input channels each tile shows channel 0 (the
    first layer of an image network has C = 1 or 3). Tiles are normalised as in
    ``filter_grid`` (the unit-norm input that excites the channel most).
    """
    w = np.asarray(backend.to_device(getattr(weight, "data", weight), "cpu"), np.float64)
    if w.ndim != 4:
        raise ValueError(f"conv_filter_grid: weight must be (O, C, KH, KW), got {w.shape}")
    o, _, kh, kw = w.shape
    return filter_grid(w[:, 0].reshape(o, kh * kw).T, (kh, kw), path, ncols, scale=scale)


def feature_map_grid(
    maps: Any, path: str | os.PathLike, ncols: int | None = None, scale: int = 4
) -> tuple[int, int]:
    """Writes a PNG grid of feature maps (n, H, W), each contrast-stretched to [0, 1]."""
    m = np.asarray(backend.to_device(getattr(maps, "data", maps), "cpu"), np.float64)
    if m.ndim != 3:
        raise ValueError(f"feature_map_grid: maps must be (n, H, W), got {m.shape}")
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    tiles = (m - lo) / np.where(span > 0, span, 1.0)
    ncols = ncols or math.ceil(math.sqrt(len(tiles)))
    return _save(_tile(tiles, ncols, 1), path, "gray", scale)
