"""What the numba convolution and pooling kernels share, NCHW (``distnet.kernels.numba_conv``)
and channels-last (``distnet.kernels.numba_conv_nhwc``) alike: their compile options and the
index of a window's tap in the input.

``tap(o, stride, k, dilation)`` is inlined into every kernel (``inline="always"``, at numba's
IR level), where stride and dilation are compile-time constants of the kernel's closure, so
the compiled loops are the ones the expression written out gave. A cached kernel is keyed on
its own file only (numba does not see that a function it calls changed): after changing
anything here, clear the kernels' cache (``distnet.kernels.selection.cache_dir``).
"""

from __future__ import annotations

from numba import njit

# fastmath without nnan/ninf: a NaN must show up in the results as in the numpy path
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

RELU = 2  # distnet.kernels.ACTIVATIONS.index("relu") (checked in tests); else no activation


def compiled(parallel: bool, *, exact: bool = False) -> dict:
    """``njit`` options of a conv kernel: one parallel pass (``prange``) or serial, released
    GIL, cached on disk; fastmath unless ``exact`` (pooling: ``v - v`` must stay NaN for a
    NaN ``v``, and comparisons with NaN must hold as written)."""
    options = {"parallel": parallel, "nogil": True, "cache": True}
    return options if exact else {**options, "fastmath": FASTMATH}


@njit(inline="always")
def tap(o: int, stride: int, k: int, dilation: int) -> int:
    """The input row (or column) that tap ``k`` of the window at output row (column) ``o``
    reads, in the padded input: ``o * stride + k * dilation``."""
    return o * stride + k * dilation
