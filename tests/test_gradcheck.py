"""The gradient check itself (minivit/gradcheck.py): it must pass correct backward passes
and catch wrong ones.

For y = f(x) it draws a random cotangent g and compares backward(g) with central
differences of phi(x) = <g, f(x)>, whose error is O(eps^2) + O(u |phi| / eps): about
1e-10 in float64 with eps = 1e-6.  These tests check, in order:

1. Central differences give the derivative of a known function, 3 x^2 for x^3, and leave
   x as it was (test_numerical_gradient_of_a_known_function).
2. A correct backward passes, with an error far below 1e-6 (test_correct_backward_passes).
3. A wrong one is caught even where a check seeded with ones (of sum(f(x))) misses it:
   for y = x - mean(x) the true dx = g - mean(g) is 0 when g is all ones, so a backward
   returning 0 agrees with it there; a random g tells them apart, and the message says
   where (test_wrong_backward_is_caught_although_a_ones_seed_misses_it).  The failing
   input is named (test_the_failing_input_is_named).
4. The largest relative error is returned, and rtol decides
   (test_returns_the_largest_relative_error_and_respects_rtol).
5. The check runs on float64 copies of float32 inputs, leaving them untouched
   (test_runs_in_float64_for_float32_inputs); inputs without grad are constants, and a
   check with none that requires grad is an error (test_inputs_without_grad_are_constants).
"""
import numpy as np
import pytest

import minivit as mv
from minivit.autograd import Function
from minivit.gradcheck import numerical_gradient


class CenterRight(Function):
    """y = x - mean(x):  dx = g - mean(g)."""

    def forward(self, x):
        return x - x.mean()

    def backward(self, g):
        return g - g.mean()


class CenterWrong(CenterRight):
    def backward(self, g):
        return g * 0                                   # right only when g is constant


# --- numerical gradients ----------------------------------------------------------------

def test_numerical_gradient_of_a_known_function():
    x = np.array([0.5, -1.0, 2.0])
    grad = numerical_gradient(lambda: float((x ** 3).sum()), x)
    np.testing.assert_allclose(grad, 3 * x ** 2, rtol=1e-9)
    np.testing.assert_array_equal(x, [0.5, -1.0, 2.0])   # restored after perturbing


# --- passing right and catching wrong ---------------------------------------------------

def test_correct_backward_passes(device, rng):
    x = mv.tensor(rng.standard_normal(5), requires_grad=True, device=device)
    err = mv.gradcheck(lambda x: CenterRight()(x), x)
    assert 0 <= err < 1e-8


def test_wrong_backward_is_caught_although_a_ones_seed_misses_it(device, rng):
    x_np = rng.standard_normal(5)
    x = mv.tensor(x_np, requires_grad=True, device=device)
    CenterWrong()(x).sum().backward()                  # the ones-seeded check: gradient 0 ...
    phi = lambda: CenterRight()(mv.tensor(x_np)).sum().item()   # noqa: E731
    np.testing.assert_allclose(numerical_gradient(phi, x_np), 0, atol=1e-9)   # ... agrees
    with pytest.raises(mv.GradcheckError) as info:
        mv.gradcheck(lambda x: CenterWrong()(x), x)
    message = str(info.value)
    assert "input 0 (shape (5,))" in message and "at index (" in message
    assert "analytic gradient is" in message and "numerical one is" in message
    assert "relative error" in message


def test_the_failing_input_is_named(device, rng):
    class MulWrongB(Function):
        def forward(self, a, b):
            self.a, self.b = a, b
            return a * b

        def backward(self, g):
            return g * self.b, g * self.b             # db should be g * a

    a = mv.tensor(rng.standard_normal(3), requires_grad=True, device=device)
    b = mv.tensor(rng.standard_normal(3), requires_grad=True, device=device)
    with pytest.raises(mv.GradcheckError, match=r"input 1 \(shape \(3,\)\)"):
        mv.gradcheck(lambda a, b: MulWrongB()(a, b), a, b)


def test_returns_the_largest_relative_error_and_respects_rtol(device, rng):
    class SlightlyOff(Function):
        def forward(self, x):
            return x * 3.0

        def backward(self, g):
            return g * 3.0 * (1 + 1e-4)                # a relative error of 1e-4

    x = mv.tensor(rng.standard_normal(4) + 2.0, requires_grad=True, device=device)
    err = mv.gradcheck(lambda x: SlightlyOff()(x), x, rtol=1e-3)
    assert 0.9e-4 < err < 1.1e-4
    with pytest.raises(mv.GradcheckError):
        mv.gradcheck(lambda x: SlightlyOff()(x), x)    # default rtol 1e-6


# --- errors, dtypes and devices ---------------------------------------------------------

def test_runs_in_float64_for_float32_inputs(device, rng):
    x = mv.tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True,
                  device=device)
    assert mv.gradcheck(lambda x: (x * x).tanh().sum(axis=0), x) < 1e-8
    assert x.dtype == np.float32 and x.grad is None    # the inputs themselves are untouched


def test_inputs_without_grad_are_constants(device, rng):
    x = mv.tensor(rng.standard_normal(3), requires_grad=True, device=device)
    c = mv.tensor(rng.standard_normal(3), device=device)
    assert mv.gradcheck(lambda x, c, k: x * c * k, x, c, 2.0) < 1e-8
    with pytest.raises(ValueError, match="no input has requires_grad=True"):
        mv.gradcheck(lambda c: c * 2.0, c)
