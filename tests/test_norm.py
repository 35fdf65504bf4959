"""LayerNorm (the LN of ViT Eq. 2-4).

The derivation of the backward pass has one home: the docstring of LayerNorm in
minivit/ops/norm.py.  For each token x in R^D, x_hat = (x - mean(x)) / sigma with
sigma = sqrt(var(x) + eps), y = gamma * x_hat + beta; these tests check, in order:

1. The forward is that formula, row by row (test_layer_norm_forward_against_numpy_per_row):
   every row comes out with mean 0 and variance 1 (test_layer_norm_normalises_each_row),
   and eps is 1e-6, as in the official ViT code
   (test_default_eps_is_1e_minus_6_as_in_the_official_vit).
2. The backward is the derived formula: with g = dy * gamma,
   dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma, dgamma = sum(dy * x_hat),
   dbeta = sum(dy) (test_layer_norm_backward_follows_the_derived_formula).
3. It equals what autograd finds through the composition of primitives
   (test_layer_norm_matches_its_composition_forward_and_backward).
4. Float64 gradient checks pass, on a strided input too (test_layer_norm_gradcheck,
   test_layer_norm_gradcheck_on_a_transposed_input).
5. The gradient check, seeded with a random cotangent, catches a backward without the
   x_hat * mean(g * x_hat) term (test_gradcheck_catches_a_layer_norm_without_the_variance_term);
   a cotangent of ones with gamma = 1 cannot: then the true dx and the wrong one are both 0
   (test_a_ones_cotangent_with_unit_gamma_cannot_see_the_missing_term).
6. On CuPy, float32 LayerNorm runs as CUDA kernels (minivit/kernels/layernorm.cu) that
   keep mu and 1/sigma instead of x_hat.  On the stand-in, where a kernel runs its
   reference, the kernel path gives the reference path's y, dx, dgamma and dbeta, so the
   forward saves and the backward uses the right things
   (test_layer_norm_kernel_path_equals_the_reference_path); it is one launch each way
   (test_layer_norm_kernel_path_is_one_launch_each_way), and with MINIVIT_KERNELS=0 the
   reference runs (test_minivit_kernels_0_runs_the_layer_norm_reference).  On a real GPU
   the kernels equal their references at widths that are and are not multiples of 32
   (test_layer_norm_kernels_equal_their_references_on_a_gpu).

Then float32 staying float32 and the errors for parameters of the wrong shape.
"""
import inspect

import numpy as np
import pytest

import minivit as mv
from minivit import backend, kernels
from minivit.kernels import layernorm as layernorm_cuda
from minivit.ops import norm
from minivit.ops.norm import LayerNorm, layer_norm

from conftest import STANDIN, numpy_grad, require_cupy


def _t(a, device, requires_grad=True):
    return mv.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad,
                     device=device)


def _params(rng, d, device):
    return _t(1 + 0.5 * rng.standard_normal(d), device), _t(rng.standard_normal(d), device)


def _layer_norm_composed(x, gamma, beta, eps):
    """The same function from engine primitives; autograd derives its backward."""
    centred = x - x.mean(axis=-1, keepdims=True)
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / mv.sqrt(var + eps) * gamma + beta


# --- the forward pass -------------------------------------------------------------------

def test_layer_norm_forward_against_numpy_per_row(device, rng):
    x = rng.standard_normal((3, 4, 7))
    gamma, beta = _params(rng, 7, device)
    y = layer_norm(_t(x, device), gamma, beta, eps=1e-5).numpy()
    for i in range(3):
        for j in range(4):
            row = x[i, j]
            x_hat = (row - row.mean()) / np.sqrt(row.var() + 1e-5)
            np.testing.assert_allclose(y[i, j], x_hat * gamma.numpy() + beta.numpy(),
                                       rtol=1e-13, atol=1e-14)


def test_layer_norm_normalises_each_row(device, rng):
    d = 16
    y = layer_norm(_t(rng.standard_normal((5, d)) * 10 + 3, device),
                   _t(np.ones(d), device), _t(np.zeros(d), device)).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-14)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-7)      # var/(var + eps), eps tiny


def test_default_eps_is_1e_minus_6_as_in_the_official_vit(device):
    assert inspect.signature(layer_norm).parameters["eps"].default == 1e-6
    # a row with variance 1e-6: eps decides the scale, 1/sqrt(1e-6 + eps)
    x = np.array([[-1e-3, 1e-3]])
    y = layer_norm(_t(x, device), _t(np.ones(2), device), _t(np.zeros(2), device)).numpy()
    np.testing.assert_allclose(y, x / np.sqrt(1e-6 + 1e-6), rtol=1e-12)
    assert not np.allclose(y, x / np.sqrt(1e-6 + 1e-5), rtol=1e-3)


# --- the backward pass ------------------------------------------------------------------

def test_layer_norm_backward_follows_the_derived_formula(device, rng):
    x, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    gamma, beta = _params(rng, 5, device)
    t = _t(x, device)
    layer_norm(t, gamma, beta).backward(backend.asarray(dy, device=device))
    sigma = np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x_hat = (x - x.mean(-1, keepdims=True)) / sigma
    g = dy * gamma.numpy()
    dx = (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True)) / sigma
    np.testing.assert_allclose(numpy_grad(t), dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(numpy_grad(gamma), (dy * x_hat).sum((0, 1)),
                               rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(beta), dy.sum((0, 1)), rtol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5)])
def test_layer_norm_matches_its_composition_forward_and_backward(device, rng, shape):
    x = rng.standard_normal(shape) * 3 + 1
    g = backend.asarray(rng.standard_normal(shape), device=device)
    gamma, beta = _params(rng, shape[-1], device)
    a, b = _t(x, device), _t(x, device)
    ga, ba = _t(gamma.numpy(), device), _t(beta.numpy(), device)
    ya = layer_norm(a, gamma, beta)
    yb = _layer_norm_composed(b, ga, ba, 1e-6)
    np.testing.assert_allclose(ya.numpy(), yb.numpy(), rtol=1e-13, atol=1e-14)
    ya.backward(g)
    yb.backward(g)
    for fused, composed in ((a, b), (gamma, ga), (beta, ba)):
        np.testing.assert_allclose(numpy_grad(fused), numpy_grad(composed),
                                   rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5)])
def test_layer_norm_gradcheck(device, rng, shape):
    x = _t(rng.standard_normal(shape), device)
    gamma, beta = _params(rng, shape[-1], device)
    assert mv.gradcheck(layer_norm, x, gamma, beta) < 1e-6


def test_layer_norm_gradcheck_on_a_transposed_input(device, rng):
    base = mv.tensor(rng.standard_normal((2, 6, 4)), device=device)
    x = mv.Tensor(base.data.swapaxes(-1, -2), requires_grad=True)     # shape (2, 4, 6)
    assert not x.data.flags.c_contiguous
    gamma, beta = _params(rng, 6, device)
    assert mv.gradcheck(layer_norm, x, gamma, beta) < 1e-6


class LayerNormWithoutVarianceTerm(LayerNorm):
    """Wrong on purpose: dx = (g - mean(g)) / sigma, the x_hat * mean(g * x_hat) term dropped."""

    def backward(self, dy):
        dx, dgamma, dbeta = super().backward(dy)
        g = dy * self.gamma
        missing = self.x_hat * (g * self.x_hat).mean(axis=-1, keepdims=True) * self.inv_sigma
        return dx + missing, dgamma, dbeta


def test_gradcheck_catches_a_layer_norm_without_the_variance_term(device, rng):
    x = _t(rng.standard_normal((2, 3, 5)), device)
    gamma, beta = _params(rng, 5, device)
    with pytest.raises(mv.GradcheckError, match="input 0"):
        mv.gradcheck(lambda x, gm, bt: LayerNormWithoutVarianceTerm()(x, gm, bt),
                     x, gamma, beta)


def test_a_ones_cotangent_with_unit_gamma_cannot_see_the_missing_term(device, rng):
    x = rng.standard_normal((3, 5))
    ones = backend.asarray(np.ones((3, 5)), device=device)
    for fn in (LayerNorm(), LayerNormWithoutVarianceTerm()):
        t = _t(x, device)
        fn(t, _t(np.ones(5), device), _t(np.zeros(5), device)).backward(ones)
        np.testing.assert_allclose(numpy_grad(t), 0, atol=1e-12)


# --- errors, dtypes and devices ---------------------------------------------------------

def test_layer_norm_keeps_float32(device, rng):
    f32 = np.float32
    x = mv.tensor(rng.standard_normal((3, 4)).astype(f32), requires_grad=True, device=device)
    gamma = mv.tensor(np.ones(4, f32), requires_grad=True, device=device)
    beta = mv.tensor(np.zeros(4, f32), requires_grad=True, device=device)
    y = layer_norm(x, gamma, beta)
    y.backward(backend.asarray(np.ones((3, 4), f32), device=device))
    assert y.dtype == f32
    assert x.grad.dtype == gamma.grad.dtype == beta.grad.dtype == f32


def test_layer_norm_rejects_parameters_of_the_wrong_shape(device):
    x = _t(np.zeros((2, 3, 5)), device)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\), the size of the last "
                                         r"axis of x \(shape \(2, 3, 5\)\), got \(6,\)"):
        layer_norm(x, _t(np.ones(6), device), _t(np.zeros(5), device))
    with pytest.raises(ValueError, match=r"beta must have shape \(5,\).*got \(1, 5\)"):
        layer_norm(x, _t(np.ones(5), device), _t(np.zeros((1, 5)), device))
    with pytest.raises(ValueError, match="needs an input with a feature axis"):
        layer_norm(_t(1.0, device), _t(np.ones(1), device), _t(np.zeros(1), device))


# --- the CUDA kernels -------------------------------------------------------------------

@pytest.fixture
def kernels_on(monkeypatch):
    """Kernels on for this test, whatever MINIVIT_KERNELS says outside it."""
    monkeypatch.setenv("MINIVIT_KERNELS", "1")
    if not kernels.on():
        pytest.skip("kernels are off (MINIVIT_REFERENCE=1)")


def _f32(rng, shape, device="cuda"):
    return backend.asarray(rng.standard_normal(shape).astype(np.float32), device=device)


def _layer_norm_passes(rng, monkeypatch, use_kernels):
    """y, dx, dgamma, dbeta of a float32 LayerNorm on the CuPy backend, the Function used."""
    monkeypatch.setenv("MINIVIT_KERNELS", use_kernels)
    x, dy = _f32(rng, (3, 5, 40)), _f32(rng, (3, 5, 40))
    gamma, beta = _f32(rng, 40), _f32(rng, 40)
    fn = LayerNorm()
    y = fn.forward(x, gamma, beta)
    return [backend.to_device(a, "cpu") for a in (y, *fn.backward(dy))], fn


def test_layer_norm_kernel_path_equals_the_reference_path(standin, kernels_on, monkeypatch):
    (want, ref), (got, fast) = (_layer_norm_passes(np.random.default_rng(0), monkeypatch, k)
                                for k in ("0", "1"))
    assert ref.x_hat is not None and fast.x_hat is None          # the two paths ran
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_layer_norm_kernel_path_is_one_launch_each_way(standin, kernels_on):
    rng = np.random.default_rng(1)
    x, dy, gamma, beta = _f32(rng, (4, 9, 24)), _f32(rng, (4, 9, 24)), _f32(rng, 24), _f32(rng, 24)
    fn = LayerNorm()
    fn.forward(x, gamma, beta)
    fn.backward(dy)                                  # the first calls check the kernels
    standin.reset()
    fn = LayerNorm()
    fn.forward(x, gamma, beta)
    assert standin.counts()["launches"] == 1
    standin.reset()
    fn.backward(dy)
    assert standin.counts()["launches"] == 1         # on a GPU: dx, then the column sums
    assert norm.LAYER_NORM_FORWARD.status == norm.LAYER_NORM_BACKWARD.status == "ok"


def test_minivit_kernels_0_runs_the_layer_norm_reference(standin, monkeypatch):
    rng = np.random.default_rng(2)
    monkeypatch.setenv("MINIVIT_KERNELS", "0")
    fn = LayerNorm()
    fn.forward(_f32(rng, (2, 8)), _f32(rng, 8), _f32(rng, 8))
    assert fn.x_hat is not None
    assert standin.counts()["launches"] > 2


@pytest.mark.parametrize("shape", [(7, 64), (130, 192), (33, 200), (5, 3, 768), (4, 1000)])
def test_layer_norm_kernels_equal_their_references_on_a_gpu(shape, kernels_on):
    require_cupy()
    if STANDIN:
        pytest.skip("runs the CUDA kernels themselves: needs a real GPU")
    rng = np.random.default_rng(3)
    d = shape[-1]
    x, dy = 3 + 2 * _f32(rng, shape), _f32(rng, shape)
    gamma, beta = _f32(rng, d), _f32(rng, d)
    got = layernorm_cuda.forward(x, gamma, beta, 1e-6)
    want = norm._forward_reference(x, gamma, beta, 1e-6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(backend.to_device(g, "cpu"), backend.to_device(w, "cpu"),
                                   rtol=1e-4, atol=1e-5)
    _, mu, inv_sigma = want
    got = layernorm_cuda.backward(dy, x, gamma, mu, inv_sigma)
    want = norm._backward_reference(dy, x, gamma, mu, inv_sigma)
    for g, w in zip(got, want):
        np.testing.assert_allclose(backend.to_device(g, "cpu"), backend.to_device(w, "cpu"),
                                   rtol=1e-4, atol=1e-4)
