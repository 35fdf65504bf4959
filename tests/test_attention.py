"""Scaled dot-product attention and multi-head self-attention (Appendix A, Eq. 5-8).

Forward, for one head with queries q (T_q x D_h), keys k (T_k x D_h), values v (T_k x D_v),
c = 1/sqrt(D_h) and an optional fixed inverted-dropout mask M (entries 0 or 1/(1-p)):

    S = c q k^T,    A = softmax(S) by rows,    A' = A * M,    out = A' v.

Backward, from g = dL/d out, one step at a time:

    out = A' v   ->  dv = A'^T g,   dA' = g v^T.
    A' = A * M   ->  dA = dA' * M.
    softmax      ->  A_ij = e^{S_ij} / sum_l e^{S_il}, so dA_ij / dS_il = A_ij (delta_jl - A_il)
                     and dS_il = sum_j dA_ij A_ij (delta_jl - A_il)
                           = A_il (dA_il - sum_j dA_ij A_ij),
                     i.e.  dS = A * (dA - rowsum(dA * A)).
    S = c q k^T  ->  dq = c dS k,   dk = c dS^T q.

(Subtracting the row maximum before exp shifts a row of S by a constant, which softmax
does not see, so it adds nothing to the gradient.)

Multi-head self-attention runs k heads of width D_h = D/k side by side:

    [q, k, v] = z U_qkv + b,   SA_h = softmax(q_h k_h^T / sqrt(D_h)) v_h,
    MSA(z) = [SA_1; ...; SA_k] U_msa + b_out,

which the library builds from matmul, add and the fused self-attention node, which
reads q, k, v as views of z U_qkv + b and writes their gradients into one array.  It
equals split_heads, attention and merge_heads composed, which is checked too.  Its
backward takes the row sum of the softmax step from the output instead of from A:
since dA' = g v^T,  sum_j dA_ij A_ij = sum_j (g_i . v_j) A'_ij = g_i . out_i
(FlashAttention's "D" term), a sum over D_v values instead of T_k.

The checks below: the forward against explicit loops over batch, heads and tokens; the
fused node against the same formula composed from engine primitives (values and
gradients); float64 gradient checks, including a dropout mask and non-contiguous inputs;
gradcheck catching deliberately wrong backward passes; the returned weights; float32
staying float32; and the error messages for inputs of the wrong shape.
"""
import math

import numpy as np
import pytest

import minivit as mv
from minivit import backend
from minivit.ops.attention import (ScaledDotProductAttention, attention, merge_heads,
                                   multi_head_attention, self_attention, split_heads)

from conftest import as_numpy, numpy_grad


def t(array, device, requires_grad=True):
    return mv.tensor(array, requires_grad=requires_grad, device=device)


def dropout_mask(shape, p=0.25, seed=1):
    """A fixed inverted-dropout mask: 0 with probability p, else 1/(1-p)."""
    keep = np.random.default_rng(seed).random(shape) >= p
    return keep / (1 - p)


# --- independent definitions (loops over batch, heads and tokens) ------------------------

def loop_attention(q, k, v, mask=None, scale=None):
    """out and A of Eq. 6-7, one query row at a time, in float64 NumPy."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    lead, (t_q, d_h), t_k = q.shape[:-2], q.shape[-2:], k.shape[-2]
    scale = 1 / math.sqrt(d_h) if scale is None else scale
    out = np.zeros(lead + (t_q, v.shape[-1]))
    weights = np.zeros(lead + (t_q, t_k))
    for idx in np.ndindex(*lead):                 # every (batch, head)
        for i in range(t_q):                      # every query token
            scores = [scale * sum(q[idx][i, d] * k[idx][j, d] for d in range(d_h))
                      for j in range(t_k)]
            top = max(scores)
            e = [math.exp(s - top) for s in scores]
            a = [x / sum(e) for x in e]
            weights[idx][i] = a
            for j in range(t_k):                  # every key token
                m = 1.0 if mask is None else mask[idx][i, j]
                out[idx][i] += a[j] * m * v[idx][j]
    return out, weights


def loop_mha(z, w_qkv, b_qkv, w_out, b_out, num_heads, mask=None):
    """MSA(z) of Eq. 5-8 for every image and token, heads one by one, in float64 NumPy."""
    batch, tokens, d = z.shape
    d_h = d // num_heads
    b_qkv = np.zeros(3 * d) if b_qkv is None else b_qkv
    b_out = np.zeros(d) if b_out is None else b_out
    out = np.zeros((batch, tokens, d))
    weights = np.zeros((batch, num_heads, tokens, tokens))
    for b in range(batch):
        qkv = np.stack([z[b, i] @ w_qkv + b_qkv for i in range(tokens)])      # Eq. 5
        heads = []
        for h in range(num_heads):
            cols = slice(h * d_h, (h + 1) * d_h)
            q, k, v = (qkv[:, s * d:(s + 1) * d][:, cols] for s in range(3))
            m = None if mask is None else mask[b, h]
            sa, weights[b, h] = loop_attention(q, k, v, m)                     # Eq. 6-7
            heads.append(sa)
        for i in range(tokens):
            out[b, i] = np.concatenate([sa[i] for sa in heads]) @ w_out + b_out  # Eq. 8
    return out, weights


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


# --- forward against loops -------------------------------------------------------------

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


def test_rows_far_below_their_heads_largest_score_do_not_underflow(device, rng):
    """On the CPU softmax first shifts a whole head by its largest score.  A row whose
    scores lie 300 below it would underflow to exp = 0 in float32 (weights 0 / 0); the
    rows' own maxima must take over, in float32 as in float64."""
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    q[:, :, 0] = 0.0                                   # row 0: every score 0
    q[:, :, 1] = k[:, :, 0] * (600 / (k[:, :, 0] ** 2).sum(axis=-1))[..., None]   # row 1:
    # its score for key 0 is c q . k = 300 (c = 1/2): each head's largest is 300 or more
    for dtype, rtol in ((np.float32, 2e-5), (np.float64, 1e-10)):
        inputs = [t(x.astype(dtype), device) for x in (q, k, v)]
        out, weights = attention(*inputs, return_weights=True)
        want_out, want_weights = loop_attention(q.astype(dtype), k.astype(dtype),
                                                v.astype(dtype))
        assert np.isfinite(out.numpy()).all()
        np.testing.assert_allclose(weights.numpy()[:, :, 0], 0.2, rtol=rtol)   # uniform
        np.testing.assert_allclose(out.numpy(), want_out, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(weights.numpy(), want_weights, rtol=rtol, atol=rtol)


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


# --- the fused node against a composition of primitives -----------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_fused_equals_composition(device, rng, masked):
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


# --- gradient checks ---------------------------------------------------------------------

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


# --- wrong backward passes are caught --------------------------------------------------------

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


# --- heads and multi-head attention -------------------------------------------------------

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


# --- float32 stays float32 ----------------------------------------------------------------

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


# --- errors ------------------------------------------------------------------------------------

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
