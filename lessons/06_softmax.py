"""Softmax: scores into weights, computed stably, differentiated without a Jacobian.

Softmax turns a row of K real scores x into K positive weights that sum to 1:

    y_i = exp(x_i) / sum_j exp(x_j)

In ViT it makes the attention weights A = softmax(q k^T / sqrt(D_h)) (Appendix A,
Eq. 6), one softmax over the T = N + 1 = 197 keys for every query, head and image,
and the class probabilities of the head's cross-entropy loss.

Stability.  exp overflows float64 above x = 709 (float32 above 88.7), and
inf / inf = nan.  Softmax ignores a constant shift, softmax(x - c) = softmax(x),
because exp(-c) cancels between numerator and denominator; with c = max x every
exp(x_i - c) is in (0, 1] and the denominator is at least 1.

Backward.  dy_i/dx_k = y_i (delta_ik - y_k), so the Jacobian is J = diag(y) - y y^T,
a K x K matrix (symmetric).  Backward needs only its product with g = dL/dy:

    dx_k = sum_i g_i y_i (delta_ik - y_k) = y_k (g_k - sum_i g_i y_i),
    dx = y * (g - sum(g * y))

O(K) work per row instead of building K^2 entries (for one attention layer of ViT-B:
12 heads x 197 rows x 197^2 = 92 million Jacobian entries per image).
The rows and columns of J sum to zero (J^T 1 = 0, since sum y = 1): a ones cotangent sees nothing,
which is why gradient checks use a random one (lesson 02).
"""
import matplotlib.pyplot as plt
import numpy as np

import minivit as mv
from common import Lesson

lesson = Lesson("06", "softmax", __doc__)
rng = np.random.default_rng(0)


def naive_softmax(x):
    xp = mv.backend.array_module(x)
    e = xp.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def softmax(x, axis=-1):
    """Softmax from engine primitives; autograd derives its backward from theirs."""
    m = x.max(axis=axis, keepdims=True)              # the shift (its gradient cancels out)
    e = (x - m).exp()                                # every entry in (0, 1]
    return e / e.sum(axis=axis, keepdims=True)


# --- 1. Stability: the naive formula overflows, the shifted one does not ------------------------
big = mv.tensor([1000.0, 1001.0, 1002.0])
xp = mv.backend.array_module(big.data)
with np.errstate(over="ignore", invalid="ignore"):   # NumPy would warn; we want to see the nan
    exp_big = xp.exp(big.data)
    naive_big, naive_small = naive_softmax(big.data), naive_softmax(-big.data)
stable = softmax(big)
show = mv.backend.to_numpy
lesson.say(f"x = {big.numpy()}:  exp(x) = {show(exp_big)} -> naive softmax = {show(naive_big)}",
           f"x = {-big.numpy()}: exp(x) = {show(xp.exp(-big.data))} -> naive softmax = "
           f"{show(naive_small)}",
           f"shifted by max x: softmax = {stable.numpy().round(4)}")
lesson.expect("the naive formula gives nan for logits ~ +-1000",
              bool(np.isnan(show(naive_big)).all() and np.isnan(show(naive_small)).all()))
lesson.same("the shifted one is finite and equals softmax([0, 1, 2])", stable,
            naive_softmax(mv.tensor([0.0, 1.0, 2.0]).data))
lesson.same("... and mv.softmax gives the same", mv.softmax(big), stable)

# --- 2. On attention-shaped scores: forward and backward equal mv.softmax -----------------------
scores = mv.tensor(rng.standard_normal((2, 3, 5, 5)) * 3, requires_grad=True)   # (B, heads, T, T)
g = mv.tensor(rng.standard_normal(scores.shape))                                # dL/dA
y = softmax(scores)
y.backward(g)
from_primitives = scores.grad
scores.grad = None
fused = mv.softmax(scores)
fused.backward(g)
lesson.same("forward: softmax from primitives equals mv.softmax", y, fused)
lesson.same("backward: autograd through the primitives equals mv.softmax's backward",
            from_primitives, scores.grad)

# --- 3. The backward formula, against the explicit Jacobian --------------------------------------
Y, G = y.data, g.data
K = Y.shape[-1]
J = Y[..., :, None] * (xp.eye(K) - Y[..., None, :])          # J[..., i, k] = y_i (delta_ik - y_k)
lesson.say("", f"explicit Jacobians: {J.shape} (one {K}x{K} matrix per row of scores)")
jacobian_times_g = xp.einsum("...ik,...i->...k", J, G)        # dx_k = sum_i g_i J_ik
vjp = Y * (G - (G * Y).sum(axis=-1, keepdims=True))
lesson.same("J^T g equals y * (g - sum(g * y))", jacobian_times_g, vjp)
lesson.same("... and equals mv.softmax's backward", vjp, scores.grad)
lesson.same("sum_i J_ik = 0: J^T 1 = 0, a ones cotangent gets dx = 0",
            J.sum(axis=-2), xp.zeros(Y.shape), atol=1e-15)

# --- 4. Figure: one row of scores, its softmax and its Jacobian ----------------------------------
x_row, y_row, J_row = scores.numpy()[0, 0, 0], fused.numpy()[0, 0, 0], show(J[0, 0, 0])
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[1.2, 1]))
k = np.arange(K)
a.bar(k - 0.2, x_row, 0.4, label="scores x")
a.bar(k + 0.2, y_row, 0.4, label="softmax(x) (sums to 1)")
a.axhline(0, color="black", lw=0.5)
a.set(xlabel="entry k", ylabel="value", title="One row: scores and their softmax", xticks=k)
a.legend(fontsize=8)
lim = np.abs(J_row).max()
im = b.imshow(J_row, cmap="RdBu_r", vmin=-lim, vmax=lim)
b.set(xlabel="k (input x_k)", ylabel="i (output y_i)", xticks=k, yticks=k,
      title="Its Jacobian J = diag(y) - y y^T:\ndy_i/dx_k = y_i (delta_ik - y_k)")
fig.colorbar(im, ax=b, label="dy_i / dx_k")
lesson.figure(fig, "softmax_jacobian.png")

# --- 5. Gradient checks --------------------------------------------------------------------------
lesson.gradcheck("mv.softmax over the last axis", mv.softmax, scores)
lesson.gradcheck("mv.softmax over axis 1 (the heads)", lambda s: mv.softmax(s, axis=1), scores)
lesson.gradcheck("softmax from primitives", softmax, scores)
lesson.finish()
