"""2-D convolution and pooling (NCHW) with gradients, by im2col and one GEMM per layer.

``im2col`` is a strided view of the padded input (no copy until the GEMM needs the columns
contiguous); ``col2im`` adds the column gradients back by looping over the kernel offsets, each
offset one strided slice add (no ``np.add.at``). The same code runs on numpy and cupy (both
have ``as_strided``); it is how Caffe computed convolutions: a convolution is one matrix
product once the windows are laid out as rows. On CPU, when ``distnet.kernels`` has numba
and the arrays are large enough, im2col, col2im, max pooling and the elementwise passes
around the GEMMs run as parallel compiled kernels instead (``distnet.kernels.numba_conv``): the
same numbers, without numpy's per-row loop overhead on rows of OW elements.

Shapes: input (N, C, H, W); weight (O, C, KH, KW); output (N, O, OH, OW) with
``OH = (H + 2 ph - dh (KH - 1) - 1) // sh + 1`` (likewise OW).
"""

from __future__ import annotations

from typing import Any

from distnet import backend, kernels
from distnet.core import channels_last, conv_onednn, ops
from distnet.core.functional import FUSED_ACTIVATIONS
from distnet.core.tensor import WRITTEN, Tensor, make_result
from distnet.kernels import gemm, selection

Pair = int | tuple[int, int]


def pair(value: Pair, what: str, op: str, minimum: int) -> tuple[int, int]:
    """``value`` as (height, width); a clear error when it is not one or two ints >= minimum."""
    pair_ = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair_) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair_):
        raise ValueError(f"{op}: {what} must be an int or two ints >= {minimum}, got {value!r}")
    return pair_  # type: ignore[return-value]


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Number of window positions along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pad(x: Any, ph: int, pw: int, value: float = 0.0) -> Any:
    if ph == 0 and pw == 0:
        return x
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * ph, w + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out


def windows(
    x: Any, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> Any:
    """A read-only strided view (N, C, OH, OW, KH, KW) of the windows of padded ``x``."""
    xp = backend.array_module(x)
    as_strided = _as_strided(xp)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = output_size(h, kh, sh, 0, dh), output_size(w, kw, sw, 0, dw)
    s0, s1, s2, s3 = x.strides
    return as_strided(
        x, shape=(n, c, oh, ow, kh, kw), strides=(s0, s1, s2 * sh, s3 * sw, s2 * dh, s3 * dw)
    )


def _as_strided(xp: Any) -> Any:
    if xp.__name__ == "numpy":
        from numpy.lib.stride_tricks import as_strided  # noqa: PLC0415

        return as_strided
    from cupy.lib.stride_tricks import as_strided  # noqa: PLC0415

    return as_strided


def im2col(
    x: Any,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Any:
    """Columns (C * KH * KW, N * OH * OW) of ``x`` (N, C, H, W), kernel-major: column
    (n, oh, ow) is the window under output pixel (oh, ow) of sample n, in the weight's
    (C, KH, KW) order. One copy out of a strided view of the padded input."""
    xp = backend.array_module(x)
    xpad = _pad(x, *padding)
    view = windows(xpad, kernel, stride, dilation)  # (N, C, OH, OW, KH, KW)
    n, c, oh, ow, kh, kw = view.shape
    cols = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    compiled = selection.conv_kernels(xpad)
    if compiled is not None:  # one parallel pass, the geometry compiled in
        compiled.im2col(kh, kw, *stride, *dilation)(xpad, cols)
    else:
        cols[...] = view.transpose(1, 4, 5, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im_add(
    target: Any, values: Any, stride: tuple[int, int], dilation: tuple[int, int]
) -> None:
    """Adds column gradients ``values`` (C, KH, KW, N, OH, OW) into ``target`` (N, C, Hp, Wp)
    at the windows' places: one strided slice add per kernel offset (no ``add.at``). The
    kernel-major layout makes each offset's source (C, N, OH, OW) one contiguous block."""
    c, kh, kw, n, oh, ow = values.shape
    (sh, sw), (dh, dw) = stride, dilation
    channels_first = target.transpose(1, 0, 2, 3)  # a view: (C, N, Hp, Wp)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            channels_first[:, :, rows, cols] += values[:, i, j]


def _unpad(x: Any, ph: int, pw: int) -> Any:
    h, w = x.shape[2] - 2 * ph, x.shape[3] - 2 * pw
    return x[:, :, ph : ph + h, pw : pw + w] if ph or pw else x


def _check_input(
    op: str,
    x: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"{op}: input must be (N, C, H, W), got shape {x.shape}")
    oh = output_size(x.shape[2], kernel[0], stride[0], padding[0], dilation[0])
    ow = output_size(x.shape[3], kernel[1], stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{op}: input {x.shape[2]}x{x.shape[3]} is smaller than the kernel "
            f"{kernel[0]}x{kernel[1]} (padding {padding}, dilation {dilation})"
        )
    return oh, ow


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
    activation: str | None = None,
) -> Tensor:
    """2-D cross-correlation (what deep-learning libraries call convolution), groups = 1.

    Shapes: x (N, C, H, W), weight (O, C, KH, KW), bias (O,) -> (N, O, OH, OW).
    ``activation`` ('relu', 'tanh', 'sigmoid') is applied in place on the GEMM's output, as
    in ``linear``: no pre-activation array is kept, the output gives the derivative.
    """
    if activation is not None and activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"conv2d: activation {activation!r} cannot be fused; "
                         f"one of {sorted(FUSED_ACTIVATIONS)}")  # fmt: skip
    ops.check_same_kind("conv2d", x, weight)
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be (O, C, KH, KW), got shape {weight.shape}")
    o, c, kh, kw = weight.shape
    stride_ = pair(stride, "stride", "conv2d", 1)
    padding_ = pair(padding, "padding", "conv2d", 0)
    dilation_ = pair(dilation, "dilation", "conv2d", 1)
    oh, ow = _check_input("conv2d", x, (kh, kw), stride_, padding_, dilation_)
    if x.shape[1] != c:
        raise ValueError(
            f"conv2d: input has {x.shape[1]} channels {x.shape}, the weight "
            f"{weight.shape} expects {c}"
        )
    if bias is not None:
        ops.check_same_kind("conv2d", weight, bias)
        if bias.shape != (o,):
            raise ValueError(f"conv2d: bias {bias.shape} does not fit weight {weight.shape}")
    dnnl = selection.onednn_conv(x.data, weight.data)
    if dnnl is not None:  # CPU float32 with the [onednn] extra (see conv_onednn)
        out = conv_onednn.conv2d(dnnl, x, weight, bias, stride_, padding_, dilation_,
                                 activation, (oh, ow))  # fmt: skip
        if out is not None:
            return out
    nhwc_kernels = selection.channels_last_kernels(x.data)
    if nhwc_kernels is not None:  # CPU with numba: NHWC memory inside (see channels_last)
        return channels_last.conv2d(nhwc_kernels, x, weight, bias, stride_, padding_,
                                    dilation_, activation, (oh, ow))  # fmt: skip
    n = x.shape[0]
    xp = backend.array_module(x.data)
    cols = im2col(x.data, (kh, kw), stride_, padding_, dilation_)  # (C*KH*KW, N*OH*OW)
    w2 = weight.data.reshape(o, c * kh * kw)
    out2 = gemm.matmul(w2, cols)  # (O, N*OH*OW): one GEMM
    # back to NCHW in one pass that also adds the bias; the activation then runs in place
    out = xp.empty((n, o, oh, ow), dtype=out2.dtype)
    # ReLU (or none) fuses into the compiled pass; tanh/sigmoid keep numpy's SIMD tanh
    relu_kind = kernels.ACTIVATIONS.index("relu") if activation == "relu" else -1
    fusable = activation in (None, "relu")
    b = bias.data if bias is not None else xp.zeros(o, dtype=out2.dtype)
    compiled = selection.conv_kernels(out2, b) if fusable else None
    if compiled is not None:
        compiled.gemm_to_nchw(out2, b, out.reshape(n, o, oh * ow), relu_kind)
    else:
        by_sample = out2.reshape(o, n, oh, ow).transpose(1, 0, 2, 3)
        xp.add(by_sample, b[:, None, None], out=out)
        del by_sample
        if activation is not None:
            kernels.bias_activation_(out, None, activation)
    del out2

    def backward(g: Any) -> tuple[Any, ...]:
        compiled = selection.conv_kernels(out, g) if fusable else None
        if compiled is not None:  # d act / dz and the (O, N*OH*OW) layout in one pass
            g2 = xp.empty((o, n * oh * ow), dtype=g.dtype)
            compiled.nchw_to_gemm_grad(out.reshape(n, o, -1), g.reshape(n, o, -1), g2, relu_kind)
        else:
            if activation is not None:  # d act / dz from the output, into a fresh array
                g = kernels.activation_grad(activation, out, g)
            g2 = xp.ascontiguousarray(g.transpose(1, 0, 2, 3)).reshape(o, n * oh * ow)
        gx = gw = gb = None
        if weight.requires_grad:  # straight into the flat buffer when it holds zeros
            # cols @ g2^T, transposed after: OpenBLAS runs the long inner dimension (N OH OW)
            # faster this way round (measured 3.1 vs 4.5 ms for conv 16->32 5x5, batch 128)
            gw_t = gemm.matmul(cols, g2.T)  # (C*KH*KW, O)
            target = weight.grad_target()
            if target is None:
                gw = xp.ascontiguousarray(gw_t.T).reshape(weight.shape)
            else:
                target.reshape(o, c * kh * kw)[...] = gw_t.T
                gw = WRITTEN
        if bias is not None and bias.requires_grad:
            target = bias.grad_target()
            if target is None:
                gb = g2.sum(axis=1)
            else:
                g2.sum(axis=1, out=target)
                gb = WRITTEN
        if x.requires_grad:
            gcols = gemm.matmul(w2.T, g2).reshape(c, kh, kw, n, oh, ow)  # kernel-major columns
            ph, pw = padding_
            padded = (n, c, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
            compiled = selection.conv_kernels(gcols)
            if compiled is not None:  # one pass per sample-channel plane, no zero-fill
                gpad = xp.empty(padded, dtype=gcols.dtype)
                compiled.col2im(kh, kw, *stride_, *dilation_)(gcols, gpad)
            else:
                gpad = xp.zeros(padded, dtype=g.dtype)
                col2im_add(gpad, gcols, stride_, dilation_)
            gx = _unpad(gpad, ph, pw)
        return (gx, gw, gb) if bias is not None else (gx, gw)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_result(out, parents, backward, "conv2d")


def max_pool2d(x: Tensor, kernel: Pair, stride: Pair | None = None, padding: Pair = 0) -> Tensor:
    """Maximum over each window (padding counts as -inf). Ties share the gradient equally
    (like ``Tensor.max``: a valid subgradient; central differences measure it for a pair).

    Shapes: x (N, C, H, W) -> (N, C, OH, OW); stride defaults to the kernel.
    """
    kernel_, stride_, padding_ = _pool_arguments("max_pool2d", x, kernel, stride, padding)
    xp = backend.array_module(x.data)
    if padding_ == (0, 0) and not x.data.flags.c_contiguous:  # channels last: keep it so
        nhwc_kernels = selection.channels_last_kernels(x.data)
        if nhwc_kernels is not None and channels_last.is_channels_last(x.data):
            oh = output_size(x.shape[2], kernel_[0], stride_[0], 0, 1)
            ow = output_size(x.shape[3], kernel_[1], stride_[1], 0, 1)
            return channels_last.max_pool2d(nhwc_kernels, x, kernel_, stride_, (oh, ow))
    compiled = selection.conv_kernels(x.data) if padding_ == (0, 0) else None
    if compiled is not None:
        return _max_pool2d_compiled(compiled, x, kernel_, stride_)
    xpad = _pad(x.data, *padding_, value=-xp.inf)
    # one elementwise maximum per kernel offset: far faster than a reduction over a 6-D view
    offsets = _offset_slices(kernel_, stride_, xpad.shape)
    out = xpad[offsets[0]].copy()
    for where in offsets[1:]:
        xp.maximum(out, xpad[where], out=out)
    # windows that tile x exactly (stride = kernel, no padding, sides divisible)
    tiles = kernel_ == stride_ and padding_ == (0, 0)
    tiles = tiles and x.shape[2] % kernel_[0] == 0 and x.shape[3] % kernel_[1] == 0

    def backward(g: Any) -> tuple[Any]:
        masks = [xpad[where] == out for where in offsets]
        count = masks[0].astype(g.dtype)
        for mask in masks[1:]:
            count += mask
        share = g / count
        if tiles:  # every element in exactly one window: write, do not zero-fill and add
            gx = xp.empty(xpad.shape, dtype=g.dtype)
            for where, mask in zip(offsets, masks, strict=True):
                xp.multiply(share, mask, out=gx[where])
            return (gx,)
        gpad = xp.zeros(xpad.shape, dtype=g.dtype)
        for where, mask in zip(offsets, masks, strict=True):
            gpad[where] += share * mask
        return (_unpad(gpad, *padding_),)

    return make_result(out, (x,), backward, "max_pool2d")


def _max_pool2d_compiled(
    compiled: Any, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """``max_pool2d`` without padding by the numba kernels: the same results (ties share the
    gradient equally), one parallel pass each way (measured 0.47 + 1.1 ms against 1.4 + 5 ms
    for the offset loops, 2x2 over 128 x 16 x 28 x 28, one thread)."""
    xp = backend.array_module(x.data)
    oh = output_size(x.shape[2], kernel[0], stride[0], 0, 1)
    ow = output_size(x.shape[3], kernel[1], stride[1], 0, 1)
    out = xp.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
    compiled.max_pool(*kernel, *stride)(x.data, out)

    def backward(g: Any) -> tuple[Any]:
        g = xp.ascontiguousarray(g, dtype=out.dtype)
        gx = xp.empty(x.shape, dtype=out.dtype)
        compiled.max_pool_grad(*kernel, *stride)(x.data, out, g, gx)
        return (gx,)

    return make_result(out, (x,), backward, "max_pool2d")


def avg_pool2d(x: Tensor, kernel: Pair, stride: Pair | None = None, padding: Pair = 0) -> Tensor:
    """Mean over each window; zero padding counts in the mean (PyTorch's default,
    ``count_include_pad=True``), so every window divides by KH * KW.

    Shapes: x (N, C, H, W) -> (N, C, OH, OW); stride defaults to the kernel.
    """
    kernel_, stride_, padding_ = _pool_arguments("avg_pool2d", x, kernel, stride, padding)
    xp = backend.array_module(x.data)
    xpad = _pad(x.data, *padding_)
    offsets = _offset_slices(kernel_, stride_, xpad.shape)
    out = xpad[offsets[0]].copy()
    for where in offsets[1:]:
        out += xpad[where]
    out *= 1.0 / len(offsets)
    shape = xpad.shape

    def backward(g: Any) -> tuple[Any]:
        share = g * (1.0 / len(offsets))
        gpad = xp.zeros(shape, dtype=g.dtype)
        for where in offsets:
            gpad[where] += share
        return (_unpad(gpad, *padding_),)

    return make_result(out, (x,), backward, "avg_pool2d")


def _pool_arguments(
    op: str, x: Tensor, kernel: Pair, stride: Pair | None, padding: Pair
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel_ = pair(kernel, "kernel", op, 1)
    stride_ = kernel_ if stride is None else pair(stride, "stride", op, 1)
    padding_ = pair(padding, "padding", op, 0)
    # a window made only of padding would have no input to take the max or mean of
    if padding_[0] > kernel_[0] // 2 or padding_[1] > kernel_[1] // 2:
        raise ValueError(f"{op}: padding {padding_} must be at most half the kernel {kernel_}")
    _check_input(op, x, kernel_, stride_, padding_, (1, 1))
    return kernel_, stride_, padding_


def _offset_slices(
    kernel: tuple[int, int], stride: tuple[int, int], padded_shape: tuple[int, ...]
) -> list[tuple[slice, ...]]:
    """For each kernel offset (i, j), the strided slice of the padded input (N, C, Hp, Wp)
    holding that offset's pixel of every window: an (N, C, OH, OW) view."""
    (kh, kw), (sh, sw) = kernel, stride
    oh = output_size(padded_shape[2], kh, sh, 0, 1)
    ow = output_size(padded_shape[3], kw, sw, 0, 1)
    every = slice(None)
    return [
        (every, every, slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw))
        for i in range(kh)
        for j in range(kw)
    ]
