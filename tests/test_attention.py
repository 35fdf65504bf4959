"""Scaled dot-product attention and multi-head self-attention (Appendix A, Eq. 5-8).

The derivation of the backward pass has one home: the docstring of
ScaledDotProductAttention in minivit/ops/attention.py.  With S = c q k^T, c = 1/sqrt(D_h),
A = softmax(S) by rows, a fixed dropout mask M, A' = A * M and out = A' v, these tests
check, in order:

1. The forward is Eq. 6-7 written with loops over batch, heads and tokens, with and
   without a mask, for cross-attention and without a batch axis
   (test_attention_matches_loops).
2. The scale c = 1/sqrt(D_h) is there (test_scale_matters).
3. Subtracting each row's maximum keeps scores of order 1e4 finite
   (test_large_scores_are_stable).
4. The returned weights are A before dropout, detached, while out stays in the graph
   (test_returned_weights_are_detached_softmax_before_dropout).
5. The backward is the derived formula, step by step: dv = A'^T g, dA = (g v^T) * M,
   dS = A * (dA - rowsum(dA * A)), dq = c dS k, dk = c dS^T q
   (test_attention_backward_follows_the_derived_formula).
6. It equals what autograd finds through matmul, max, exp, sum and div
   (test_attention_equals_its_composition_from_primitives).
7. Float64 gradient checks pass, with a mask and on strided inputs
   (test_gradcheck_attention, test_gradcheck_attention_non_contiguous).
8. They catch a backward without the scale in dq, without the row sum of the softmax
   step, or that ignores the mask (test_gradcheck_catches_wrong_backward).
9. split_heads gives head h the features h D_h ... (h+1) D_h - 1, and merge_heads undoes
   it (test_split_and_merge_heads).
10. MSA(z) = [SA_1; ...; SA_k] U_msa + b is Eq. 5-8 written with loops
    (test_multi_head_attention_matches_loops), and passes a gradient check
    (test_gradcheck_multi_head_attention).
11. The fast path self_attention, one node from qkv = z U_qkv + b, equals split_heads ->
    attention -> merge_heads in values, weights and gradient
    (test_self_attention_equals_split_attention_merge), and passes a gradient check
    (test_gradcheck_self_attention).
12. On CuPy the fused node lays q, k, v out C-contiguous (and transposed) so no batched
    product copies an operand, and float32 runs the scaled softmax and its backward as
    CUDA kernels (minivit/kernels/softmax.cu).  On the stand-in (a kernel runs its
    reference there) it gives the reference path's output, weights and gradient, with a
    mask too and with kernels off (test_gpu_attention_equals_the_reference_path); it
    takes 6 launches forward and 9 backward and makes no hidden copies
    (test_gpu_attention_launches_and_no_hidden_copies); with MINIVIT_KERNELS=0 the
    softmax reference runs (test_minivit_kernels_0_runs_the_softmax_reference).  On a
    real GPU the kernels equal their references for rows of 65, 197 and 577
    (test_softmax_kernels_equal_their_references_on_a_gpu).

Then float32 staying float32 and the errors for inputs of the wrong shape or type.  The
independent loop definitions are in tests/reference.py.
"""
import math

import numpy as np
import pytest

import minivit as mv
from minivit.ops.attention import (ScaledDotProductAttention, attention, merge_heads,
                                   multi_head_attention, self_attention, split_heads)

from conftest import STANDIN, as_numpy, numpy_grad, require_cupy
from reference import loop_attention, loop_mha, softmax


def t(array, device, requires_grad=True):
    return mv.tensor(array, requires_grad=requires_grad, device=device)


def dropout_mask(shape, p=0.25, seed=1):
    """A fixed inverted-dropout mask: 0 with probability p, else 1/(1-p)."""
    keep = np.random.default_rng(seed).random(shape) >= p
    return keep / (1 - p)


def composed_attention(q, k, v, mask=None):
    """The same formula from engine primitives, each with its own backward."""
    s = mv.matmul(q, mv.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    e = mv.exp(s - s.max(axis=-1, keepdims=True))
    a = e / e.sum(axis=-1, keepdims=True)
    if mask is not None:
        a = a * mask
    return mv.matmul(a, v)


def on(device, array):
    return mv.tensor(array, device=device).data


# --- the forward pass against loops -----------------------------------------------------

SHAPES = [((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4)),      # (B, heads, T, D_h)
          ((2, 3, 6), (2, 4, 6), (2, 4, 5)),               # cross-attention, D_v != D_h
          ((4, 2), (4, 2), (4, 3))]                        # no batch axis


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_loops(device, rng, shapes, masked):
    q, k, v = (rng.standard_normal(s) for s in shapes)
    mask = dropout_mask(q.shape[:-1] + (k.shape[-2],)) if masked else None
    out, weights = attention(t(q, device), t(k, device), t(v, device),
                             None if mask is None else on(device, mask), return_weights=True)
    want_out, want_weights = loop_attention(q, k, v, mask)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weights.numpy().sum(axis=-1), 1.0, rtol=1e-12)


def test_scale_matters(device, rng):
    """The 1/sqrt(D_h) of Eq. 6 is there: without it the result is measurably different."""
    q, k, v = (rng.standard_normal((2, 3, 5, 16)) for _ in range(3))
    out = attention(t(q, device), t(k, device), t(v, device)).numpy()
    np.testing.assert_allclose(out, loop_attention(q, k, v)[0], rtol=1e-12, atol=1e-12)
    unscaled = loop_attention(q, k, v, scale=1.0)[0]
    assert np.abs(out - unscaled).max() > 0.1


def test_large_scores_are_stable(device, rng):
    """Scores of order 1e4 overflow a naive exp; subtracting the row maximum does not."""
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    q *= 1e4
    out, weights = attention(t(q, device), t(k, device), t(v, device), return_weights=True)
    assert np.isfinite(out.numpy()).all()
    np.testing.assert_allclose(out.numpy(), loop_attention(q, k, v)[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.numpy().sum(axis=-1), 1.0, rtol=1e-12)


def test_returned_weights_are_detached_softmax_before_dropout(device, rng):
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    mask = dropout_mask((2, 3, 5, 5))
    qt, kt, vt = t(q, device), t(k, device), t(v, device)
    out, weights = attention(qt, kt, vt, on(device, mask), return_weights=True)
    assert isinstance(weights, mv.Tensor) and not weights.requires_grad
    assert weights.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(weights.numpy(), loop_attention(q, k, v)[1], rtol=1e-12)
    np.testing.assert_allclose(weights.numpy().sum(axis=-1), 1.0, rtol=1e-12)  # not A * M
    out.sum().backward()                       # the output is still part of the graph
    assert qt.grad is not None and kt.grad is not None and vt.grad is not None


# --- the backward pass, step by step ----------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_attention_backward_follows_the_derived_formula(device, rng, masked):
    """dv, dA, dS, dq and dk in NumPy, one line each as the derivation writes them; dA and
    dS also against minivit's gradients of a leaf A and a leaf S."""
    q, k = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 6, 4))
    v, g = rng.standard_normal((2, 3, 6, 3)), rng.standard_normal((2, 3, 5, 3))
    M = dropout_mask((2, 3, 5, 6)) if masked else np.ones((2, 3, 5, 6))
    qt, kt, vt = t(q, device), t(k, device), t(v, device)
    out = attention(qt, kt, vt, on(device, M) if masked else None)
    out.backward(on(device, g))
    T = lambda a: a.swapaxes(-1, -2)                                   # noqa: E731
    c = 1 / math.sqrt(4)
    S = c * q @ T(k)
    A = softmax(S)
    dv = T(A * M) @ g                                                  # dv = A'^T g
    dA = (g @ T(v)) * M                                                # dA = (g v^T) * M
    dS = A * (dA - (dA * A).sum(-1, keepdims=True))                    # the softmax step
    dq, dk = c * dS @ k, c * T(dS) @ q                                 # dq = c dS k, dk = c dS^T q
    np.testing.assert_allclose(numpy_grad(vt), dv, rtol=1e-12, atol=1e-14)
    # dA and dS: the gradients that out = (A * M) v sends to a leaf A, and through
    # softmax to a leaf S
    At, St, v_const = t(A, device), t(S, device), t(v, device, False)
    mv.matmul(At * on(device, M), v_const).backward(on(device, g))
    mv.matmul(mv.softmax(St) * on(device, M), v_const).backward(on(device, g))
    np.testing.assert_allclose(numpy_grad(At), dA, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(numpy_grad(St), dS, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(numpy_grad(qt), dq, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(numpy_grad(kt), dk, rtol=1e-12, atol=1e-14)
    # the row sum of the softmax step equals g_i . out_i (what FusedSelfAttention uses)
    np.testing.assert_allclose((dA * A).sum(-1), (g * out.numpy()).sum(-1), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_its_composition_from_primitives(device, rng, masked):
    """Same values, and the hand-derived backward gives the gradients that autograd finds
    through matmul, max, exp, sum and div."""
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    mask = on(device, dropout_mask((2, 3, 5, 5))) if masked else None
    g = rng.standard_normal((2, 3, 5, 4))
    results = []
    for fn in (attention, composed_attention):
        tensors = [t(x, device) for x in (q, k, v)]
        out = fn(*tensors, mask)
        out.backward(mv.tensor(g, device=device))
        results.append([out.numpy()] + [x.grad for x in tensors])
    for fused, composed in zip(*results):
        np.testing.assert_allclose(as_numpy(fused), as_numpy(composed),
                                   rtol=1e-10, atol=1e-12)


# --- gradient checks --------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_attention(device, rng, masked):
    q, k, v = (t(rng.standard_normal((2, 3, 5, 4)), device) for _ in range(3))
    mask = on(device, dropout_mask((2, 3, 5, 5))) if masked else None
    assert mv.gradcheck(lambda q, k, v: attention(q, k, v, mask), q, k, v) < 1e-6


def test_gradcheck_attention_non_contiguous(device, rng):
    """Inputs that are transposed views (strided, not C-contiguous), and a transpose inside."""
    def view(shape):
        base = mv.tensor(rng.standard_normal(shape), device=device).data
        return mv.Tensor(base.swapaxes(-1, -2), requires_grad=True)  # (2, 3, 5, 4), strided
    q, k, v = view((2, 3, 4, 5)), view((2, 3, 4, 5)), view((2, 3, 4, 5))
    assert not q.data.flags.c_contiguous
    mask = on(device, dropout_mask((2, 3, 5, 5)))
    mv.gradcheck(lambda q, k, v: attention(q, k, v, mask), q, k, v)
    kt = t(rng.standard_normal((2, 3, 4, 5)), device)                # k given as k^T
    mv.gradcheck(lambda q, kt, v: attention(q, mv.swapaxes(kt, -1, -2), v), q, kt, v)


class NoScaleInDq(ScaledDotProductAttention):
    """Forgets the 1/sqrt(D_h) in dq = c dS k."""
    def backward(self, g):
        dq, dk, dv = super().backward(g)
        return dq * math.sqrt(self.q.shape[-1]), dk, dv


class SoftmaxWithoutRowSum(ScaledDotProductAttention):
    """Uses dS = A * dA, dropping the - rowsum(dA * A) term of the softmax Jacobian."""
    def backward(self, g):
        a_drop = self.weights if self.mask is None else self.weights * self.mask
        da = g @ self.v.swapaxes(-1, -2)
        da = da if self.mask is None else da * self.mask
        ds = self.weights * da
        c = 1 / math.sqrt(self.q.shape[-1])
        return ((ds @ self.k) * c, (ds.swapaxes(-1, -2) @ self.q) * c,
                a_drop.swapaxes(-1, -2) @ g)


class MaskIgnoredInBackward(ScaledDotProductAttention):
    """Forward applies the dropout mask, backward acts as if there were none."""
    def backward(self, g):
        self.mask = None
        return super().backward(g)


@pytest.mark.parametrize("wrong", [NoScaleInDq, SoftmaxWithoutRowSum, MaskIgnoredInBackward])
def test_gradcheck_catches_wrong_backward(device, rng, wrong):
    q, k, v = (t(rng.standard_normal((2, 3, 5, 4)), device) for _ in range(3))
    mask = on(device, dropout_mask((2, 3, 5, 5)))
    mv.gradcheck(lambda q, k, v: ScaledDotProductAttention(mask)(q, k, v), q, k, v)
    with pytest.raises(mv.GradcheckError):
        mv.gradcheck(lambda q, k, v: wrong(mask)(q, k, v), q, k, v)


# --- heads and multi-head attention -----------------------------------------------------

def test_split_and_merge_heads(device, rng):
    x = rng.standard_normal((2, 5, 6))
    split = split_heads(t(x, device), 3)
    assert split.shape == (2, 3, 5, 2)
    for b, h, i, j in np.ndindex(2, 3, 5, 2):       # head h holds features h*D_h + j
        assert split.numpy()[b, h, i, j] == x[b, i, h * 2 + j]
    np.testing.assert_array_equal(merge_heads(split).numpy(), x)
    xt = t(x, device)
    mv.gradcheck(lambda x: merge_heads(split_heads(x, 2) * 2.0), xt)


@pytest.mark.parametrize("masked, biased", [(False, True), (True, True), (False, False)])
def test_multi_head_attention_matches_loops(device, rng, masked, biased):
    d, heads = 8, 2
    z = rng.standard_normal((2, 5, d))
    w_qkv, w_out = rng.standard_normal((d, 3 * d)), rng.standard_normal((d, d))
    b_qkv, b_out = rng.standard_normal(3 * d), rng.standard_normal(d)
    if not biased:
        b_qkv = b_out = None
    mask = dropout_mask((2, heads, 5, 5)) if masked else None
    args = [None if x is None else t(x, device) for x in (z, w_qkv, b_qkv, w_out, b_out)]
    out, weights = multi_head_attention(*args, heads, None if mask is None else on(device, mask),
                                        return_weights=True)
    want_out, want_weights = loop_mha(z, w_qkv, b_qkv, w_out, b_out, heads, mask)
    assert out.shape == (2, 5, d) and weights.shape == (2, heads, 5, 5)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-10, atol=1e-12)


def test_gradcheck_multi_head_attention(device, rng):
    d, heads = 6, 3
    z = t(rng.standard_normal((2, 4, d)), device)
    w_qkv = t(rng.standard_normal((d, 3 * d)) / math.sqrt(d), device)
    b_qkv = t(rng.standard_normal(3 * d), device)
    w_out = t(rng.standard_normal((d, d)) / math.sqrt(d), device)
    b_out = t(rng.standard_normal(d), device)
    mask = on(device, dropout_mask((2, heads, 4, 4)))
    mv.gradcheck(lambda *args: multi_head_attention(*args, heads, mask),
                 z, w_qkv, b_qkv, w_out, b_out)


@pytest.mark.parametrize("shape", [(7, 12), (2, 7, 12), (2, 3, 7, 12)])
@pytest.mark.parametrize("masked", [False, True])
def test_self_attention_equals_split_attention_merge(device, rng, shape, masked):
    """self_attention(qkv) is merge_heads(attention(split_heads of q, k, v)) in one node:
    the same values, weights and gradient of qkv, for any leading axes."""
    heads, d = 2, shape[-1] // 3
    qkv_np = rng.standard_normal(shape)
    g = on(device, rng.standard_normal(shape[:-1] + (d,)))
    mask = on(device, dropout_mask(shape[:-2] + (heads, 7, 7))) if masked else None
    fused_in, composed_in = t(qkv_np, device), t(qkv_np, device)
    fused, fused_weights = self_attention(fused_in, heads, mask, return_weights=True)
    q, k, v = (split_heads(composed_in[..., s * d:(s + 1) * d], heads) for s in range(3))
    composed, weights = attention(q, k, v, mask, return_weights=True)
    composed = merge_heads(composed)
    fused.backward(g)
    composed.backward(g)
    assert fused.shape == composed.shape == shape[:-1] + (d,)
    np.testing.assert_allclose(fused.numpy(), composed.numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(fused_weights.numpy(), weights.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(numpy_grad(fused_in),
                               numpy_grad(composed_in), rtol=1e-12, atol=1e-13)
    assert not fused_weights.requires_grad


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_self_attention(device, rng, masked):
    qkv = t(rng.standard_normal((2, 5, 12)), device)
    mask = on(device, dropout_mask((2, 2, 5, 5))) if masked else None
    assert mv.gradcheck(lambda qkv: self_attention(qkv, 2, mask), qkv) < 1e-6


# --- errors, dtypes and devices ---------------------------------------------------------

def test_float32_in_float32_out(device, rng):
    f32 = lambda shape: t(rng.standard_normal(shape).astype(np.float32), device)  # noqa: E731
    q, k, v = f32((2, 3, 5, 4)), f32((2, 3, 5, 4)), f32((2, 3, 5, 4))
    mask = on(device, dropout_mask((2, 3, 5, 5)))            # float64 mask must not promote
    out, weights = attention(q, k, v, mask, return_weights=True)
    out.backward(mv.tensor(np.ones((2, 3, 5, 4), np.float32), device=device))
    assert out.dtype == weights.dtype == np.float32
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == np.float32

    z, w_qkv, b_qkv, w_out, b_out = f32((2, 5, 8)), f32((8, 24)), f32(24), f32((8, 8)), f32(8)
    bool_mask = on(device, dropout_mask((2, 4, 5, 5)) > 0)
    out = multi_head_attention(z, w_qkv, b_qkv, w_out, b_out, 4, bool_mask)
    out.sum().backward()
    assert out.dtype == np.float32
    assert all(x.grad.dtype == np.float32 for x in (z, w_qkv, b_qkv, w_out, b_out))


@pytest.mark.parametrize("q_shape, k_shape, v_shape, mask_shape, match", [
    ((2, 5, 4), (2, 5, 3), (2, 5, 4), None, "same last axis D_h"),
    ((2, 5, 4), (2, 6, 4), (2, 5, 4), None, "same number of tokens"),
    ((2, 5, 4), (3, 5, 4), (3, 5, 4), None, "same leading"),
    ((4,), (4,), (4,), None, r"shape \(\.\.\., T, D_h\)"),
    ((2, 5, 4), (2, 6, 4), (2, 6, 4), (2, 5, 5), r"dropout_mask has shape \(2, 5, 5\), "
                                                 r"expected .*\(2, 5, 6\)"),
])
def test_attention_shape_errors(device, q_shape, k_shape, v_shape, mask_shape, match):
    q, k, v = (t(np.ones(s), device) for s in (q_shape, k_shape, v_shape))
    mask = None if mask_shape is None else on(device, np.ones(mask_shape))
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, mask)


def test_attention_type_errors(device):
    x = t(np.ones((2, 5, 4)), device)
    with pytest.raises(TypeError, match="one floating dtype"):
        attention(x, x, t(np.ones((2, 5, 4), np.float32), device))
    with pytest.raises(TypeError, match="one floating dtype"):
        attention(*(t(np.ones((2, 5, 4), np.int64), device, False) for _ in range(3)))
    with pytest.raises(TypeError, match="dropout_mask must be None, an array or a Tensor"):
        attention(x, x, x, [[1.0]])


def test_head_and_weight_shape_errors(device):
    x = t(np.ones((2, 5, 6)), device)
    with pytest.raises(ValueError, match="D=6 is not divisible by num_heads=4"):
        split_heads(x, 4)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        split_heads(x, 0)
    with pytest.raises(ValueError, match=r"merge_heads expects .* got \(5, 6\)"):
        merge_heads(t(np.ones((5, 6)), device))
    w_qkv, b_qkv = t(np.ones((6, 18)), device), t(np.ones(18), device)
    w_out, b_out = t(np.ones((6, 6)), device), t(np.ones(6), device)
    with pytest.raises(ValueError, match=r"w_qkv has shape \(6, 12\), expected \(6, 18\)"):
        multi_head_attention(x, t(np.ones((6, 12)), device), b_qkv, w_out, b_out, 2)
    with pytest.raises(ValueError, match=r"b_out has shape \(5,\), expected \(6,\)"):
        multi_head_attention(x, w_qkv, b_qkv, w_out, t(np.ones(5), device), 2)
    with pytest.raises(ValueError, match="D=6 is not divisible by num_heads=4"):
        multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, 4)


def test_self_attention_errors(device):
    with pytest.raises(ValueError, match=r"expects qkv of shape \(..., T, 3D\), got \(2, 5, 10\)"):
        self_attention(t(np.ones((2, 5, 10)), device), 2)
    with pytest.raises(ValueError, match="the width D=6 is not divisible by num_heads=4"):
        self_attention(t(np.ones((2, 5, 18)), device), 4)
    with pytest.raises(ValueError, match="num_heads must be a positive integer, got 0"):
        self_attention(t(np.ones((2, 5, 18)), device), 0)
    with pytest.raises(ValueError, match=r"dropout_mask has shape \(2, 3, 5, 5\), expected "
                                         r"the attention weights' shape \(2, 2, 5, 5\)"):
        self_attention(t(np.ones((2, 5, 18)), device), 2, on(device, np.ones((2, 3, 5, 5))))


# --- the GPU path: contiguous heads and the softmax kernels ------------------------------

from minivit import backend, kernels  # noqa: E402
from minivit.kernels import softmax as softmax_cuda  # noqa: E402
from minivit.ops import attention as attention_module  # noqa: E402


@pytest.fixture
def kernels_on(monkeypatch):
    """Kernels on for this test, whatever MINIVIT_KERNELS says outside it."""
    monkeypatch.setenv("MINIVIT_KERNELS", "1")
    if not kernels.on():
        pytest.skip("kernels are off (MINIVIT_REFERENCE=1)")


def _f32(rng, shape):
    return backend.asarray(rng.standard_normal(shape).astype(np.float32), device="cuda")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("use_kernels", ["1", "0"])
def test_gpu_attention_equals_the_reference_path(standin, monkeypatch, masked, use_kernels):
    monkeypatch.setenv("MINIVIT_KERNELS", use_kernels)
    rng = np.random.default_rng(0)
    B, T, heads, D = 2, 7, 3, 12
    qkv, g = _f32(rng, (B, T, 3 * D)), _f32(rng, (B, T, D))
    mask = (backend.asarray((rng.random((B, heads, T, T)) > 0.3).astype(np.float32) / 0.7,
                            device="cuda") if masked else None)
    fused = attention_module.FusedSelfAttention(heads, mask)
    out, dqkv = fused.forward(qkv), fused.backward(g)
    t = mv.tensor(qkv, requires_grad=True, device="cuda")
    q, k, v = (attention_module.split_heads(t[..., i * D:(i + 1) * D], heads) for i in range(3))
    ref = ScaledDotProductAttention(mask)
    want = attention_module.merge_heads(ref(q, k, v))
    want.backward(g)
    for got, expected in ((out, want.data), (fused.weights, ref.weights), (dqkv, t.grad)):
        np.testing.assert_allclose(as_numpy(got), as_numpy(expected), rtol=1e-5, atol=1e-6)


def test_gpu_attention_launches_and_no_hidden_copies(standin, kernels_on):
    rng = np.random.default_rng(1)
    qkv, g = _f32(rng, (2, 9, 36)), _f32(rng, (2, 9, 12))
    fn = attention_module.FusedSelfAttention(2)
    fn.forward(qkv), fn.backward(g)                    # the first calls check the kernels
    standin.reset()
    fn = attention_module.FusedSelfAttention(2)
    fn.forward(qkv)
    forward = standin.counts()
    standin.reset()
    fn.backward(g)
    backward = standin.counts()
    # forward: 2 layout copies, q k^T, the softmax kernel, A v, the merge of the heads;
    # backward: 2 copies of g, 4 products, the softmax kernel, 2 writes into dqkv (dk and
    # dv are computed transposed into one buffer)
    assert (forward["launches"], backward["launches"]) == (6, 9)
    assert forward["hidden_copies"] == backward["hidden_copies"] == 0
    assert attention_module.SOFTMAX_FORWARD.status == "ok"
    assert attention_module.SOFTMAX_BACKWARD.status == "ok"


def test_minivit_kernels_0_runs_the_softmax_reference(standin, monkeypatch):
    rng = np.random.default_rng(2)
    s = _f32(rng, (2, 3, 5, 5))
    monkeypatch.setenv("MINIVIT_KERNELS", "0")
    attention_module._scaled_softmax(s, 0.5)
    assert standin.counts()["launches"] > 1
    monkeypatch.setenv("MINIVIT_KERNELS", "1")
    if kernels.on():
        attention_module._scaled_softmax(s, 0.5)            # the self-check on first use
        standin.reset()
        attention_module._scaled_softmax(s, 0.5)
        assert standin.counts()["launches"] == 1


@pytest.mark.parametrize("shape", [(2, 3, 65, 65), (1, 2, 197, 197), (1, 1, 577, 577),
                                   (3, 1, 5, 33)])
def test_softmax_kernels_equal_their_references_on_a_gpu(shape, kernels_on):
    require_cupy()
    if STANDIN:
        pytest.skip("runs the CUDA kernels themselves: needs a real GPU")
    rng = np.random.default_rng(3)
    s, da = 4 * _f32(rng, shape), _f32(rng, shape)
    c = 1 / math.sqrt(64)
    a = softmax_cuda.forward(s, c)
    np.testing.assert_allclose(as_numpy(a), as_numpy(attention_module._softmax_reference(s, c)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(as_numpy(softmax_cuda.backward(da, a, c)),
                               as_numpy(attention_module._softmax_backward_reference(da, a, c)),
                               rtol=1e-4, atol=1e-6)
