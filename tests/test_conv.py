"""The operations of the hybrid's ResNet stem (Sec. 3.1): "SAME" convolutions, max
pooling, weight standardisation and GroupNorm.

Each derivation has one home: same_padding and conv2d in minivit/ops/patch.py,
MaxPool2d and WeightStandardize in minivit/ops/conv.py, GroupNorm in
minivit/ops/norm.py.  The loop definitions of the convolution, weight standardisation
and GroupNorm are in tests/reference.py.  These tests check, in order:

1. "SAME" padding (TensorFlow's, as in the official Flax code) keeps ceil(n / s) outputs,
   padding p = max((ceil(n/s) - 1) s + k - n, 0) zeros, p // 2 before and the rest after:
   (2, 3) for the root's 7x7/2 at 224 px, (0, 1) for the pool at 112
   (test_same_padding_of_the_official_root_block, test_same_padding_keeps_ceil_n_over_s_outputs).
2. A "SAME" conv2d is the loop convolution with that padding
   (test_conv2d_same_matches_loops), not PyTorch's symmetric padding
   (test_same_is_not_the_symmetric_padding); "VALID" is no padding (test_valid_is_no_padding).
3. With the asymmetric padding im2col and col2im stay adjoint
   (test_same_im2col_and_col2im_are_adjoint), and the convolution passes float64
   gradient checks (test_gradcheck_conv2d_same).
4. Max pooling takes each window's largest pixel, and its backward sends each window's
   g to that pixel, dx[h, w] = sum of g over the windows whose maximum is (h, w)
   (test_max_pool_matches_loops_forward_and_backward); the -inf padding never wins
   (test_max_pool_pads_with_minus_infinity); gradient checks pass on inputs without ties
   (test_gradcheck_max_pool); at a tie the gradient goes to the window's first maximum
   (test_a_tie_sends_the_gradient_to_the_first_maximum).
5. Weight standardisation is (w - mean) / (std + 1e-5) per output channel
   (test_weight_standardize_matches_loops), with eps added outside the root, as the
   official code does (test_eps_is_added_to_the_standard_deviation), so it ignores a
   channel's scale and shift (test_weight_standardize_ignores_the_scale_and_shift_of_each_channel).
6. Its backward is the derived dw = (g - mean(g)) / d - w_hat * mean(g * w_hat) / s,
   d = s + eps (test_weight_standardize_backward_follows_the_derived_formula); gradient
   checks pass (test_gradcheck_weight_standardize).
7. GroupNorm normalises each group of C/G channels and all its pixels as one vector
   (test_group_norm_matches_loops): one group is a LayerNorm over (C, H, W)
   (test_one_group_is_a_layer_norm_over_channels_and_pixels), and images never mix
   (test_group_norm_never_mixes_the_images_of_a_batch).
8. Its backward is LayerNorm's formula within each group, with g = dy * gamma_c:
   dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma, dgamma_c = sum dy x_hat,
   dbeta_c = sum dy (test_group_norm_backward_follows_the_derived_formula); gradient
   checks pass (test_gradcheck_group_norm).

Then float32 staying float32 and the errors.
"""
import numpy as np
import pytest

import minivit as mv
from minivit import backend
from minivit.ops.conv import max_pool2d, weight_standardize
from minivit.ops.norm import group_norm, layer_norm
from minivit.ops.patch import col2im, conv2d, im2col, same_padding

from conftest import numpy_grad
from reference import loop_conv2d, loop_group_norm, loop_weight_standardize


def _t(a, device, requires_grad=True):
    return mv.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad, device=device)


def distinct(rng, shape):
    """Values in [-1, 1) that are all different (at least 2/size apart): no ties in max."""
    size = int(np.prod(shape))
    return (rng.permutation(size) / size * 2 - 1).reshape(shape)


# --- "SAME" padding and convolutions ----------------------------------------------------

def test_same_padding_of_the_official_root_block():
    assert same_padding(224, 7, 2) == (2, 3)          # conv_root at 224 px
    assert same_padding(112, 3, 2) == (0, 1)          # the max pool after it
    assert same_padding(32, 7, 2) == (2, 3)           # cifar-hybrid: 32 -> 16
    assert same_padding(16, 3, 2) == (0, 1)           # 16 -> 8
    assert same_padding(56, 3, 1) == (1, 1)           # a 3x3 conv of a unit
    assert same_padding(56, 1, 2) == (0, 0)           # a strided 1x1 projection


@pytest.mark.parametrize("n", range(1, 12))
@pytest.mark.parametrize("k,s", [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2), (2, 3)])
def test_same_padding_keeps_ceil_n_over_s_outputs(n, k, s):
    before, after = same_padding(n, k, s)
    out = -(-n // s)
    assert (n + before + after - k) // s + 1 == out
    assert 0 <= after - before <= 1                    # the odd row goes at the end
    assert (out - 1) * s + k <= n + before + after     # the last window fits


# (image, kernel (KH, KW, C_in, C_out), stride): the root conv's 7x7/2 at an odd and an
# even size, a unit's 3x3 at stride 1 and 2, a 1x1 projection with stride 2, and a
# rectangular image.
SAME_CASES = [((2, 3, 12, 12), (7, 7, 3, 4), 2), ((1, 2, 9, 9), (7, 7, 2, 3), 2),
              ((2, 3, 6, 6), (3, 3, 3, 2), 1), ((1, 2, 7, 8), (3, 3, 2, 3), 2),
              ((2, 4, 5, 5), (1, 1, 4, 3), 2), ((1, 2, 5, 8), (3, 3, 2, 2), 2)]


@pytest.mark.parametrize("shape,kshape,stride", SAME_CASES)
def test_conv2d_same_matches_loops(device, rng, shape, kshape, stride):
    x, w = rng.standard_normal(shape), rng.standard_normal(kshape)
    y = conv2d(_t(x, device), _t(w, device), None, stride, "SAME")
    assert y.shape[2:] == (-(-shape[2] // stride), -(-shape[3] // stride))
    np.testing.assert_allclose(y.numpy(), loop_conv2d(x, w, None, stride, "SAME"),
                               rtol=1e-12, atol=1e-12)


def test_same_is_not_the_symmetric_padding(device, rng):
    """At 12 px a 7x7/2 conv pads (2, 3) in TensorFlow; PyTorch ports pad (3, 3), which
    shifts every window by one pixel: different outputs."""
    x = _t(rng.standard_normal((1, 1, 12, 12)), device)
    w = _t(rng.standard_normal((7, 7, 1, 1)), device)
    same = conv2d(x, w, None, 2, "SAME").numpy()
    np.testing.assert_array_equal(same, conv2d(x, w, None, 2, ((2, 3), (2, 3))).numpy())
    symmetric = conv2d(x, w, None, 2, 3).numpy()
    assert same.shape == symmetric.shape and not np.allclose(same, symmetric)


def test_valid_is_no_padding(device, rng):
    x = _t(rng.standard_normal((1, 2, 9, 9)), device)
    w = _t(rng.standard_normal((3, 3, 2, 2)), device)
    np.testing.assert_array_equal(conv2d(x, w, None, 2, "VALID").numpy(),
                                  conv2d(x, w, None, 2, 0).numpy())


@pytest.mark.parametrize("shape,kernel,stride", [((2, 3, 7, 8), 3, 2), ((1, 2, 9, 9), 7, 2)])
def test_same_im2col_and_col2im_are_adjoint(device, rng, shape, kernel, stride):
    x = rng.standard_normal(shape)
    cols = im2col(_t(x, device), kernel, stride, "SAME")
    c = rng.standard_normal(cols.shape)
    back = col2im(_t(c, device), shape, kernel, stride, "SAME").numpy()
    np.testing.assert_allclose((cols.numpy() * c).sum(), (x * back).sum(), rtol=1e-12)


@pytest.mark.parametrize("shape,kshape,stride", [SAME_CASES[0], SAME_CASES[3], SAME_CASES[4]])
def test_gradcheck_conv2d_same(device, rng, shape, kshape, stride):
    x, w = _t(rng.standard_normal(shape), device), _t(rng.standard_normal(kshape), device)
    assert mv.gradcheck(lambda x, w: conv2d(x, w, None, stride, "SAME"), x, w) < 1e-6


# --- max pooling ------------------------------------------------------------------------

def loop_max_pool(x, k, stride):
    """y[b, c, r, s] = the largest x[b, c, h, w] of the window, pixels outside ignored;
    and for each window the pixel (h, w) where it sits."""
    B, C, H, W = x.shape
    (top, _), (left, _) = same_padding(H, k, stride), same_padding(W, k, stride)
    oh, ow = -(-H // stride), -(-W // stride)
    y, where = np.zeros((B, C, oh, ow)), {}
    for b in range(B):
        for c in range(C):
            for r in range(oh):
                for s in range(ow):
                    window = [(x[b, c, h, v], (h, v))
                              for h in range(stride * r - top, stride * r - top + k)
                              for v in range(stride * s - left, stride * s - left + k)
                              if 0 <= h < H and 0 <= v < W]
                    y[b, c, r, s], where[b, c, r, s] = max(window)
    return y, where


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (1, 1, 16, 16)])
def test_max_pool_matches_loops_forward_and_backward(device, rng, shape):
    x, g = distinct(rng, shape), rng.standard_normal((shape[0], shape[1], -(-shape[2] // 2),
                                                       -(-shape[3] // 2)))
    t = _t(x, device)
    y = max_pool2d(t, 3, 2, "SAME")
    expected, where = loop_max_pool(x, 3, 2)
    np.testing.assert_array_equal(y.numpy(), expected)
    y.backward(backend.asarray(g, device=device))
    dx = np.zeros_like(x)                     # each window's g lands on its maximum
    for (b, c, r, s), (h, v) in where.items():
        dx[b, c, h, v] += g[b, c, r, s]
    np.testing.assert_allclose(numpy_grad(t), dx, rtol=1e-14, atol=1e-14)


def test_max_pool_pads_with_minus_infinity(device):
    """All-negative images: a zero padding would win at the border, -inf never does."""
    x = -1 - np.arange(16.0).reshape(1, 1, 4, 4)
    y = max_pool2d(_t(x, device), 3, 2, "SAME").numpy()
    np.testing.assert_array_equal(y[0, 0], [[-1, -3], [-9, -11]])        # pads (0, 1)


@pytest.mark.parametrize("shape", [(2, 2, 6, 6), (1, 3, 5, 7)])
def test_gradcheck_max_pool(device, rng, shape):
    x = _t(distinct(rng, shape), device)
    assert mv.gradcheck(lambda x: max_pool2d(x, 3, 2, "SAME"), x) < 1e-6


def test_a_tie_sends_the_gradient_to_the_first_maximum(device):
    x = _t(np.ones((1, 1, 2, 2)), device)
    y = max_pool2d(x, 2, 2, "VALID")
    y.backward(backend.asarray(np.full((1, 1, 1, 1), 3.0), device=device))
    np.testing.assert_array_equal(numpy_grad(x)[0, 0], [[3, 0], [0, 0]])


# --- weight standardisation -------------------------------------------------------------

def test_weight_standardize_matches_loops(device, rng):
    w = rng.standard_normal((3, 3, 4, 5)) * 0.1 + 0.3
    y = weight_standardize(_t(w, device)).numpy()
    np.testing.assert_allclose(y, loop_weight_standardize(w, 1e-5), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-14)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1, rtol=1e-3)


def test_eps_is_added_to_the_standard_deviation(device):
    """Official: (w - mu) / (std + 1e-5).  For a channel with std 1e-5 that halves the
    result; the LayerNorm-like (w - mu) / sqrt(var + 1e-5) would divide by ~3e-3."""
    w = np.array([1e-5, -1e-5]).reshape(1, 1, 2, 1)
    y = weight_standardize(_t(w, device)).numpy()
    np.testing.assert_allclose(y.ravel(), [0.5, -0.5], rtol=1e-12)


def test_weight_standardize_ignores_the_scale_and_shift_of_each_channel(device, rng):
    w = rng.standard_normal((3, 3, 2, 4))
    a, b = np.array([0.5, 2.0, 10.0, 3.0]), np.array([1.0, -2.0, 0.0, 5.0])
    y = weight_standardize(_t(w, device)).numpy()
    ya = weight_standardize(_t(a * w + b, device)).numpy()
    np.testing.assert_allclose(ya, y, rtol=1e-4, atol=1e-4)           # equal up to eps


def test_weight_standardize_backward_follows_the_derived_formula(device, rng):
    w, g = rng.standard_normal((3, 3, 2, 4)), rng.standard_normal((3, 3, 2, 4))
    t = _t(w, device)
    weight_standardize(t).backward(backend.asarray(g, device=device))
    s = w.std(axis=(0, 1, 2), keepdims=True)
    d = s + 1e-5
    w_hat = (w - w.mean(axis=(0, 1, 2), keepdims=True)) / d
    mean = lambda a: a.mean(axis=(0, 1, 2), keepdims=True)            # noqa: E731
    np.testing.assert_allclose(numpy_grad(t), (g - mean(g)) / d - w_hat * mean(g * w_hat) / s,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(3, 3, 2, 3), (1, 1, 5, 2), (7, 7, 1, 2)])
def test_gradcheck_weight_standardize(device, rng, shape):
    assert mv.gradcheck(weight_standardize, _t(rng.standard_normal(shape), device)) < 1e-6


# --- GroupNorm --------------------------------------------------------------------------

def _affine(rng, C, device):
    return _t(1 + 0.5 * rng.standard_normal(C), device), _t(rng.standard_normal(C), device)


@pytest.mark.parametrize("shape,G", [((2, 8, 3, 3), 4), ((3, 6, 2, 5), 3), ((2, 32, 2, 2), 32)])
def test_group_norm_matches_loops(device, rng, shape, G):
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = _affine(rng, shape[1], device)
    y = group_norm(_t(x, device), gamma, beta, G).numpy()
    np.testing.assert_allclose(y, loop_group_norm(x, gamma.numpy(), beta.numpy(), G, 1e-6),
                               rtol=1e-12, atol=1e-12)


def test_one_group_is_a_layer_norm_over_channels_and_pixels(device, rng):
    x = rng.standard_normal((2, 4, 3, 3))
    ones, zeros = _t(np.ones(4), device), _t(np.zeros(4), device)
    y = group_norm(_t(x, device), ones, zeros, num_groups=1).numpy()
    flat = layer_norm(_t(x.reshape(2, -1), device), _t(np.ones(36), device),
                      _t(np.zeros(36), device)).numpy()
    np.testing.assert_allclose(y, flat.reshape(x.shape), rtol=1e-12, atol=1e-13)


def test_group_norm_never_mixes_the_images_of_a_batch(device, rng):
    x = rng.standard_normal((3, 8, 2, 2))
    gamma, beta = _affine(rng, 8, device)
    alone = group_norm(_t(x[1:2], device), gamma, beta, 4).numpy()
    np.testing.assert_array_equal(group_norm(_t(x, device), gamma, beta, 4).numpy()[1:2], alone)


def test_group_norm_backward_follows_the_derived_formula(device, rng):
    B, C, G = 2, 6, 3
    x, dy = rng.standard_normal((B, C, 2, 3)), rng.standard_normal((B, C, 2, 3))
    gamma, beta = _affine(rng, C, device)
    t = _t(x, device)
    group_norm(t, gamma, beta, G).backward(backend.asarray(dy, device=device))
    groups = x.reshape(B, G, -1)
    sigma = np.sqrt(groups.var(-1, keepdims=True) + 1e-6)
    x_hat = (groups - groups.mean(-1, keepdims=True)) / sigma
    g = (dy * gamma.numpy()[:, None, None]).reshape(B, G, -1)
    dx = (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True)) / sigma
    np.testing.assert_allclose(numpy_grad(t), dx.reshape(x.shape), rtol=1e-12, atol=1e-13)
    x_hat = x_hat.reshape(x.shape)
    np.testing.assert_allclose(numpy_grad(gamma), (dy * x_hat).sum((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(beta), dy.sum((0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("shape,G", [((2, 6, 2, 3), 3), ((1, 4, 3, 3), 1), ((2, 4, 2, 2), 4)])
def test_gradcheck_group_norm(device, rng, shape, G):
    x = _t(rng.standard_normal(shape), device)
    gamma, beta = _affine(rng, shape[1], device)
    assert mv.gradcheck(lambda x, gm, bt: group_norm(x, gm, bt, G), x, gamma, beta) < 1e-6


# --- errors, dtypes and devices ---------------------------------------------------------

def test_group_norm_keeps_float32(device, rng):
    f32 = np.float32
    x = mv.tensor(rng.standard_normal((2, 4, 3, 3)).astype(f32), requires_grad=True, device=device)
    gamma = mv.tensor(np.ones(4, f32), requires_grad=True, device=device)
    beta = mv.tensor(np.zeros(4, f32), requires_grad=True, device=device)
    y = group_norm(x, gamma, beta, 2)
    y.backward(backend.asarray(np.ones(y.shape, f32), device=device))
    assert y.dtype == x.grad.dtype == gamma.grad.dtype == beta.grad.dtype == f32


def test_padding_options_are_checked(device):
    x, w = _t(np.zeros((1, 1, 5, 5)), device), _t(np.zeros((3, 3, 1, 1)), device)
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'SAME' or 'VALID', "
                                         "got 'HALF'"):
        conv2d(x, w, None, 1, "HALF")
    with pytest.raises(ValueError, match=r"padding must be >= 0, got \(\(1, -1\), \(0, 0\)\)"):
        conv2d(x, w, None, 1, ((1, -1), (0, 0)))


def test_max_pool_rejects_bad_input(device):
    with pytest.raises(ValueError, match=r"floating images of shape \(B, C, H, W\), got shape "
                                         r"\(4, 4\)"):
        max_pool2d(_t(np.zeros((4, 4)), device))
    ints = mv.tensor(np.zeros((1, 1, 4, 4), dtype=np.int64), device=device)
    with pytest.raises(ValueError, match="dtype int64"):
        max_pool2d(ints)
    with pytest.raises(ValueError, match="windows of padding alone"):
        max_pool2d(_t(np.zeros((1, 1, 4, 4)), device), 2, 2, 2)


def test_weight_standardize_rejects_what_is_not_a_kernel(device):
    with pytest.raises(ValueError, match=r"kernel of shape \(KH, KW, C_in, C_out\), got shape "
                                         r"\(9, 4\)"):
        weight_standardize(_t(np.zeros((9, 4)), device))


def test_group_norm_rejects_bad_input(device):
    x = _t(np.zeros((2, 6, 3, 3)), device)
    with pytest.raises(ValueError, match=r"the 6 channels of x \(shape \(2, 6, 3, 3\)\) do not "
                                         r"split into 4 groups"):
        group_norm(x, _t(np.ones(6), device), _t(np.zeros(6), device), 4)
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\), one value per channel "
                                         r"of x \(shape \(2, 6, 3, 3\)\), got \(3,\)"):
        group_norm(x, _t(np.ones(3), device), _t(np.zeros(6), device), 3)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, C, ...\)"):
        group_norm(_t(np.zeros(6), device), _t(np.ones(6), device), _t(np.zeros(6), device), 3)
