"""2-D convolution through Intel oneDNN, the library PyTorch's CPU convolutions run on, loaded
with ctypes (as ``distnet.kernels.mkl_blas`` loads oneMKL).

Why: im2col + one GEMM per layer (Caffe's way, ``distnet.core.channels_last``) moves every
input pixel KH KW times through memory and leaves the GEMM with skinny shapes (K = 25 for a
one-channel 5x5 layer). oneDNN's direct convolutions (``brgconv``/``jit`` on AVX-512 here)
block the loops in registers instead: the LeNet step's convolutions took 1.4 ms forward and
3.1 ms backward against 4.5 and 7.2 ms with im2col and oneMKL (batch 128, 2 threads).

The optional ``[onednn]`` extra installs the ``onednn-cpu-gomp`` wheel: oneDNN on GNU OpenMP,
the runtime oneMKL's GNU layer and numba's ``omp`` layer already use, so one thread team
serves all three. Its ``libdnnl.so.3`` lands in ``<prefix>/lib``.

What is used (C API of oneDNN 3.x): memory descriptors by tag, convolution forward (bias and a
fused ReLU post-op), backward data and backward weights primitives, reorders of the weights
between PyTorch's (O, C, KH, KW) layout and the blocked layout each primitive chose. Activations
are NHWC (``acdb``), float32 only. A ``ConvPlan`` holds the primitives of one geometry; numpy
arrays are attached to its memory objects for each call (``dnnl_memory_set_data_handle``), so
nothing is copied.

The library is loaded only through ``distnet.kernels`` (lazily, ``DISTNET_CONV``: ``auto``,
``onednn`` or ``im2col``); this module imports nothing of distnet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

# enum values of oneDNN 3's C API (dnnl_types.h / dnnl_common_types.h)
_SUCCESS = 0
_F32 = 3
_TAG_ANY, _TAG_A, _TAG_ABCD, _TAG_ACDB = 1, 2, 5, 22  # any, (O,), (O, C, KH, KW), NHWC
_ENGINE_CPU, _STREAM_DEFAULT = 1, 1
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_ELTWISE_RELU = 32
_QUERY_IMPL_INFO_STR = 8
_QUERY_WEIGHTS_MD, _QUERY_DIFF_WEIGHTS_MD = 131, 132
ARG_SRC, ARG_DST, ARG_WEIGHTS, ARG_BIAS = 1, 17, 33, 41
ARG_DIFF_SRC, ARG_DIFF_DST, ARG_DIFF_WEIGHTS = 129, 145, 161
ARG_FROM, ARG_TO = 1, 17

_Dims = ctypes.c_int64 * 12
_vp = ctypes.c_void_p

PLANS_PER_THREAD = 64
"""Geometries remembered per thread (a network has a few dozen at most; a sweep of shapes
evicts). An evicted plan lives on while a pending backward holds it."""


_STATUS = {1: "out_of_memory", 2: "invalid_arguments", 3: "unimplemented",
           4: "last_impl_reached", 5: "runtime_error", 6: "not_required"}  # fmt: skip
UNIMPLEMENTED = 3


class OneDnnError(RuntimeError):
    """A oneDNN call failed: its name and status are in the message, the code in ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _vp)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


def library_candidates() -> list[str]:
    """Where ``libdnnl`` may be: the environment's own lib folder first (pip's wheel)."""
    names = ("libdnnl.so.3", "libdnnl.so", "libdnnl.3.dylib")
    found = [str(Path(sys.prefix) / "lib" / n) for n in names]
    found = [p for p in found if os.path.exists(p)]
    system = ctypes.util.find_library("dnnl")
    return found + ([system] if system else [])


def _dims(values: tuple[int, ...]) -> Any:
    dims = _Dims()
    for i, v in enumerate(values):
        dims[i] = v
    return dims


class OneDnn:
    """The loaded library: one CPU engine, a stream per calling thread, plans per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        version = lib.dnnl_version().contents
        if version.major != 3:
            raise OSError(f"{path}: oneDNN {version.major}.{version.minor}; distnet needs 3.x")
        self.version = f"{version.major}.{version.minor}.{version.patch}"
        lib.dnnl_primitive_desc_query_md.restype = _vp
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.lib = lib
        self.engine = _vp()
        self.call("dnnl_engine_create", ctypes.byref(self.engine), _ENGINE_CPU, 0)
        self._local = threading.local()

    def call(self, name: str, *args: Any) -> None:
        """``lib.<name>(*args)``, raising ``OneDnnError`` naming it unless it succeeded."""
        self.check(getattr(self.lib, name)(*args), name)

    @staticmethod
    def check(status: int, call: str) -> None:
        if status != _SUCCESS:
            name = _STATUS.get(status, "unknown")
            raise OneDnnError(f"oneDNN: {call} failed with status {status} ({name})", status)

    def stream(self) -> Any:
        """This thread's stream (a oneDNN stream must not be shared between threads)."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = _vp()
            self.call("dnnl_stream_create", ctypes.byref(stream), self.engine, _STREAM_DEFAULT)
            self._local.stream = stream
        return stream

    def conv_plan(self, key: tuple) -> ConvPlan:
        """The plan of ``ConvPlan(self, *key)``, made once per thread and geometry."""
        plans = getattr(self._local, "plans", None)
        if plans is None:
            plans = self._local.plans = OrderedDict()
        plan = plans.get(key)
        if plan is None:
            try:
                plan = ConvPlan(self, *key)
            except OneDnnError as e:
                names = ("n", "c", "h", "w", "o", "kh", "kw", "stride", "dilation", "padding",
                         "out_size", "relu", "bias", "backward_data")  # fmt: skip
                shown = ", ".join(f"{k}={v}" for k, v in zip(names, key, strict=True))
                raise OneDnnError(f"{e} for the convolution {shown}", e.status) from e
            plans[key] = plan
            if len(plans) > PLANS_PER_THREAD:  # forgotten here; a pending backward that
                plans.popitem(last=False)  # holds it keeps it alive (freed by __del__)
        plans.move_to_end(key)
        return plan

    def memory_desc(self, shape: tuple[int, ...], tag: int) -> Any:
        md = _vp()
        self.call("dnnl_memory_desc_create_with_tag", ctypes.byref(md), len(shape), _dims(shape),
                  _F32, tag)  # fmt: skip
        return md


class _Step:
    """One primitive with its memory objects; ``run({arg: array})`` attaches the arrays."""

    def __init__(self, dnnl: OneDnn, pd: Any, args: dict[int, Any]) -> None:
        self.dnnl, self.pd = dnnl, pd
        self.primitive = _vp()
        dnnl.call("dnnl_primitive_create", ctypes.byref(self.primitive), pd)
        self.memory: dict[int, Any] = {}
        for arg, md in args.items():
            mem = _vp()
            dnnl.call("dnnl_memory_create", ctypes.byref(mem), md, dnnl.engine, None)
            self.memory[arg] = mem
        self.args = (_Arg * len(args))(*[_Arg(a, m) for a, m in self.memory.items()])

    def implementation(self) -> str:
        name = ctypes.c_char_p()
        self.dnnl.lib.dnnl_primitive_desc_query(self.pd, _QUERY_IMPL_INFO_STR, 0,
                                                ctypes.byref(name))  # fmt: skip
        return (name.value or b"").decode()

    def run(self, arrays: dict[int, np.ndarray]) -> None:
        lib, check = self.dnnl.lib, self.dnnl.check
        for arg, a in arrays.items():
            check(lib.dnnl_memory_set_data_handle(self.memory[arg], _vp(a.ctypes.data)),
                  "dnnl_memory_set_data_handle")  # fmt: skip
        stream = self.dnnl.stream()
        check(lib.dnnl_primitive_execute(self.primitive, stream, len(self.memory), self.args),
              "dnnl_primitive_execute")  # fmt: skip
        check(lib.dnnl_stream_wait(stream), "dnnl_stream_wait")

    def release(self) -> None:
        lib = self.dnnl.lib
        for mem in self.memory.values():
            lib.dnnl_memory_destroy(mem)
        lib.dnnl_primitive_destroy(self.primitive)
        lib.dnnl_primitive_desc_destroy(self.pd)
        self.memory = {}


class ConvPlan:
    """The oneDNN primitives of one convolution geometry, float32, NHWC activations.

    Shapes: x (N, H, W, C) C-contiguous, weight (O, C, KH, KW) C-contiguous, bias (O,),
    y / dy (N, OH, OW, O) C-contiguous. ``padding`` is (top, left, bottom, right): the bottom
    and right sides are what makes the output size come out as PyTorch's formula says.
    """

    def __init__(self, dnnl: OneDnn, n: int, c: int, h: int, w: int, o: int, kh: int, kw: int,
                 stride: tuple[int, int], dilation: tuple[int, int],
                 padding: tuple[int, int, int, int], out_size: tuple[int, int], relu: bool,
                 with_bias: bool, backward_data: bool) -> None:  # fmt: skip
        self.dnnl = dnnl
        lib = dnnl.lib
        self.steps: list[_Step] = []
        self._descs: list[Any] = []
        oh, ow = out_size
        src = self._md((n, c, h, w), _TAG_ACDB)
        dst = self._md((n, o, oh, ow), _TAG_ACDB)
        user_w = self._md((o, c, kh, kw), _TAG_ABCD)
        any_w = self._md((o, c, kh, kw), _TAG_ANY)
        bias = self._md((o,), _TAG_A) if with_bias else None
        geometry = (_dims(stride), _dims(tuple(d - 1 for d in dilation)), _dims(padding[:2]),
                    _dims(padding[2:]))  # fmt: skip
        attr = _vp()
        if relu:
            post_ops = _vp()
            dnnl.call("dnnl_post_ops_create", ctypes.byref(post_ops))
            dnnl.call("dnnl_post_ops_append_eltwise", post_ops, _ELTWISE_RELU, ctypes.c_float(0),
                      ctypes.c_float(0))  # fmt: skip
            dnnl.call("dnnl_primitive_attr_create", ctypes.byref(attr))
            dnnl.call("dnnl_primitive_attr_set_post_ops", attr, post_ops)
            lib.dnnl_post_ops_destroy(post_ops)
        forward = _vp()
        try:
            dnnl.call("dnnl_convolution_forward_primitive_desc_create", ctypes.byref(forward),
                      dnnl.engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, src, any_w, bias, dst,
                      *geometry, attr)  # fmt: skip
        finally:
            if attr:
                lib.dnnl_primitive_attr_destroy(attr)
        fwd_w = _vp(lib.dnnl_primitive_desc_query_md(forward, _QUERY_WEIGHTS_MD, 0))
        self.forward = self._step(forward, {ARG_SRC: src, ARG_WEIGHTS: fwd_w, ARG_DST: dst,
                                            **({ARG_BIAS: bias} if with_bias else {})})  # fmt: skip
        self.fwd_weights = self._reorder(user_w, fwd_w)

        bwd_w = _vp()
        dnnl.call("dnnl_convolution_backward_weights_primitive_desc_create", ctypes.byref(bwd_w),
                  dnnl.engine, _CONVOLUTION_DIRECT, src, any_w, None, dst, *geometry, forward,
                  None)  # fmt: skip
        diff_w = _vp(lib.dnnl_primitive_desc_query_md(bwd_w, _QUERY_DIFF_WEIGHTS_MD, 0))
        self.backward_weights = self._step(bwd_w, {ARG_SRC: src, ARG_DIFF_DST: dst,
                                                   ARG_DIFF_WEIGHTS: diff_w})  # fmt: skip
        self.diff_weights = self._reorder(diff_w, user_w)

        self.backward_data = self.bwd_weights = None
        if backward_data:
            bwd_d = _vp()
            dnnl.call("dnnl_convolution_backward_data_primitive_desc_create", ctypes.byref(bwd_d),
                      dnnl.engine, _CONVOLUTION_DIRECT, src, any_w, dst, *geometry, forward,
                      None)  # fmt: skip
            data_w = _vp(lib.dnnl_primitive_desc_query_md(bwd_d, _QUERY_WEIGHTS_MD, 0))
            self.backward_data = self._step(bwd_d, {ARG_DIFF_DST: dst, ARG_WEIGHTS: data_w,
                                                    ARG_DIFF_SRC: src})  # fmt: skip
            self.bwd_weights = self._reorder(user_w, data_w)

    def _md(self, shape: tuple[int, ...], tag: int) -> Any:
        md = self.dnnl.memory_desc(shape, tag)
        self._descs.append(md)
        return md

    def _step(self, pd: Any, args: dict[int, Any]) -> _Step:
        step = _Step(self.dnnl, pd, args)
        self.steps.append(step)
        return step

    def _reorder(self, source: Any, target: Any) -> tuple[_Step, np.ndarray] | None:
        """A reorder between two weight layouts and a buffer for the blocked side, or None
        when the primitive took the user's layout as it is."""
        lib = self.dnnl.lib
        if lib.dnnl_memory_desc_equal(source, target):
            return None
        pd = _vp()
        self.dnnl.call("dnnl_reorder_primitive_desc_create", ctypes.byref(pd), source,
                       self.dnnl.engine, target, self.dnnl.engine, None)  # fmt: skip
        blocked = target if source.value in {d.value for d in self._descs} else source
        size = lib.dnnl_memory_desc_get_size(blocked)
        return self._step(pd, {ARG_FROM: source, ARG_TO: target}), np.zeros(size // 4, np.float32)

    def implementations(self) -> dict[str, str]:
        """What oneDNN chose for each primitive (e.g. ``brgconv:avx512_core``)."""
        found = {"forward": self.forward, "backward_weights": self.backward_weights,
                 "backward_data": self.backward_data}  # fmt: skip
        return {k: s.implementation() for k, s in found.items() if s is not None}

    def run_forward(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                    y: np.ndarray) -> None:  # fmt: skip
        """y <- conv(x, weight) + bias, ReLU applied when the plan has it."""
        weights = weight
        if self.fwd_weights is not None:
            reorder, weights = self.fwd_weights
            reorder.run({ARG_FROM: weight, ARG_TO: weights})
        arrays = {ARG_SRC: x, ARG_WEIGHTS: weights, ARG_DST: y}
        if bias is not None:
            arrays[ARG_BIAS] = bias
        self.forward.run(arrays)

    def run_backward_weights(self, x: np.ndarray, dz: np.ndarray, grad: np.ndarray) -> None:
        """grad (O, C, KH, KW) <- dL/dweight from the input x and dz = dL/d(pre-activation)."""
        target = grad if self.diff_weights is None else self.diff_weights[1]
        self.backward_weights.run({ARG_SRC: x, ARG_DIFF_DST: dz, ARG_DIFF_WEIGHTS: target})
        if self.diff_weights is not None:
            self.diff_weights[0].run({ARG_FROM: target, ARG_TO: grad})

    def run_backward_data(self, dz: np.ndarray, weight: np.ndarray, gx: np.ndarray) -> None:
        """gx (N, H, W, C) <- dL/dx from dz and the weight (O, C, KH, KW)."""
        if self.backward_data is None:
            raise OneDnnError("this plan was made without the backward-data primitive", 2)
        weights = weight
        if self.bwd_weights is not None:
            reorder, weights = self.bwd_weights
            reorder.run({ARG_FROM: weight, ARG_TO: weights})
        self.backward_data.run({ARG_DIFF_DST: dz, ARG_WEIGHTS: weights, ARG_DIFF_SRC: gx})

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001  (interpreter shutdown: the library may be gone)
            pass

    def release(self) -> None:
        """Frees the primitives, memory objects and descriptors (the plan is unusable after)."""
        for step in self.steps:
            step.release()
        for md in self._descs:
            self.dnnl.lib.dnnl_memory_desc_destroy(md)
        self.steps, self._descs = [], []


def load() -> OneDnn | None:
    """The first loadable ``libdnnl`` of oneDNN 3, or None when oneDNN is not installed."""
    for path in library_candidates():
        try:
            return OneDnn(path)
        except (OSError, AttributeError):
            continue
    return None
