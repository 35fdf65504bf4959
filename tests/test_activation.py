"""Activations: erf, GELU, softmax, log-softmax and dropout.

Each derivation has one home, the docstring of its Function: erf in
minivit/ops/special.py; GELU, Softmax, LogSoftmax and Dropout in
minivit/ops/activation.py.  These tests check, in order:

1. erf (W. J. Cody's rational approximations; NumPy has none) equals Python's math.erf
   to a few float64 ulp over every range of the algorithm, the range boundaries and the
   tails (test_erf_matches_math_erf_to_float64_rounding), and at 0, -0, +-inf and NaN
   (test_erf_special_values).
2. GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, and its tanh approximation
   x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), value by value
   (test_gelu_forward_matches_the_definition_elementwise).
3. GELU's backward is the derived dy/dx: Phi(x) + x phi(x) for the exact form
   (test_gelu_backward_is_phi_plus_x_times_density); (1 + t)/2 + x/2 (1 - t^2) c
   (1 + 3 a x^2) for the tanh form (test_gelu_tanh_backward_follows_the_derived_formula),
   which is also what autograd finds through its pieces
   (test_gelu_tanh_backward_matches_autograd_of_its_composition).
4. GELU passes float64 gradient checks (test_gelu_gradcheck), which catch a backward
   without the x phi(x) term (test_gradcheck_catches_a_gelu_without_the_density_term).
5. softmax is exp(x) / sum exp(x) along any axis, forward and backward against autograd
   of that composition (test_softmax_matches_exp_over_sum_forward_and_backward).
6. Its backward is J^T g with J_ik = y_i (delta_ik - y_k), that is
   dx = y * (g - sum(g * y)) (test_softmax_backward_is_the_jacobian_vector_product), and
   passes gradient checks (test_softmax_gradcheck).
7. The gradient check catches a softmax backward without the leading y
   (test_gradcheck_catches_a_softmax_backward_without_the_leading_y); a cotangent of
   ones cannot, since sum(y) = 1 makes both gradients 0
   (test_a_ones_cotangent_cannot_see_the_missing_y).
8. Subtracting max(x) keeps softmax and log-softmax finite for logits of 1000 and more
   (test_softmax_and_log_softmax_are_stable_for_huge_logits).
9. log-softmax is x - log sum exp(x) (test_log_softmax_forward_and_backward_match_a_composition);
   its backward is dx = g - softmax(x) * sum(g)
   (test_log_softmax_backward_follows_the_derived_formula); gradient checks pass
   (test_log_softmax_gradcheck).
10. Dropout is the identity for p = 0 and in evaluation
    (test_dropout_is_the_identity_for_p_0_and_in_evaluation); in training it zeros a
    fraction p and scales the rest by 1/(1-p), keeping the mean
    (test_dropout_zeros_a_fraction_p_and_keeps_the_mean), with a mask fixed by the seed
    (test_dropout_mask_is_fixed_by_the_seed).
11. Dropout's backward is dx = g * m / (1 - p)
    (test_dropout_backward_is_g_times_mask_over_keep_probability), and passes gradient
    checks with a fixed mask (test_dropout_gradcheck_with_a_fixed_mask).
12. Patch dropout keeps the [CLS] token and a random subset of max(1, int(N (1 - p)))
    distinct patch tokens per image, each row of the output one row of the input
    (test_patch_dropout_keeps_distinct_rows_of_each_image); it is the identity for p = 0
    and in evaluation, and its subsets are fixed by the seed and differ between images
    (test_patch_dropout_is_the_identity_in_evaluation_and_seeded).
13. Its backward puts each row of g back where its token came from, zeros elsewhere
    (test_keep_tokens_backward_puts_rows_back), and passes gradient checks
    (test_patch_dropout_gradcheck).

Then float32 staying float32 (erf included) and the errors.
"""
import math

import numpy as np
import pytest

import minivit as mv
from minivit import backend
from minivit.ops.activation import (GELU, Softmax, dropout, erf, gelu, keep_tokens,
                                    log_softmax, patch_dropout, softmax)

from conftest import as_numpy, numpy_grad


def _t(a, device, requires_grad=True):
    return mv.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad,
                     device=device)


def _transposed(a, device):
    """A tensor whose array is a non-contiguous (transposed) view, on `device`."""
    base = mv.tensor(np.asarray(a, dtype=np.float64), device=device)
    x = mv.Tensor(base.data.swapaxes(-1, -2), requires_grad=True)
    assert not x.data.flags.c_contiguous
    return x


def _erf_points():
    tiny = np.logspace(-300, -1, 600)
    return np.concatenate([
        np.linspace(-7, 7, 14001),                     # every range, both signs
        tiny, -tiny, [5e-324, 1e-310, -1e-310],        # tiny, incl. subnormals
        np.linspace(0.46, 0.48, 201), np.linspace(3.99, 4.01, 201),  # range boundaries
        np.nextafter(0.46875, [0, 1]), np.nextafter(4.0, [0, 8]),
        np.linspace(5.8, 6.2, 41), [10.0, 26.0, 1e10, 1e300, -1e300],  # erf rounds to +-1
    ])


# --- erf --------------------------------------------------------------------------------

def test_erf_matches_math_erf_to_float64_rounding(device):
    """Cody's approximation is good to a few units in the last place (ulp) of float64."""
    x = _erf_points()
    expected = np.array([math.erf(v) for v in x])
    got = as_numpy(erf(backend.asarray(x, device=device)))
    assert got.dtype == np.float64
    ulps = np.abs(got - expected) / np.spacing(np.abs(expected))
    assert ulps.max() <= 8, f"erf is {ulps.max()} ulp off at x = {x[ulps.argmax()]!r}"
    rel = np.abs(got - expected) / np.maximum(np.abs(expected), np.finfo(float).tiny)
    assert rel.max() < 2e-15           # NumPy here: at most 4 ulp, 4.5e-16


def test_erf_special_values(device):
    got = as_numpy(erf(backend.asarray([0.0, -0.0, np.inf, -np.inf, np.nan],
                                               device=device)))
    np.testing.assert_array_equal(got[:4], [0.0, 0.0, 1.0, -1.0])
    assert np.signbit(got[1]) and np.isnan(got[4])
    # odd function, and integer input is computed in float64
    ints = as_numpy(erf(backend.asarray([-2, -1, 0, 1, 2], device=device)))
    assert ints.dtype == np.float64
    np.testing.assert_array_equal(ints, -ints[::-1])
    np.testing.assert_allclose(ints[3:], [math.erf(1), math.erf(2)], rtol=1e-15)


# --- GELU -------------------------------------------------------------------------------

def _gelu_erf(v):
    return v * 0.5 * (1 + math.erf(v / math.sqrt(2)))


def _gelu_erf_derivative(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(
        2 * math.pi)


def _gelu_tanh(v):
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def test_gelu_forward_matches_the_definition_elementwise(device, rng):
    x = np.concatenate([rng.standard_normal(200) * 3, [-10, -6, -1, 0, 1e-8, 1, 6, 10]])
    exact = gelu(_t(x, device)).numpy()
    tanh = gelu(_t(x, device), approximate="tanh").numpy()
    np.testing.assert_allclose(exact, [_gelu_erf(v) for v in x], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(tanh, [_gelu_tanh(v) for v in x], rtol=1e-14, atol=1e-15)
    # the approximation is close to the exact form, but not equal to it
    assert 1e-5 < np.abs(exact - tanh).max() < 1e-3


def test_gelu_backward_is_phi_plus_x_times_density(device, rng):
    x = rng.standard_normal((4, 7)) * 2
    g = rng.standard_normal((4, 7))
    t = _t(x, device)
    gelu(t).backward(backend.asarray(g, device=device))
    expected = g * np.vectorize(_gelu_erf_derivative)(x)
    np.testing.assert_allclose(numpy_grad(t), expected, rtol=1e-13, atol=1e-15)


def test_gelu_tanh_backward_follows_the_derived_formula(device, rng):
    """t = tanh(u), u = c (x + a x^3): dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)."""
    x, g = rng.standard_normal((4, 7)) * 2, rng.standard_normal((4, 7))
    xt = _t(x, device)
    gelu(xt, approximate="tanh").backward(backend.asarray(g, device=device))
    c, a = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(c * (x + a * x ** 3))
    dy_dx = (1 + t) / 2 + x / 2 * (1 - t ** 2) * c * (1 + 3 * a * x ** 2)
    np.testing.assert_allclose(numpy_grad(xt), g * dy_dx, rtol=1e-13, atol=1e-15)


def test_gelu_tanh_backward_matches_autograd_of_its_composition(device, rng):
    """The fused derivative equals what the engine derives from the formula's pieces."""
    x = rng.standard_normal((3, 2, 5)) * 2
    g = backend.asarray(rng.standard_normal((3, 2, 5)), device=device)
    a, b = _t(x, device), _t(x, device)
    ya = gelu(a, approximate="tanh")
    yb = 0.5 * b * (1 + mv.tanh(math.sqrt(2 / math.pi) * (b + 0.044715 * b ** 3)))
    np.testing.assert_allclose(ya.numpy(), yb.numpy(), rtol=1e-14, atol=1e-15)
    ya.backward(g)
    yb.backward(g)
    np.testing.assert_allclose(numpy_grad(a), numpy_grad(b),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("approximate", ["erf", "tanh"])
def test_gelu_gradcheck(device, rng, approximate):
    x = _t(rng.standard_normal((2, 3, 5)) * 2, device)
    assert mv.gradcheck(lambda x: gelu(x, approximate), x) < 1e-6
    xt = _transposed(rng.standard_normal((3, 4)) * 2, device)
    assert mv.gradcheck(lambda x: gelu(x, approximate), xt) < 1e-6


class GELUForgetsTheDensity(GELU):
    """Wrong on purpose: dx = g Phi(x), the product rule's x phi(x) term dropped."""

    def backward(self, g):
        return g * self.saved                          # Phi(x) alone


def test_gradcheck_catches_a_gelu_without_the_density_term(device, rng):
    x = _t(rng.standard_normal((2, 3)), device)
    with pytest.raises(mv.GradcheckError):
        mv.gradcheck(lambda x: GELUForgetsTheDensity()(x), x)


# --- softmax and log-softmax ------------------------------------------------------------

def _softmax_composed(x, axis):
    e = mv.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax_matches_exp_over_sum_forward_and_backward(device, rng, axis):
    x = rng.standard_normal((2, 3, 5))
    g = backend.asarray(rng.standard_normal((2, 3, 5)), device=device)
    a, b = _t(x, device), _t(x, device)
    ya, yb = softmax(a, axis=axis), _softmax_composed(b, axis)
    expected = np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(ya.numpy(), expected, rtol=1e-14)
    np.testing.assert_allclose(ya.numpy(), yb.numpy(), rtol=1e-14)
    ya.backward(g)
    yb.backward(g)
    np.testing.assert_allclose(numpy_grad(a), numpy_grad(b),
                               rtol=1e-11, atol=1e-14)


def test_softmax_backward_is_the_jacobian_vector_product(device, rng):
    """dx = J^T g with J_ik = y_i (delta_ik - y_k), built explicitly for each row."""
    x, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    t = _t(x, device)
    y = softmax(t)
    y.backward(backend.asarray(g, device=device))
    yn = y.numpy()
    for r in range(3):
        jacobian = np.diag(yn[r]) - np.outer(yn[r], yn[r])
        np.testing.assert_allclose(numpy_grad(t)[r], jacobian.T @ g[r],
                                   rtol=1e-12, atol=1e-15)
    # which is the derived closed form, no K x K Jacobian needed
    np.testing.assert_allclose(numpy_grad(t), yn * (g - (g * yn).sum(-1, keepdims=True)),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_gradcheck(device, rng, axis):
    assert mv.gradcheck(lambda x: softmax(x, axis), _t(rng.standard_normal((2, 3, 5)),
                                                       device)) < 1e-6
    xt = _transposed(rng.standard_normal((4, 3)), device)
    assert mv.gradcheck(lambda x: softmax(x, axis if axis < 2 else -1), xt) < 1e-6


class SoftmaxWithoutLeadingY(Softmax):
    """Wrong on purpose: dx = g - sum(g * y), the leading factor y forgotten."""

    def backward(self, g):
        return g - (g * self.y).sum(axis=self.axis, keepdims=True)


def test_gradcheck_catches_a_softmax_backward_without_the_leading_y(device, rng):
    x = _t(rng.standard_normal((2, 3, 5)), device)
    with pytest.raises(mv.GradcheckError):
        mv.gradcheck(lambda x: SoftmaxWithoutLeadingY(-1)(x), x)


def test_a_ones_cotangent_cannot_see_the_missing_y(device, rng):
    """Why gradcheck seeds a random g: with g = 1 both backwards give 0 (sum y = 1)."""
    x = rng.standard_normal((2, 5))
    right, wrong = _t(x, device), _t(x, device)
    ones = backend.asarray(np.ones((2, 5)), device=device)
    softmax(right).backward(ones)
    SoftmaxWithoutLeadingY(-1)(wrong).backward(ones)
    np.testing.assert_allclose(numpy_grad(right), 0, atol=1e-15)
    np.testing.assert_allclose(numpy_grad(wrong), 0, atol=1e-15)


def test_softmax_and_log_softmax_are_stable_for_huge_logits(device, rng):
    """exp(1000) overflows float64; exp(x - max x) cannot."""
    x = 1000 + rng.standard_normal((4, 6))
    x[0, 0] = 1e4                                       # one dominant logit
    s = x - x.max(-1, keepdims=True)                    # NumPy reference on shifted logits
    expected = {softmax: np.exp(s) / np.exp(s).sum(-1, keepdims=True),
                log_softmax: s - np.log(np.exp(s).sum(-1, keepdims=True))}
    for f in (softmax, log_softmax):
        t = _t(x, device)
        y = f(t)
        y.backward(backend.asarray(rng.standard_normal((4, 6)), device=device))
        assert np.isfinite(y.numpy()).all() and np.isfinite(numpy_grad(t)).all()
        np.testing.assert_allclose(y.numpy(), expected[f], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(softmax(_t(x, device)).numpy().sum(-1), 1, rtol=1e-14)


@pytest.mark.parametrize("axis", [-1, 0])
def test_log_softmax_forward_and_backward_match_a_composition(device, rng, axis):
    x = rng.standard_normal((3, 2, 4))
    g = backend.asarray(rng.standard_normal((3, 2, 4)), device=device)
    a, b = _t(x, device), _t(x, device)
    ya = log_softmax(a, axis)
    shifted = b - b.max(axis=axis, keepdims=True)
    yb = shifted - mv.log(mv.exp(shifted).sum(axis=axis, keepdims=True))
    np.testing.assert_allclose(ya.numpy(), np.log(np.exp(x) / np.exp(x).sum(axis, keepdims=True)),
                               rtol=1e-13)
    np.testing.assert_allclose(ya.numpy(), yb.numpy(), rtol=1e-14)
    ya.backward(g)
    yb.backward(g)
    np.testing.assert_allclose(numpy_grad(a), numpy_grad(b),
                               rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("axis", [-1, 0])
def test_log_softmax_backward_follows_the_derived_formula(device, rng, axis):
    """dy_i/dx_k = delta_ik - p_k with p = softmax(x), so dx = g - p * sum(g)."""
    x, g = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    t = _t(x, device)
    log_softmax(t, axis).backward(backend.asarray(g, device=device))
    p = np.exp(x) / np.exp(x).sum(axis, keepdims=True)
    np.testing.assert_allclose(numpy_grad(t), g - p * g.sum(axis, keepdims=True),
                               rtol=1e-12, atol=1e-15)


def test_log_softmax_gradcheck(device, rng):
    assert mv.gradcheck(lambda x: log_softmax(x, 1), _t(rng.standard_normal((2, 3, 5)),
                                                        device)) < 1e-6
    assert mv.gradcheck(log_softmax, _transposed(rng.standard_normal((4, 3)), device)) < 1e-6


# --- dropout ----------------------------------------------------------------------------

def test_dropout_is_the_identity_for_p_0_and_in_evaluation(device, rng):
    x = _t(rng.standard_normal((3, 4)), device)
    assert dropout(x, 0.0, training=True, rng=backend.generator(0, device)) is x
    assert dropout(x, 0.5, training=False) is x


def test_dropout_zeros_a_fraction_p_and_keeps_the_mean(device):
    p = 0.25
    x = _t(np.ones((400, 500)), device)
    y = dropout(x, p, training=True, rng=backend.generator(0, device)).numpy()
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-15)   # survivors scaled up
    assert abs((~kept).mean() - p) < 0.005                        # ~p of them dropped
    assert abs(y.mean() - 1) < 0.01                               # E[y] = x


def test_dropout_mask_is_fixed_by_the_seed(device, rng):
    x = _t(rng.standard_normal((8, 16)), device)
    a = dropout(x, 0.5, rng=backend.generator(7, device)).numpy()
    b = dropout(x, 0.5, rng=backend.generator(7, device)).numpy()
    c = dropout(x, 0.5, rng=backend.generator(8, device)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a == 0, c == 0)


def test_dropout_backward_is_g_times_mask_over_keep_probability(device, rng):
    x = _t(rng.standard_normal((2, 3, 5)), device)
    mask = rng.random((2, 3, 5)) > 0.3
    g = rng.standard_normal((2, 3, 5))
    y = dropout(x, 0.3, mask=backend.asarray(mask, device=device))
    y.backward(backend.asarray(g, device=device))
    np.testing.assert_allclose(y.numpy(), x.numpy() * mask / 0.7, rtol=1e-15)
    np.testing.assert_allclose(numpy_grad(x), g * mask / 0.7, rtol=1e-15)


def test_dropout_gradcheck_with_a_fixed_mask(device, rng):
    x = _t(rng.standard_normal((2, 3, 5)), device)
    # a fresh generator with the same seed inside fn: every call draws the same mask
    assert mv.gradcheck(lambda x: dropout(x, 0.4, rng=backend.generator(0, device)), x) < 1e-6
    per_sample = backend.asarray(np.array([1, 0], bool).reshape(2, 1, 1), device=device)
    assert mv.gradcheck(lambda x: dropout(x, 0.5, mask=per_sample), x) < 1e-6


# --- patch dropout ----------------------------------------------------------------------

def _kept_rows(z, y):
    """For each image b, the token index of every row of y[b] within z[b] (rows are
    distinct random vectors, so each matches exactly one)."""
    same = (y[:, :, None, :] == z[:, None, :, :]).all(axis=-1)      # (B, K, T)
    assert (same.sum(axis=-1) == 1).all()
    return same.argmax(axis=-1)


def test_patch_dropout_keeps_distinct_rows_of_each_image(device, rng):
    z = rng.standard_normal((6, 1 + 16, 5))                  # [CLS] and 16 patch tokens
    for p, kept in ((0.25, 12), (0.5, 8), (0.3, 11), (0.99, 1)):
        y = patch_dropout(_t(z, device), p, rng=backend.generator(0, device), num_prefix=1)
        assert y.shape == (6, 1 + kept, 5)
        index = _kept_rows(z, y.numpy())
        assert (index[:, 0] == 0).all()                      # [CLS] first, always
        for row in index:                                    # patches: distinct, never [CLS]
            assert len(set(row.tolist())) == 1 + kept and (row[1:] >= 1).all()
    y = patch_dropout(_t(z, device), 0.5, rng=backend.generator(0, device))     # no prefix
    assert y.shape == (6, 8, 5) and len(set(_kept_rows(z, y.numpy())[0].tolist())) == 8


def test_patch_dropout_is_the_identity_in_evaluation_and_seeded(device, rng):
    z = _t(rng.standard_normal((8, 16, 3)), device)
    assert patch_dropout(z, 0.0, rng=backend.generator(0, device)) is z
    assert patch_dropout(z, 0.5, training=False) is z

    def subsets(seed):
        y = patch_dropout(z, 0.5, rng=backend.generator(seed, device)).numpy()
        return [frozenset(row.tolist()) for row in _kept_rows(z.numpy(), y)]
    assert subsets(3) == subsets(3)
    assert subsets(3) != subsets(4)
    assert len(set(subsets(3))) > 1                          # each image draws its own


def test_keep_tokens_backward_puts_rows_back(device, rng):
    z = _t(rng.standard_normal((2, 5, 3)), device)
    keep = np.array([[4, 0, 2], [1, 3, 0]])
    g = rng.standard_normal((2, 3, 3))
    y = keep_tokens(z, backend.asarray(keep, device=device))
    y.backward(backend.asarray(g, device=device))
    expected = np.zeros((2, 5, 3))
    for b in range(2):
        for j in range(3):
            np.testing.assert_array_equal(y.numpy()[b, j], z.numpy()[b, keep[b, j]])
            expected[b, keep[b, j]] = g[b, j]
    np.testing.assert_array_equal(numpy_grad(z), expected)   # dropped tokens: exact zeros


def test_patch_dropout_gradcheck(device, rng):
    z = _t(rng.standard_normal((3, 1 + 6, 4)), device)
    # a fresh generator with the same seed inside fn: every call keeps the same tokens
    assert mv.gradcheck(lambda z: patch_dropout(z, 0.5, rng=backend.generator(0, device),
                                                num_prefix=1), z) < 1e-6


# --- errors, dtypes and devices ---------------------------------------------------------

def test_erf_of_float32_input_is_float32_and_float32_accurate(device):
    """Float32 takes the cheaper rational approximation (Eigen's and XLA's): a few
    float32 ulp on normal numbers, within 5e-7 everywhere."""
    x = _erf_points()
    x = x[np.abs(x) < 1e30].astype(np.float32)              # float32 holds these
    expected = np.array([math.erf(float(v)) for v in x])     # erf of the float32 values
    got = as_numpy(erf(backend.asarray(x, device=device)))
    assert got.dtype == np.float32
    normal = np.abs(x) >= np.finfo(np.float32).tiny          # subnormals keep fewer digits
    ulps32 = np.abs(got - expected) / np.spacing(np.abs(expected).astype(np.float32))
    assert ulps32[normal].max() <= 8                          # NumPy here: 5.4 ulp
    assert np.abs(got - expected).max() < 5e-7


def test_gelu_keeps_float32(device, rng):
    x = mv.tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True,
                  device=device)
    for approximate in ("erf", "tanh"):
        x.grad = None
        y = gelu(x, approximate)
        y.backward(backend.asarray(np.ones((3, 4), np.float32), device=device))
        assert y.dtype == np.float32 and x.grad.dtype == np.float32


def test_softmax_and_log_softmax_keep_float32(device, rng):
    x = mv.tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True,
                  device=device)
    for f in (softmax, log_softmax):
        x.grad = None
        y = f(x)
        y.backward(backend.asarray(np.ones((3, 4), np.float32), device=device))
        assert y.dtype == np.float32 and x.grad.dtype == np.float32


def test_dropout_keeps_float32(device, rng):
    x = mv.tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True,
                  device=device)
    y = dropout(x, 0.5, rng=backend.generator(0, device))
    y.backward(backend.asarray(np.ones((3, 4), np.float32), device=device))
    assert y.dtype == np.float32 and x.grad.dtype == np.float32


def test_patch_dropout_keeps_float32(device, rng):
    z = mv.tensor(rng.standard_normal((2, 8, 4)).astype(np.float32), requires_grad=True,
                  device=device)
    y = patch_dropout(z, 0.5, rng=backend.generator(0, device))
    y.backward(backend.asarray(np.ones((2, 4, 4), np.float32), device=device))
    assert y.dtype == np.float32 and z.grad.dtype == np.float32


def test_patch_dropout_rejects_bad_input(device):
    z = _t(np.ones((2, 4, 3)), device)
    for p in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match=r"p must be a fraction in \[0, 1\), got"):
            patch_dropout(z, p, rng=backend.generator(0, device))
    with pytest.raises(ValueError, match="needs rng="):
        patch_dropout(z, 0.5)
    with pytest.raises(ValueError, match=r"tokens of shape \(B, T, D\), got shape \(4, 3\)"):
        patch_dropout(_t(np.ones((4, 3)), device), 0.5, rng=backend.generator(0, device))
    with pytest.raises(ValueError, match="num_prefix 4 leaves no patch token of the 4 tokens"):
        patch_dropout(z, 0.5, rng=backend.generator(0, device), num_prefix=4)


def test_gelu_rejects_an_unknown_approximation(device):
    with pytest.raises(ValueError, match=r"approximate must be one of \('erf', 'tanh'\).*"
                                         r"got 'none'"):
        gelu(_t([1.0], device), approximate="none")


def test_softmax_rejects_a_bad_axis(device):
    x = _t(np.zeros((2, 3)), device)
    with pytest.raises(ValueError, match="softmax: axis 2 is out of range for an array with 2"):
        softmax(x, axis=2)
    with pytest.raises(ValueError, match="log_softmax: axis -3 is out of range"):
        log_softmax(x, axis=-3)
    with pytest.raises(TypeError, match="axis must be an int, got tuple"):
        softmax(x, axis=(0, 1))


def test_dropout_rejects_bad_input(device):
    x = _t(np.ones((2, 3)), device)
    for p in (1.0, -0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\)"):
            dropout(x, p, rng=backend.generator(0, device))
    with pytest.raises(ValueError, match="needs rng="):
        dropout(x, 0.5)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 2\) does not broadcast to the "
                                         r"input's shape \(2, 3\)"):
        dropout(x, 0.5, mask=backend.asarray(np.ones((3, 2), bool), device=device))


def test_erf_refuses_tensors_with_a_clear_message():
    with pytest.raises(TypeError, match="erf works on raw arrays"):
        erf(mv.tensor([0.5]))
