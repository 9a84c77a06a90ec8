"""The fused-kernel table: numba and numpy paths agree; the choice and the cache behave."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.mpi import MPIEXEC, launch

from distnet import kernels
from distnet.kernels import dnnl_blas, mkl_blas, selection

SMALL = selection.MIN_ELEMENTS  # arrays of at least this size take the compiled path

needs_numba = pytest.mark.skipif(
    selection.implementation() != "numba", reason="numba not importable or DISTNET_KERNELS=numpy"
)


@pytest.fixture
def numpy_only(monkeypatch):
    monkeypatch.setattr(selection, "compiled", lambda *a: None)


def _both(fn, *arrays, monkeypatch):
    """Runs fn on copies of arrays through numba, then through numpy; returns both copies."""
    fast = [a.copy() for a in arrays]
    fn(*fast)
    with monkeypatch.context() as m:
        m.setattr(selection, "compiled", lambda *a: None)
        ref = [a.copy() for a in arrays]
        fn(*ref)
    return fast, ref


def _buffers(n, dtype, count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(count)]


OPTIMISERS = {
    "sgd": lambda p, g, v, w: kernels.sgd_update(p, g, None, 0.1, 0.0, False, w),
    "momentum": lambda p, g, v, w: kernels.sgd_update(p, g, v, 0.1, 0.9, False, w),
    "nesterov": lambda p, g, v, w: kernels.sgd_update(p, g, v, 0.1, 0.9, True, w),
    "adam": lambda p, g, v, w: kernels.adam_update(p, g, v, np.abs(v), 1e-2, 0.9, 0.99, 1e-8, 3, w),
    "rmsprop": lambda p, g, v, w: kernels.rmsprop_update(
        p, g, np.abs(v), None, None, 1e-2, 0.99, 1e-8, 0.0, w
    ),
    "adagrad": lambda p, g, v, w: kernels.adagrad_update(p, g, np.abs(v), 1e-2, 1e-10, w),
}


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_optimiser_kernels_match_numpy(name, dtype, monkeypatch):
    p, g, v = _buffers(SMALL + 7, dtype, 3)
    w = np.empty_like(p)
    (pf, _, vf, _), (pr, _, vr, _) = _both(OPTIMISERS[name], p, g, v, w, monkeypatch=monkeypatch)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(pf, pr, rtol=tol, atol=tol)
    np.testing.assert_allclose(vf, vr, rtol=tol, atol=tol)
    assert not np.allclose(pf, p)  # the update did something


@needs_numba
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_variants_match_numpy(centered, momentum, monkeypatch):
    p, g, sq, ga, buf = _buffers(SMALL + 99, np.float32, 5, seed=1)
    sq, ga = np.abs(sq) + 1.0, ga * 0.1  # centered: sq - ga^2 stays positive

    def update(p, g, sq, ga, buf, w):
        kernels.rmsprop_update(p, g, sq, ga if centered else None, buf if momentum else None,
                               1e-2, 0.9, 1e-8, momentum, w)  # fmt: skip

    fast, ref = _both(update, p, g, sq, ga, buf, np.empty_like(p), monkeypatch=monkeypatch)
    for a, b in zip(fast[:5], ref[:5], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_activation_kernels_match_numpy(activation, monkeypatch):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1033, 70)).astype(np.float32) * 3
    bias = rng.standard_normal(70).astype(np.float32)
    g = rng.standard_normal((1033, 70)).astype(np.float32)
    (zf, _), (zr, _) = _both(
        lambda z, b: kernels.bias_activation_(z, b, activation), z, bias, monkeypatch=monkeypatch
    )
    np.testing.assert_allclose(zf, zr, rtol=1e-6, atol=1e-6)
    fast, ref = _both(
        lambda y, g, out: out.__setitem__(..., kernels.activation_grad(activation, y, g)),
        zr, g, np.empty_like(g), monkeypatch=monkeypatch,
    )  # fmt: skip
    np.testing.assert_allclose(fast[2], ref[2], rtol=1e-6, atol=1e-6)


@needs_numba
@pytest.mark.parametrize(
    "activation, dtype",
    [
        ("tanh", np.float32),
        ("sigmoid", np.float32),
        ("relu", np.float32),
        ("relu", np.float64),
        ("leaky_relu", np.float32),
        ("leaky_relu", np.float64),
    ],  # fmt: skip
)
@pytest.mark.parametrize("shape", [(300, 301), (1, 65_601), (3, 37, 601)])
def test_fused_backward_with_bias_sum_matches_numpy(activation, dtype, shape, monkeypatch):
    """One pass gives dL/dz and the bias gradient (column sums) as numpy's two passes do:
    row blocks of unequal length, a single row (fewer rows than threads), leading axes."""
    rng = np.random.default_rng(3)
    y = rng.random(shape).astype(dtype)
    y = y * 2 - 1 if activation == "tanh" else y
    g = rng.standard_normal(shape).astype(dtype)
    gb = np.full(shape[-1], np.nan, dtype)  # every entry must be written, none accumulated into

    def backward(y, g, gb, out):
        out[...] = kernels.activation_backward(activation, y, g, gb)

    fast, ref = _both(backward, y, g, gb, np.empty_like(y), monkeypatch=monkeypatch)
    np.testing.assert_allclose(fast[3], ref[3], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fast[2], ref[2], rtol=1e-4, atol=1e-4)
    assert np.isfinite(fast[2]).all()


@needs_numba
def test_float32_tanh_and_sigmoid_stay_within_a_few_ulp():
    """The compiled float32 tanh is a rational function: bound its error over the whole line
    (tails clamp near +-1), and NaN still comes out as NaN."""
    x = np.linspace(-30, 30, 600_000, dtype=np.float32).reshape(600, 1000)
    x[0, :5] = [np.nan, np.inf, -np.inf, 1e-30, -1e-5]
    exact = np.tanh(x.astype(np.float64))
    z = x.copy()
    kernels.bias_activation_(z, None, "tanh")
    assert np.isnan(z[0, 0]) and z[0, 3] == np.float32(1e-30)
    finite = ~np.isnan(x)
    assert np.abs(z - exact)[finite].max() < 4e-7  # numpy's own float32 tanh: 6e-8
    s = x.copy()
    kernels.bias_activation_(s, None, "sigmoid")
    exact_sigmoid = 0.5 * (1 + np.tanh(x.astype(np.float64) / 2))
    assert np.abs(s - exact_sigmoid)[finite].max() < 4e-7


@needs_numba
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_dense_layer_gradients_agree_between_numba_and_numpy(activation, monkeypatch):
    """Through the autodiff core: weight and bias gradients written into the flat buffer
    (zeroed) and accumulated on a second backward (not zeroed) agree with the numpy path."""
    from distnet import backend, functional, nn  # noqa: PLC0415

    def grads() -> list[np.ndarray]:
        backend.seed(0)
        model = nn.Sequential(nn.Dense(40, 600, activation), nn.Dense(600, 5))
        x = np.random.default_rng(4).standard_normal((200, 40)).astype(np.float32)
        labels = np.arange(200) % 5
        model.zero_grad()
        functional.cross_entropy(model(x), labels).backward()
        first = [p.grad.copy() for p in model.parameters()]
        functional.cross_entropy(model(x), labels).backward()  # accumulates
        return first + [p.grad.copy() for p in model.parameters()]

    fast = grads()
    with monkeypatch.context() as m:
        m.setattr(selection, "compiled", lambda *a: None)
        ref = grads()
    for a, b in zip(fast, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast[5], 2 * fast[1], rtol=1e-5, atol=1e-7)  # bias accumulated


def test_numpy_path_serves_float16_and_strided(numpy_only):
    p, g = (a.astype(np.float16) for a in _buffers(100, np.float32, 2))
    before = p.copy()
    kernels.sgd_update(p, g, None, 0.5, 0.0, False, np.empty_like(p))
    np.testing.assert_allclose(p, before - np.float16(0.5) * g, rtol=1e-3)


def test_nan_gradient_reaches_parameters():
    """fastmath must not assume finite values: a NaN gradient shows up, not a silent 0."""
    p, g, m, v = _buffers(SMALL, np.float32, 4)
    v = np.abs(v)
    g[17] = np.nan
    kernels.adam_update(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1, np.empty_like(p))
    assert np.isnan(p[17]) and np.isfinite(np.delete(p, 17)).all()


@pytest.mark.parametrize("route", ["compiled", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_finds_every_inf_and_nan(route, dtype, monkeypatch):
    """Every position (the chunks' first and last elements, an odd-sized tail), both infs and
    NaN are found; the largest finite value and subnormals are finite."""
    if route == "numpy":
        monkeypatch.setattr(selection, "compiled", lambda *a: None)
    elif selection.implementation() != "numba":
        pytest.skip("numba not importable or DISTNET_KERNELS=numpy")
    n = 3 * SMALL + 7
    g = _buffers(n, dtype, 1)[0]
    g[:5] = [np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny / 4, 0.0, -0.0]
    assert kernels.all_finite(g)
    for bad in (np.inf, -np.inf, np.nan):
        for pos in (0, n // 2 - 1, n // 2, n - 1, 12345):
            h = g.copy()
            h[pos] = bad
            assert not kernels.all_finite(h), (bad, pos)
    assert kernels.all_finite(g.reshape(-1, 1))  # any shape: read as one flat run


def _run(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_environment_variable_chooses_numpy():
    out = _run("from distnet.kernels import selection; print(selection.implementation())",
               {"DISTNET_KERNELS": "numpy"})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "numpy"


def test_environment_variable_refuses_unknown_value():
    out = _run("from distnet.kernels import selection; selection.implementation()",
               {"DISTNET_KERNELS": "fortran"})  # fmt: skip
    assert out.returncode != 0 and "DISTNET_KERNELS='fortran'" in out.stderr


def test_cache_dir_is_per_user_and_environment():
    d = selection.cache_dir()
    assert "distnet" in d.parts and d.name.startswith(f"numba-py{sys.version_info[0]}")


@needs_numba
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(280)
def test_two_ranks_compile_into_one_empty_cache_together(tmp_path):
    """Ranks started together on an empty kernel cache both compile, neither crashes on the
    other's half-written files, and the cache then serves a third process."""
    cache = tmp_path / "cache"
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np\n"
        "from distnet import nn, optim, functional\n"
        "from distnet.kernels import selection\n"
        "assert selection.implementation() == 'numba'\n"
        "model = nn.Sequential(nn.Dense(8, 300, 'relu'), nn.Dense(300, 300), nn.Dense(300, 3))\n"
        "opt = optim.Adam(model, lr=1e-2)\n"
        "x = np.random.default_rng(0).random((256, 8), dtype=np.float32)\n"
        "y = np.arange(256) % 3\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); functional.cross_entropy(model(x), y).backward(); opt.step()\n"
        "import sys\n"  # one write per rank: two ranks' prints interleaved through mpiexec
        "sys.stdout.write(f'ok {float(opt.flat_params.sum())}\\n'); sys.stdout.flush()\n"
    )
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {"NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    # the same threads in the ranks and the third process, so that the sums agree bitwise
    env |= dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"), "1")
    # through distnet launch: it starts the job again if MPI_Init itself failed (an
    # intermittent UCX fault of MPICH, pmodels/mpich#7417), which a bare mpiexec would not
    out = launch(2, "-u", str(script), timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    lines = [ln.split("] ", 1)[-1] for ln in out.stdout.splitlines() if "ok " in ln]
    lines = [ln for ln in lines if ln.startswith("ok")]
    assert len(lines) == 2 and lines[0] == lines[1]
    cached = list(Path(cache).rglob("*.nbi"))
    assert cached, "no kernel index written to the cache"
    third = subprocess.run([sys.executable, str(script)], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert third.returncode == 0 and third.stdout.split() == lines[0].split()


def test_small_arrays_take_the_numpy_path_without_importing_numba():
    code = ("import sys; from distnet import nn, optim, functional; import numpy as np\n"
            "m = nn.Sequential(nn.Dense(8, 16, 'tanh'), nn.Dense(16, 3)); o = optim.Adam(m)\n"
            "o.zero_grad(); functional.cross_entropy(m(np.ones((4, 8), np.float32)),"
            " np.zeros(4, int)).backward(); o.step(); print('numba' in sys.modules)")  # fmt: skip
    out = _run(code, {"DISTNET_KERNELS": "auto"})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@needs_numba
@pytest.mark.parametrize("blas", ["numpy", "mkl", "onednn"])
def test_kernels_share_the_gemms_thread_team(blas):
    """With oneMKL on GNU OpenMP the kernels run on numba's omp layer (one libgomp team for
    GEMMs and kernels: the SGD update took twice as long when a second pool woke up); with
    OpenBLAS on workqueue (OpenMP's spinning team fought OpenBLAS's threads: the step took
    twice numpy's time)."""
    if blas == "mkl" and not mkl_blas.library_candidates():
        pytest.skip("oneMKL is not installed (pip install 'distnet[mkl]')")
    if blas == "onednn" and not dnnl_blas.library_candidates():
        pytest.skip("oneDNN is not installed (pip install 'distnet[onednn]')")
    # numba's compiler reloads its configuration from the environment: a compile between
    # choosing the layer and the first kernel (a kernel not yet cached) must not undo it
    code = ("import numba, numpy as np  # numba imported before distnet chose its layer\n"
            "from distnet import functional, nn, optim\n"
            "from distnet.kernels import selection\n"
            "assert selection.implementation() == 'numba'\n"
            "numba.njit(lambda v: v + 1)(1)\n"
            "m = nn.Sequential(nn.Dense(300, 300, 'tanh'), nn.Dense(300, 3)); o = optim.SGD(m)\n"
            "x = np.ones((256, 300), np.float32)\n"
            "functional.cross_entropy(m(x), np.zeros(256, int)).backward(); o.step()\n"
            "lib = selection.gemm_library(np.dtype(np.float32))\n"
            "print(numba.threading_layer(), lib.layer if lib else 'OpenBLAS')")  # fmt: skip
    drop = ("NUMBA_THREADING_LAYER", "MKL_THREADING_LAYER", "NUMBA_CACHE_DIR")  # as a user has it
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["DISTNET_BLAS"] = blas
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    layer, gemm_threads = out.stdout.split()
    assert layer == ("omp" if gemm_threads == "GNU" else "workqueue"), out.stdout
    assert gemm_threads == ("OpenBLAS" if blas == "numpy" else "GNU")  # libgomp is here


def test_one_table_serves_every_entry_point_and_the_ops():
    """Each activation is one row of ``unary.UNARY``: the numba kinds, the GPU formulas and the
    autodiff ops follow its order and its references (leaky ReLU with its slope, and with a
    negative slope, which the output's sign cannot differentiate, through the input's)."""
    from distnet import Tensor  # noqa: PLC0415
    from distnet.core import ops  # noqa: PLC0415
    from distnet.kernels import cupy_elementwise, unary  # noqa: PLC0415

    assert kernels.ACTIVATIONS == tuple(unary.UNARY) == ("tanh", "sigmoid", "relu", "leaky_relu")
    for name in kernels.ACTIVATIONS:
        assert {name, f"bias_{name}", f"{name}_grad"} <= set(cupy_elementwise.FORMULAS)
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]], np.float64)
    for slope in (0.2, -0.3):
        t = Tensor(x.copy(), requires_grad=True)
        y = ops.leaky_relu(t, slope)
        y.sum().backward()
        np.testing.assert_array_equal(y.data, np.where(x > 0, x, slope * x))
        np.testing.assert_array_equal(t.grad, np.where(x > 0, 1.0, slope))
    with pytest.raises(ValueError, match="bias_activation_: unknown activation 'gelu'"):
        kernels.bias_activation_(x.copy(), None, "gelu")
