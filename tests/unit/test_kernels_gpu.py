"""The GPU kernel table (cupy ElementwiseKernels) against the numpy reference.

The formulas are checked everywhere: evaluated with numpy they must give what
``distnet.kernels``' numpy path gives, and their CUDA sources must declare every name they use
and cast float literals to ``T``. Launching them needs a GPU (skipped with the reason).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from distnet import backend, kernels
from distnet.kernels import cupy_elementwise as ck
from distnet.kernels import selection

SCALARS = {"lr": 0.05, "momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "step_size": 0.01,
           "slope": 0.01, "inv_root_bias2": 3.0, "eps": 1e-8, "alpha": 0.9}  # fmt: skip


def _arrays(f: ck.Formula, n: int = 1000, xp=np) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    arrays = {}
    for name in f.inputs + f.outputs:
        a = rng.standard_normal(n).astype(np.float32)
        arrays[name] = np.abs(a) + 1.0 if name in ("sq", "acc", "v") else a  # roots of >= 0
    if "ga" in arrays:
        arrays["ga"] *= 0.1  # centered: sq - ga^2 stays positive
    return {k: xp.asarray(v) for k, v in arrays.items()}


def _reference(name: str, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The numpy path of distnet.kernels on copies of ``a`` (what every path must match)."""
    a = {k: v.copy() for k, v in a.items()}
    s = SCALARS
    work = np.empty_like(next(iter(a.values())))
    numpy_path = pytest.MonkeyPatch()
    numpy_path.setattr(selection, "compiled", lambda *arrays: None)
    try:
        if name in ("sgd", "sgd_momentum", "sgd_nesterov"):
            kernels.sgd_update(a["p"], a["g"], a.get("v"), s["lr"], s["momentum"],
                               name == "sgd_nesterov", work)  # fmt: skip
        elif name == "adam":
            # step_size = lr / (1 - b1^t) and 1/sqrt(1 - b2^t) from lr and t: pick t = 1
            b1, b2 = s["beta1"], s["beta2"]
            lr = s["step_size"] * (1 - b1)
            kernels.adam_update(a["p"], a["g"], a["m"], a["v"], lr, b1, b2, s["eps"], 1, work)
        elif name.startswith("rmsprop"):
            kernels.rmsprop_update(a["p"], a["g"], a["sq"], a.get("ga"), a.get("buf"), s["lr"],
                                   s["alpha"], s["eps"], s["momentum"], work)  # fmt: skip
        elif name == "adagrad":
            kernels.adagrad_update(a["p"], a["g"], a["acc"], s["lr"], s["eps"], work)
        elif name.endswith("_grad"):
            a["d"] = kernels.activation_grad(name[: -len("_grad")], a["y"], a["g"])
        else:  # bias_act or act
            activation = name.removeprefix("bias_")
            kernels.bias_activation_(a["z"], a.get("b"), activation)
    finally:
        numpy_path.undo()
    return a


def _scalars_for(name: str) -> dict[str, float]:
    if name == "adam":  # the scalars adam_update derives for step 1
        b2 = SCALARS["beta2"]
        return {**SCALARS, "inv_root_bias2": 1 / np.sqrt(1 - b2)}
    return SCALARS


@pytest.mark.parametrize("name", sorted(ck.FORMULAS))
def test_formula_evaluated_with_numpy_matches_the_numpy_path(name):
    f = ck.FORMULAS[name]
    arrays = _arrays(f)
    got = ck.evaluate(f, arrays, {k: _scalars_for(name)[k] for k in f.scalars})
    want = _reference(name, arrays)
    for out in f.outputs:
        assert got[out].dtype == np.float32, out  # scalars took the arrays' dtype
        np.testing.assert_allclose(got[out], want[out], rtol=2e-6, atol=2e-6, err_msg=out)
    assert not np.allclose(got[f.outputs[0]], arrays[f.outputs[0]])  # it did something


@pytest.mark.parametrize("name", sorted(ck.FORMULAS))
def test_kernel_source_declares_every_name_and_casts_literals(name):
    f = ck.FORMULAS[name]
    in_params, out_params, operation = ck.source(f)
    params = [p.split() for p in (in_params + ", " + out_params).split(", ") if p]
    assert all(kind == "T" for kind, _ in params)  # one dtype: the arrays'
    declared = [n for _, n in params]
    assert sorted(declared) == sorted(set(declared))
    assert ck.names_used(f) == set(declared), f"{name}: {operation} vs {declared}"
    assert "0.5" not in operation.replace("((T)0.5)", "")  # float32 kernels stay float32
    assert operation.count(";") == len(f.body)
    for target in f.outputs:
        assert f"{target} = " in operation  # each in-place output is written


def test_tables_cover_every_fused_kernel():
    for act in kernels.ACTIVATIONS:
        assert {act, f"bias_{act}", f"{act}_grad"} <= set(ck.FORMULAS)
    for name in ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "adagrad", "rmsprop",
                 "rmsprop_centered", "rmsprop_momentum", "rmsprop_centered_momentum"):  # fmt: skip
        assert name in ck.FORMULAS


def test_importing_and_evaluating_the_gpu_table_does_not_import_cupy():
    code = ("import sys, numpy as np; from distnet.kernels import cupy_elementwise as ck\n"
            "ck.evaluate(ck.FORMULAS['sgd'], {'p': np.ones(3, np.float32), 'g': np.ones(3, "
            "np.float32)}, {'lr': 0.1}); print('cupy' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# -- on a GPU ---------------------------------------------------------------------------------

gpu = pytest.mark.skipif(
    backend.gpu_skip_reason() is not None, reason=str(backend.gpu_skip_reason())
)


@gpu
@pytest.mark.parametrize("name", sorted(ck.FORMULAS))
def test_gpu_kernel_matches_the_numpy_path(name):  # pragma: no cover  (needs a GPU)
    import cupy  # noqa: PLC0415

    f = ck.FORMULAS[name]
    host = _arrays(f, n=100_003)
    device = {k: cupy.asarray(v) for k, v in host.items()}
    ck.run(name, device, _scalars_for(name))
    want = _reference(name, host)
    for out in f.outputs:
        np.testing.assert_allclose(cupy.asnumpy(device[out]), want[out], rtol=1e-5, atol=1e-6)


@gpu
def test_gpu_arrays_go_through_the_cupy_table():  # pragma: no cover  (needs a GPU)
    import cupy  # noqa: PLC0415

    rng = np.random.default_rng(6)
    z = rng.standard_normal((64, 70)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    zg = cupy.asarray(z)
    kernels.bias_activation_(zg, cupy.asarray(b), "tanh")
    np.testing.assert_allclose(cupy.asnumpy(zg), np.tanh(z + b), rtol=1e-5, atol=1e-6)
    gb = cupy.empty(70, cupy.float32)
    g = rng.standard_normal((64, 70)).astype(np.float32)
    d = kernels.activation_backward("tanh", zg, cupy.asarray(g), gb)
    y = np.tanh(z + b)
    np.testing.assert_allclose(cupy.asnumpy(d), g * (1 - y * y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(gb), (g * (1 - y * y)).sum(0), rtol=1e-4, atol=1e-4)
