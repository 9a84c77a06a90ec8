"""GEMM through oneDNN (the ``[onednn]`` extra) and oneMKL (the ``[mkl]`` extra) equals
numpy's, and everything else falls back.

``distnet.kernels.gemm.matmul`` is what ``linear``, ``matmul`` and the convolutions call.
Large float32 CPU products go to oneDNN's ``dnnl_sgemm`` when installed, else to oneMKL's
``cblas_sgemm``, float64 ones to ``cblas_dgemm``, with their transposes passed as flags;
layouts a library cannot take (strided columns, aliasing ``out``), small products, integers
and GPU arrays go through numpy. These tests compare every route on every layout.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from distnet.kernels import dnnl_blas, gemm, mkl_blas, selection

MKL_INSTALLED = bool(mkl_blas.library_candidates())
needs_mkl = pytest.mark.skipif(
    not MKL_INSTALLED, reason="oneMKL is not installed (pip install 'distnet[mkl]')"
)
DNNL_INSTALLED = bool(dnnl_blas.library_candidates())
INSTALLED = {"mkl": MKL_INSTALLED, "onednn": DNNL_INSTALLED}


def _needs(library: str) -> None:
    if not INSTALLED[library]:
        pytest.skip(f"{library} is not installed (pip install 'distnet[{library}]')")


@pytest.fixture
def blas(monkeypatch):
    """Choose DISTNET_BLAS for one test; the choice is cached per process, so clear it."""

    def choose(value: str) -> str:
        monkeypatch.setenv(selection.BLAS_ENV_VAR, value)
        selection.mkl_library.cache_clear()
        selection.dnnl_library.cache_clear()
        return selection.blas()

    yield choose
    selection.mkl_library.cache_clear()
    selection.dnnl_library.cache_clear()


def _layouts(rng, m, k, n, dtype):
    """(a, b) pairs: C order, transposed views, and a column slice (leading dim > width)."""
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    a_t = np.ascontiguousarray(a.T).T  # same values, Fortran order: passed as a transpose
    b_t = np.ascontiguousarray(b.T).T
    wide = rng.standard_normal((m, k + 37)).astype(dtype)[:, :k]
    return {"C": (a, b), "a.T": (a_t, b), "b.T": (a, b_t), "both.T": (a_t, b_t), "slice": (wide, b)}


@pytest.mark.parametrize("library", ["mkl", "onednn"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(128, 784, 1000), (1000, 128, 1000), (128, 1000, 10), (7, 300, 200), (1000, 512, 10)],
)
def test_gemm_libraries_equal_numpy_on_every_layout(blas, library, dtype, shape):
    """float64 under ``onednn``: oneMKL's (oneDNN has no dgemm), when installed."""
    _needs(library)
    assert blas(library) == library
    route = selection.gemm_library(np.dtype(dtype))
    onednn_route = (library, dtype) == ("onednn", np.float32)
    want_route = dnnl_blas.DnnlBlas if onednn_route else mkl_blas.MklBlas
    assert type(route) is want_route or (not MKL_INSTALLED and route is None), route
    rng = np.random.default_rng(0)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-10}
    for name, (a, b) in _layouts(rng, *shape, dtype).items():
        want = np.matmul(a.astype(np.float64), b.astype(np.float64))
        got = gemm.matmul(a, b)
        assert got.dtype == dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, **tol, err_msg=name)
        out = np.full(want.shape, np.nan, dtype)
        assert gemm.matmul(a, b, out) is out
        np.testing.assert_allclose(out, want, **tol, err_msg=f"{name}, out=")


@needs_mkl
def test_mkl_route_is_taken_for_large_float_products(blas):
    """The route itself: a GEMM the library cannot do must not reach it, a large one must."""
    assert blas("mkl") == "mkl"
    lib = selection.mkl_library()
    a = np.ones((256, 256), np.float32)
    assert lib.operand(a) == (mkl_blas._NO_TRANS, 256)
    assert lib.operand(a.T) == (mkl_blas._TRANS, 256)
    assert lib.operand(a[:, ::2]) is None  # strided columns: numpy's job
    assert lib.gemm(a, a[:, ::2].T, np.empty((256, 128), np.float32)) is False


def test_products_mkl_cannot_take_fall_back_to_numpy(blas):
    """Aliasing out, strided columns, integers, tiny and mixed-dtype products: numpy's result."""
    blas("auto")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 300)).astype(np.float32)
    b = rng.standard_normal((300, 300)).astype(np.float32)
    np.testing.assert_allclose(
        gemm.matmul(a[:, ::2], b[::2]), a[:, ::2] @ b[::2], rtol=1e-4, atol=1e-3
    )
    ints = rng.integers(-5, 5, (100, 100))
    np.testing.assert_array_equal(gemm.matmul(ints, ints), ints @ ints)
    small = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(gemm.matmul(small, small.T), small @ small.T, rtol=1e-6)
    mixed = gemm.matmul(a, b.astype(np.float64))
    assert mixed.dtype == np.float64
    buf = np.concatenate([a, b])  # out overlapping an operand
    want = buf[:300] @ buf[300:]
    gemm.matmul(buf[:300], buf[300:], out=buf[:300])
    np.testing.assert_allclose(buf[:300], want, rtol=1e-4, atol=1e-3)


def test_blas_choice_is_validated_and_numpy_can_be_forced(blas, monkeypatch):
    assert blas("numpy") == "numpy"
    a = np.ones((512, 512), np.float32)
    np.testing.assert_array_equal(gemm.matmul(a, a), a @ a)
    with pytest.raises(ValueError, match="DISTNET_BLAS='openblas'"):
        blas("openblas")
    monkeypatch.setattr(mkl_blas, "library_candidates", lambda: [])
    with pytest.raises(RuntimeError, match=r"DISTNET_BLAS=mkl but no libmkl_rt was found"):
        blas("mkl")
    if DNNL_INSTALLED:
        assert blas("auto") == "onednn"  # oneDNN still there: float32 through it, silently
    monkeypatch.setattr(dnnl_blas, "library_candidates", lambda: [])
    with pytest.raises(RuntimeError, match=r"DISTNET_BLAS=onednn but no oneDNN 3 library"):
        blas("onednn")
    assert blas("auto") == "numpy"  # auto without either library: numpy, silently


def _mlp_losses(blas_choice: str) -> list[float]:
    """Five SGD steps of a 784-512-512-10 MLP in a fresh process with DISTNET_BLAS set."""
    code = """
import numpy as np, distnet as dn
from distnet import backend, nn, optim
from distnet import functional as F
from distnet.kernels import selection
backend.seed(0)
model = nn.Sequential(nn.Dense(784, 512, activation="relu"), nn.Dense(512, 512, activation="tanh"),
                      nn.Dense(512, 10))
opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rng = np.random.default_rng(0)
x = rng.standard_normal((256, 784)).astype(np.float32)
y = rng.integers(0, 10, 256)
for _ in range(5):
    opt.zero_grad()
    loss = F.cross_entropy(model(dn.Tensor(x)), y)
    loss.backward()
    opt.step()
    print(selection.blas(), float(loss.data))
"""
    env = {**os.environ, selection.BLAS_ENV_VAR: blas_choice}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line.split() for line in run.stdout.splitlines()]
    assert {route for route, _ in lines} == {blas_choice}
    return [float(loss) for _, loss in lines]


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_training_through_each_library_matches_numpy(library):
    """The same five steps through oneMKL or oneDNN and through numpy: the same losses
    (float32)."""
    _needs(library)
    with_library, with_numpy = _mlp_losses(library), _mlp_losses("numpy")
    assert with_library[-1] < with_library[0]
    np.testing.assert_allclose(with_library, with_numpy, rtol=2e-4)
