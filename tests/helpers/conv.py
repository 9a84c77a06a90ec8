"""What the convolution tests share: the direct definition of cross-correlation that every
route (im2col, numba, oneDNN, channels-last) must meet, and the cases they all run."""

from __future__ import annotations

import numpy as np

from distnet.core.tensor import Tensor


def leaf(rng: np.random.Generator, *shape: int) -> Tensor:
    """A float64 tensor of standard normals that requires grad."""
    return Tensor(rng.standard_normal(shape), requires_grad=True)


def reference_conv(x, w, b, stride, padding, dilation):
    """Direct six-loop definition of cross-correlation, the spec the op must meet."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                       j * sw : j * sw + dw * (kw - 1) + 1 : dw]  # fmt: skip
            out[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w) + b
    return out


CONV_CASES = [  # (N, C, H, W), (O, KH, KW), stride, padding, dilation
    ((2, 3, 5, 6), (2, 3, 3), (1, 1), (0, 0), (1, 1)),
    ((1, 2, 7, 5), (3, 3, 2), (2, 1), (1, 2), (1, 1)),  # non-square everything
    ((2, 1, 8, 7), (2, 3, 3), (1, 1), (0, 0), (2, 2)),  # dilation
    ((1, 2, 6, 6), (2, 2, 2), (3, 3), (1, 1), (1, 1)),  # stride > kernel: pixels skipped
    ((1, 1, 4, 4), (1, 4, 4), (1, 1), (0, 0), (1, 1)),  # kernel = input: one output pixel
    ((1, 2, 5, 5), (2, 3, 3), (2, 2), (2, 2), (2, 1)),  # padding wider than the dilated reach
]
