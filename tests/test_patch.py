"""im2col, col2im, conv2d and the patch embedding of Eq. 1.

The derivations have one home each in minivit/ops/patch.py: Im2Col (cols = A x for a
0/1 selection matrix A, so the backward is A^T g), Col2Im (A^T, whose backward is A),
conv2d (a row of im2col times the kernel reshaped to (KH*KW*C, D)) and patch_embed
(x_p E + b).  The loop definitions of im2col, col2im and the patch embedding are below,
the loop convolution is in tests/reference.py.  These tests check, in order:

1. im2col is cols[b, (r, s), (i, j, c)] = x_pad[b, c, SH r + i, SW s + j], channel
   fastest (test_im2col_matches_loops); col2im adds every entry back onto its pixel and
   drops the padding (test_col2im_matches_loops), so col2im(im2col(1)) counts the
   windows covering each pixel (test_col2im_of_im2col_counts_windows).
2. col2im is the adjoint of im2col, <im2col(x), c> = <x, col2im(c)>
   (test_adjoint_identity), hence each is the other's backward
   (test_im2col_backward_is_col2im); both pass float64 gradient checks
   (test_gradcheck_im2col, test_gradcheck_col2im).
3. conv2d is y[b, d, r, s] = sum_{i,j,c} x_pad[b, c, SH r + i, SW s + j] w[i, j, c, d]
   + bias[d] (test_conv2d_matches_loops); its backward is dW = cols^T g, dbias = sum g,
   dx = col2im(g W^T) (test_conv2d_backward_follows_the_chain_rule); gradient checks
   pass (test_gradcheck_conv2d).
4. patchify is im2col with kernel = stride = P (test_patchify_equals_im2col_with_kernel_stride_p),
   and unpatchify inverts it (test_unpatchify_inverts_patchify).
5. The patch embedding x_p E + b (Eq. 1) is the strided convolution, and the loops
   (test_patch_embed_equals_strided_conv_and_loops); the official (P, P, C, D) kernel
   reshaped as is gives E, and another flattening order would not
   (test_official_kernel_layout).
6. Its backward: dE = sum x_p^T dz, db = sum dz, dx = col2im(dz E^T)
   (test_patch_embed_backward_follows_the_chain_rule); gradient checks pass
   (test_gradcheck_patch_embed).
7. 224 x 224 x 3 images with P = 16 give N = 196 patches of 768 values, every pixel
   once (test_vit_base_patch_numbers).

Then float32 staying float32 and the errors.
"""
import numpy as np
import pytest

import minivit as mv
from minivit.ops.patch import col2im, conv2d, im2col, patch_embed, patchify, unpatchify

from conftest import numpy_grad
from reference import loop_conv2d


# (x shape, kernel, stride, padding): overlapping windows with padding, the patch case
# kernel = stride = P, rectangular options, and windows that skip the last row/column.
GEOMETRIES = [
    ((2, 3, 7, 6), 3, 2, 1),
    ((2, 3, 8, 12), 4, 4, 0),
    ((1, 2, 5, 7), (2, 3), (1, 2), (0, 1)),
    ((2, 2, 6, 6), 3, 2, 0),
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def loop_im2col(x, kernel, stride, padding):
    """cols[b, (r, s), (i, j, c)] = x_pad[b, c, SH*r + i, SW*s + j], one entry at a time."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    B, C, H, W = x.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    cols = np.zeros((B, oh * ow, kh * kw * C), dtype=x.dtype)
    for b in range(B):
        for r in range(oh):
            for s in range(ow):
                row = [x_pad[b, c, sh * r + i, sw * s + j]
                       for i in range(kh) for j in range(kw) for c in range(C)]
                cols[b, r * ow + s] = row
    return cols


def loop_col2im(cols, image_shape, kernel, stride, padding):
    """Add every column entry back onto the pixel it names; drop the padding."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    B, C, H, W = image_shape
    oh, ow = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    x_pad = np.zeros((B, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for b in range(B):
        for r in range(oh):
            for s in range(ow):
                k = 0
                for i in range(kh):
                    for j in range(kw):
                        for c in range(C):
                            x_pad[b, c, sh * r + i, sw * s + j] += cols[b, r * ow + s, k]
                            k += 1
    return x_pad[:, :, ph:ph + H, pw:pw + W]


def loop_patch_embed(x, kernel, bias, P):
    """z[b, n, d] = sum_{i,j,c} x[b, c, P*gr + i, P*gc + j] kernel[i, j, c, d] + bias[d],
    n = gr * (W/P) + gc: the official (P, P, C, D) kernel applied patch by patch."""
    B, C, H, W = x.shape
    D = kernel.shape[3]
    gh, gw = H // P, W // P
    z = np.zeros((B, gh * gw, D))
    for b in range(B):
        for gr in range(gh):
            for gc in range(gw):
                patch = x[b, :, P * gr:P * gr + P, P * gc:P * gc + P]      # (C, P, P)
                for d in range(D):
                    z[b, gr * gw + gc, d] = bias[d] + sum(
                        patch[c, i, j] * kernel[i, j, c, d]
                        for i in range(P) for j in range(P) for c in range(C))
    return z


# --- im2col and col2im ------------------------------------------------------------------

@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
def test_im2col_matches_loops(device, rng, shape, kernel, stride, padding):
    x = rng.standard_normal(shape)
    cols = im2col(mv.tensor(x, device=device), kernel, stride, padding)
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    oh, ow = out_size(shape[2], kh, sh, ph), out_size(shape[3], kw, sw, pw)
    assert cols.shape == (shape[0], oh * ow, kh * kw * shape[1])
    np.testing.assert_array_equal(cols.numpy(), loop_im2col(x, kernel, stride, padding))


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
def test_col2im_matches_loops(device, rng, shape, kernel, stride, padding):
    cols = loop_im2col(np.zeros(shape), kernel, stride, padding)
    cols = rng.standard_normal(cols.shape)
    x = col2im(mv.tensor(cols, device=device), shape, kernel, stride, padding)
    assert x.shape == shape
    np.testing.assert_allclose(x.numpy(), loop_col2im(cols, shape, kernel, stride, padding),
                               rtol=1e-12, atol=1e-12)


def test_col2im_of_im2col_counts_windows(device):
    # col2im(im2col(1)) = how many 3x3 windows (stride 1, padding 1) cover each pixel:
    # 9 inside, 6 on an edge, 4 in a corner of a 5x5 image.
    ones = mv.tensor(np.ones((1, 1, 5, 5)), device=device)
    counts = col2im(im2col(ones, 3, 1, 1), (1, 1, 5, 5), 3, 1, 1).numpy()[0, 0]
    expected = np.full((5, 5), 9.0)
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 6
    expected[0, 0] = expected[0, -1] = expected[-1, 0] = expected[-1, -1] = 4
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
def test_adjoint_identity(device, rng, shape, kernel, stride, padding):
    # <im2col(x), c> == <x, col2im(c)> for random x and c
    x = rng.standard_normal(shape)
    c = rng.standard_normal(loop_im2col(x, kernel, stride, padding).shape)
    lhs = (im2col(mv.tensor(x, device=device), kernel, stride, padding).numpy() * c).sum()
    rhs = (x * col2im(mv.tensor(c, device=device), shape, kernel, stride, padding).numpy()).sum()
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def test_im2col_backward_is_col2im(device, rng):
    x = mv.tensor(rng.standard_normal((2, 3, 7, 6)), requires_grad=True, device=device)
    cols = im2col(x, 3, 2, 1)
    g = rng.standard_normal(cols.shape)
    cols.backward(mv.tensor(g, device=device))
    np.testing.assert_allclose(numpy_grad(x),
                               loop_col2im(g, (2, 3, 7, 6), 3, 2, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES[:3])
def test_gradcheck_im2col(device, rng, shape, kernel, stride, padding):
    x = mv.tensor(rng.standard_normal(shape), requires_grad=True, device=device)
    mv.gradcheck(lambda x: im2col(x, kernel, stride, padding), x)


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES[:3])
def test_gradcheck_col2im(device, rng, shape, kernel, stride, padding):
    cols = loop_im2col(np.zeros(shape), kernel, stride, padding)
    c = mv.tensor(rng.standard_normal(cols.shape), requires_grad=True, device=device)
    mv.gradcheck(lambda c: col2im(c, shape, kernel, stride, padding), c)


# --- conv2d -----------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (1, 2))])
def test_conv2d_matches_loops(device, rng, stride, padding):
    x, w, b = (rng.standard_normal((2, 2, 6, 5)), rng.standard_normal((3, 2, 2, 4)),
               rng.standard_normal(4))
    y = conv2d(mv.tensor(x, device=device), mv.tensor(w, device=device),
               mv.tensor(b, device=device), stride, padding)
    np.testing.assert_allclose(y.numpy(), loop_conv2d(x, w, b, stride, padding),
                               rtol=1e-12, atol=1e-12)


def test_conv2d_backward_follows_the_chain_rule(device, rng):
    """y = im2col(x) W + bias: dW = cols^T g, dbias = sum of g, dx = col2im(g W^T)."""
    x, w, bias = (rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 3, 2, 4)),
                  rng.standard_normal(4))
    xt, wt, bt = (mv.tensor(a, requires_grad=True, device=device) for a in (x, w, bias))
    y = conv2d(xt, wt, bt, 2, 1)                                        # (2, 4, 3, 3)
    g = rng.standard_normal(y.shape)
    y.backward(mv.tensor(g, device=device))
    cols = loop_im2col(x, 3, 2, 1)                                      # (B, OH*OW, 18)
    g_rows = g.reshape(2, 4, 9).transpose(0, 2, 1)                      # (B, OH*OW, D)
    W = w.reshape(18, 4)
    np.testing.assert_allclose(numpy_grad(wt), np.einsum("bnk,bnd->kd", cols, g_rows)
                               .reshape(w.shape), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(numpy_grad(bt), g.sum((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(xt), loop_col2im(g_rows @ W.T, x.shape, 3, 2, 1),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (1, 2))])
def test_gradcheck_conv2d(device, rng, stride, padding):
    x = mv.tensor(rng.standard_normal((2, 2, 5, 5)), requires_grad=True, device=device)
    w = mv.tensor(rng.standard_normal((3, 3, 2, 3)), requires_grad=True, device=device)
    b = mv.tensor(rng.standard_normal(3), requires_grad=True, device=device)
    mv.gradcheck(lambda x, w, b: conv2d(x, w, b, stride, padding), x, w, b)


# --- patches and the patch embedding ----------------------------------------------------

def test_patchify_equals_im2col_with_kernel_stride_p(device, rng):
    x = rng.standard_normal((2, 3, 8, 12))
    xa = mv.tensor(x, requires_grad=True, device=device)
    xb = mv.tensor(x, requires_grad=True, device=device)
    pa, pb = patchify(xa, 4), im2col(xb, 4, 4, 0)
    np.testing.assert_array_equal(pa.numpy(), pb.numpy())
    g = mv.tensor(rng.standard_normal(pa.shape), device=device)
    pa.backward(g)
    pb.backward(g)
    np.testing.assert_array_equal(numpy_grad(xa), numpy_grad(xb))


def test_unpatchify_inverts_patchify(device, rng):
    x = rng.standard_normal((2, 3, 8, 12))
    patches = patchify(mv.tensor(x, device=device), 4)
    np.testing.assert_array_equal(unpatchify(patches, x.shape, 4).numpy(), x)
    p = rng.standard_normal((2, 6, 48))
    np.testing.assert_array_equal(
        patchify(unpatchify(mv.tensor(p, device=device), (2, 3, 8, 12), 4), 4).numpy(), p)


def test_patch_embed_equals_strided_conv_and_loops(device, rng):
    P, C, D = 4, 3, 5
    x = rng.standard_normal((2, C, 8, 12))
    kernel, bias = rng.standard_normal((P, P, C, D)), rng.standard_normal(D)
    z = patch_embed(mv.tensor(x, device=device), mv.tensor(kernel.reshape(P * P * C, D),
                    device=device), mv.tensor(bias, device=device), P)
    assert z.shape == (2, 6, D)
    y = conv2d(mv.tensor(x, device=device), mv.tensor(kernel, device=device),
               mv.tensor(bias, device=device), stride=P)            # (B, D, H/P, W/P)
    y = y.numpy().reshape(2, D, 6).transpose(0, 2, 1)               # (B, N, D)
    np.testing.assert_allclose(z.numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z.numpy(), loop_patch_embed(x, kernel, bias, P),
                               rtol=1e-12, atol=1e-12)


def test_official_kernel_layout(device, rng):
    # The official ViT stores the embedding as a conv kernel[i, j, c, d] of shape
    # (P, P, C, D); reshaped as is to (P*P*C, D) it is the E of Eq. 1.
    P, C, D = 2, 3, 4
    x = rng.standard_normal((1, C, 4, 6))
    kernel, bias = rng.standard_normal((P, P, C, D)), rng.standard_normal(D)
    E = kernel.reshape(P * P * C, D)
    z = patch_embed(mv.tensor(x, device=device), mv.tensor(E, device=device),
                    mv.tensor(bias, device=device), P).numpy()
    np.testing.assert_allclose(z, loop_patch_embed(x, kernel, bias, P), rtol=1e-12, atol=1e-12)
    # a wrong flattening order (channel slowest, as PyTorch's (D, C, P, P) would give)
    # is a different map: the test above could fail
    E_wrong = kernel.transpose(2, 0, 1, 3).reshape(P * P * C, D)
    z_wrong = patch_embed(mv.tensor(x, device=device), mv.tensor(E_wrong, device=device),
                          mv.tensor(bias, device=device), P).numpy()
    assert not np.allclose(z_wrong, z)


def test_patch_embed_backward_follows_the_chain_rule(device, rng):
    """z = x_p E + b with x_p = patchify(x): dE = sum over images and patches of x_p^T dz,
    db = sum of dz, and dx = col2im(dz E^T), each patch's gradient put back on its pixels."""
    P, C, D = 2, 3, 5
    x, dz = rng.standard_normal((2, C, 4, 6)), rng.standard_normal((2, 6, D))
    E, b = rng.standard_normal((P * P * C, D)), rng.standard_normal(D)
    xt, Et, bt = (mv.tensor(a, requires_grad=True, device=device) for a in (x, E, b))
    patch_embed(xt, Et, bt, P).backward(mv.tensor(dz, device=device))
    x_p = loop_im2col(x, P, P, 0)                                       # (B, N, P*P*C)
    np.testing.assert_allclose(numpy_grad(Et), np.einsum("bnk,bnd->kd", x_p, dz), rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(bt), dz.sum((0, 1)), rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(xt), loop_col2im(dz @ E.T, x.shape, P, P, 0),
                               rtol=1e-12, atol=1e-14)


def test_gradcheck_patch_embed(device, rng):
    x = mv.tensor(rng.standard_normal((2, 3, 4, 6)), requires_grad=True, device=device)
    E = mv.tensor(rng.standard_normal((2 * 2 * 3, 5)), requires_grad=True, device=device)
    b = mv.tensor(rng.standard_normal(5), requires_grad=True, device=device)
    mv.gradcheck(lambda x, E, b: patch_embed(x, E, b, 2), x, E, b)


def test_vit_base_patch_numbers(device):
    # 224 x 224 x 3 image, P = 16: 196 patches of 768 values, every pixel exactly once
    x = mv.tensor(np.zeros((1, 3, 224, 224), dtype=np.float32), device=device)
    patches = patchify(x, 16)
    assert patches.shape == (1, 196, 768)
    assert 196 == (224 // 16) ** 2 and 768 == 16 * 16 * 3
    assert patches.shape[1] * patches.shape[2] == 150528 == 224 * 224 * 3


# --- errors, dtypes and devices ---------------------------------------------------------

def test_float32_in_float32_grads(device, rng):
    f32 = np.float32
    x = mv.tensor(rng.standard_normal((2, 3, 8, 8)).astype(f32), requires_grad=True, device=device)
    w = mv.tensor(rng.standard_normal((3, 3, 3, 4)).astype(f32), requires_grad=True, device=device)
    b = mv.tensor(rng.standard_normal(4).astype(f32), requires_grad=True, device=device)
    E = mv.tensor(rng.standard_normal((48, 4)).astype(f32), requires_grad=True, device=device)
    c = mv.tensor(rng.standard_normal((2, 16, 27)).astype(f32), requires_grad=True, device=device)
    outputs = [conv2d(x, w, b, stride=2, padding=1), patch_embed(x, E, b, 4),
               unpatchify(patchify(x, 4), (2, 3, 8, 8), 4),
               col2im(c, (2, 3, 8, 8), 3, 2, 1), im2col(x, 3, 2, 1)]
    for y in outputs:
        assert y.dtype == np.float32
        y.backward(mv.tensor(np.ones(y.shape, dtype=f32), device=device))
    for t in (x, w, b, E, c):
        assert t.grad.dtype == np.float32


def test_patchify_needs_divisible_sizes(device):
    x = mv.tensor(np.zeros((1, 3, 30, 32)), device=device)
    with pytest.raises(ValueError, match=r"H=30 and width W=32 .*patch size P=16"):
        patchify(x, 16)
    with pytest.raises(ValueError, match=r"H=30 and width W=32 .*patch size P=16"):
        patch_embed(x, np.zeros((768, 8)), None, 16)


def test_bad_input_messages(device):
    x = mv.tensor(np.zeros((1, 3, 8, 8)), device=device)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\), got shape \(3, 8, 8\)"):
        im2col(mv.tensor(np.zeros((3, 8, 8)), device=device), 3)
    with pytest.raises(ValueError, match=r"kernel \(9, 9\) is larger than the padded image"):
        im2col(x, 9)
    with pytest.raises(ValueError, match=r"stride must be >= 1"):
        im2col(x, 3, stride=0)
    with pytest.raises(TypeError, match=r"kernel must be an int or a pair"):
        im2col(x, 2.5)
    with pytest.raises(ValueError, match=r"have shape \(1, 64, 27\), got \(1, 64, 9\)"):
        col2im(mv.tensor(np.zeros((1, 64, 9)), device=device), (1, 3, 8, 8), 3, 1, 1)
    with pytest.raises(ValueError, match=r"same C_in, got x \(1, 3, 8, 8\) and weight "
                                         r"\(3, 3, 2, 4\)"):
        conv2d(x, mv.tensor(np.zeros((3, 3, 2, 4)), device=device))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(3,\)"):
        conv2d(x, mv.tensor(np.zeros((3, 3, 3, 4)), device=device),
               mv.tensor(np.zeros(3), device=device))
    with pytest.raises(ValueError, match=r"E must have shape \(P\*P\*C, D\) = \(48, D\)"):
        patch_embed(x, mv.tensor(np.zeros((12, 4)), device=device), None, 4)
    with pytest.raises(ValueError, match=r"patches of images \(1, 3, 8, 8\) .* have shape "
                                         r"\(1, 4, 48\), got \(1, 4, 12\)"):
        unpatchify(mv.tensor(np.zeros((1, 4, 12)), device=device), (1, 3, 8, 8), 4)
