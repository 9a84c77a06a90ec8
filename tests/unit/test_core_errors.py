"""Bad input to the core raises clear errors that name the op, shapes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest

import distnet as dn
from distnet import functional as F


def test_broadcast_mismatch_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"add: shapes \(3, 4\) and \(5,\) cannot be broadcast"):
        dn.Tensor(np.ones((3, 4))) + dn.Tensor(np.ones(5))


def test_matmul_mismatch_names_inner_dimensions():
    with pytest.raises(ValueError, match=r"matmul: shapes \(3, 4\) and \(5, 2\) do not align"):
        dn.Tensor(np.ones((3, 4))) @ dn.Tensor(np.ones((5, 2)))


def test_dtype_mismatch_is_not_promoted_silently():
    a = dn.Tensor(np.ones(3, np.float32))
    b = dn.Tensor(np.ones(3, np.float64))
    with pytest.raises(TypeError, match=r"mul: dtype mismatch: float32 \(3,\) and float64 \(3,\)"):
        a * b


def test_python_numbers_take_the_tensor_dtype():
    assert (dn.Tensor(np.ones(3, np.float32)) * 2.5).dtype == np.float32


def test_backward_on_non_scalar_needs_a_gradient():
    x = dn.Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"output of shape \(2, 3\) is not a scalar"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match="grad of shape"):
        (x * 2.0).backward(np.ones(3))


def test_backward_without_any_input_requiring_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (dn.Tensor(np.ones(2)) * 2.0).sum().backward()


def test_labels_out_of_range_and_of_wrong_type():
    z = dn.Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"label 3 out of range for 3 classes"):
        F.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(TypeError, match="labels must be integers"):
        F.cross_entropy(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) for 2 rows"):
        F.cross_entropy(z, np.array([0, 1, 2]))


def test_linear_names_the_misfit():
    with pytest.raises(ValueError, match=r"linear: input \(4, 3\) does not fit weight \(5, 2\)"):
        F.linear(dn.Tensor(np.ones((4, 3))), dn.Tensor(np.ones((5, 2))), dn.Tensor(np.ones(2)))


def test_loss_target_shape_mismatch():
    with pytest.raises(
        ValueError, match=r"mse_loss: target of shape \(3,\) for input of shape \(2, 3\)"
    ):
        F.mse_loss(dn.Tensor(np.ones((2, 3))), np.ones(3))


def test_reshape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"reshape: cannot reshape \(2, 3\) into \(4,\)"):
        dn.Tensor(np.ones((2, 3))).reshape(4)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dn.Tensor(np.ones(2)).to("tpu")
