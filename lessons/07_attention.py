"""Scaled dot-product attention: every token looks at every other token.

Self-attention (the paper's Appendix A) lets each of the T tokens of a sequence
gather information from all T tokens.  Each token asks a question (its query q),
advertises what it holds (its key k) and offers a value v; a query takes the values
of the tokens whose keys it matches best:

    [q, k, v] = z U_qkv                       (Eq. 5)   q, k, v: (T, D_h)
    A = softmax(q k^T / sqrt(D_h))            (Eq. 6)   A: (T, T), each row sums to 1
    SA(z) = A v                               (Eq. 7)   (T, D_h)

Row i of A says how much query token i attends to each key token j.  Why divide by
sqrt(D_h)?  If the entries of q and k are independent with mean 0 and variance 1,
then q.k = sum_j q_j k_j is a sum of D_h terms of variance 1: its variance is D_h.
Wide heads would give scores of size ~sqrt(D_h), the softmax would pick one token
and (being flat there) pass almost no gradient.  Dividing by sqrt(D_h) brings the
variance back to 1 for every head width.

With a batch (and, next lesson, heads) in front, q, k, v are (B, T, D_h) and every
product above is a batched matmul.

Backward.  Write c = 1/sqrt(D_h) and go back step by step from g = dL/d(out), with
the matmul rule (lesson 01) and the softmax rule (lesson 06):

    out = A v          =>  dv = A^T g,   dA = g v^T
    A = softmax(S)     =>  dS = A * (dA - rowsum(dA * A))     (rowsum over the keys)
    S = c q k^T        =>  dq = c dS k,  dk = c dS^T q

The derivation in full is the docstring of ScaledDotProductAttention in
minivit/ops/attention.py.
"""
import math

import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv

lesson = Lesson("07", "scaled dot-product attention", __doc__)
rng = np.random.default_rng(0)

# --- 1. Why sqrt(D_h): the variance of the scores ---------------------------------------


def softmax_stats(scores):
    """For rows of scores: the mean largest softmax weight, and the mean size |dS| of the
    gradient that a random unit-variance cotangent dA sends back through the softmax."""
    s = mv.tensor(scores, requires_grad=True)
    a = mv.softmax(s, axis=-1)
    a.backward(mv.tensor(rng.standard_normal(a.shape)))
    grad = mv.backend.to_numpy(s.grad)                      # .grad is a raw array
    return a.numpy().max(axis=-1).mean(), np.linalg.norm(grad, axis=-1).mean()


lesson.say("1. Scores q.k of random unit-variance q, k, and softmax over rows of T = 16 keys:",
           f"   {'D_h':>5} {'var(q.k)':>9} {'var(q.k/sqrt(D_h))':>19} "
           f"{'largest weight':>15} {'gradient |dS|':>15}   (raw / scaled)")
widths, n_pairs, T = [4, 16, 64, 256, 1024], 4096, 16
raw_var, scaled_var, raw_top, scaled_top, raw_grad, scaled_grad = ([] for _ in range(6))
for d_h in widths:
    q = mv.tensor(rng.standard_normal((n_pairs, d_h)))
    k = mv.tensor(rng.standard_normal((n_pairs, d_h)))
    scores = (q * k).sum(axis=-1).numpy()                   # n_pairs dot products
    raw_var.append(scores.var())
    scaled_var.append((scores / math.sqrt(d_h)).var())
    for top, grad, s in ((raw_top, raw_grad, scores), (scaled_top, scaled_grad,
                                                          scores / math.sqrt(d_h))):
        stats = softmax_stats(s.reshape(-1, T))             # rows of T scores
        top.append(stats[0])
        grad.append(stats[1])
    lesson.say(f"   {d_h:>5} {raw_var[-1]:>9.1f} {scaled_var[-1]:>19.3f} "
               f"{raw_top[-1]:>8.3f} / {scaled_top[-1]:.3f} "
               f"{raw_grad[-1]:>8.3f} / {scaled_grad[-1]:.3f}")
lesson.say(f"   (a uniform row of {T} keys has largest weight {1 / T:.3f}; one-hot has 1.0)", "")
lesson.expect("unscaled score variance grows as D_h",
              all(abs(v / d - 1) < 0.1 for v, d in zip(raw_var, widths)))
lesson.expect("scaled score variance stays ~1", all(abs(v - 1) < 0.1 for v in scaled_var))
lesson.expect("without the scale the softmax saturates (nearly one-hot at D_h=1024)",
              raw_top[-1] > 0.9 and max(scaled_top) < 0.5,
              f"{raw_top[-1]:.3f} vs {max(scaled_top):.3f} with the scale")
lesson.expect("and sends back a much smaller gradient", raw_grad[-1] < 0.5 * scaled_grad[-1],
              f"|dS| {raw_grad[-1]:.3f} vs {scaled_grad[-1]:.3f} with the scale")

fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.8))
left.loglog(widths, raw_var, "o-", label="q.k")
left.loglog(widths, scaled_var, "s-", label="q.k / sqrt(D_h)")
left.loglog(widths, widths, "k:", label="D_h")
left.set(xlabel="head width D_h", ylabel="variance of the score",
         title="Scores: variance D_h, or 1 with the scale")
middle.semilogx(widths, raw_top, "o-", label="softmax(q.k)")
middle.semilogx(widths, scaled_top, "s-", label="softmax(q.k / sqrt(D_h))")
middle.axhline(1 / T, color="k", ls=":", label=f"uniform (1/{T})")
middle.set(xlabel="head width D_h", ylabel="mean largest weight in a row", ylim=(0, 1.05),
           title=f"Softmax over {T} keys saturates without it")
right.semilogx(widths, raw_grad, "o-", label="softmax(q.k)")
right.semilogx(widths, scaled_grad, "s-", label="softmax(q.k / sqrt(D_h))")
right.set(xlabel="head width D_h", ylabel="mean |dS| per row, for dA ~ N(0, 1)",
          ylim=(0, None), title="...and sends back less gradient")
for ax in (left, middle, right):
    ax.legend()
    ax.grid(alpha=0.3)
fig.tight_layout()
lesson.figure(fig, "attention_score_scaling.png")

# --- 2. Attention from primitives --------------------------------------------------------
lesson.say("", "2. Attention built from matmul and softmax (Eq. 6-7):")


def attention_by_hand(q, k, v):
    """A = softmax(q k^T / sqrt(D_h)) row by row, then A v.  q, k, v: (..., T, D_h)."""
    d_h = q.shape[-1]
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(d_h)      # (..., T, T): query i, key j
    weights = mv.softmax(scores, axis=-1)                  # each row sums to 1
    return weights @ v, weights                            # (..., T, D_h)


B, T, d_h = 2, 6, 8
q, k, v = (mv.tensor(rng.standard_normal((B, T, d_h)), requires_grad=True) for _ in range(3))
mine, mine_weights = attention_by_hand(q, k, v)
fused, fused_weights = mv.attention(q, k, v, return_weights=True)
lesson.say(f"   q, k, v {q.shape} -> A {mine_weights.shape} -> A v {mine.shape}")
lesson.expect("every row of A sums to 1",
              np.allclose(mine_weights.numpy().sum(axis=-1), 1.0))
lesson.same("lesson attention == mv.attention", mine, fused)
lesson.same("lesson weights A == mv.attention's returned weights", mine_weights, fused_weights)

# --- 3. The backward pass by hand ------------------------------------------------------
lesson.say("", "3. The backward pass by hand, from a random g = dL/d(out), c = 1/sqrt(D_h):")
# The forward pass once more, one named step per line, keeping the gradients of S and A.
c = 1 / math.sqrt(d_h)
scores = (q @ k.swapaxes(-1, -2) * c).retain_grad()      # S (B, T, T)
weights = mv.softmax(scores, axis=-1).retain_grad()       # A (B, T, T)
out = weights @ v                                         # (B, T, D_h)
g = mv.tensor(rng.standard_normal(out.shape))             # a cotangent dL/d(out)
out.backward(g)                                           # autograd through the primitives

# The same gradients with array maths, one line per step of the derivation.
Q, K, V, G, A = q.data, k.data, v.data, g.data, weights.data      # raw arrays
dv = A.swapaxes(-1, -2) @ G                               # out = A v:     dv = A^T g
dA = G @ V.swapaxes(-1, -2)                               #                dA = g v^T
dS = A * (dA - (dA * A).sum(axis=-1, keepdims=True))      # A = softmax(S) (lesson 06)
dq = c * dS @ K                                           # S = c q k^T:   dq = c dS k
dk = c * dS.swapaxes(-1, -2) @ Q                          #                dk = c dS^T q
for step, grad in (("dv = A^T g", dv), ("dA = g v^T", dA),
                   ("dS = A * (dA - rowsum(dA * A))", dS),
                   ("dq = c dS k", dq), ("dk = c dS^T q", dk)):
    lesson.say(f"   {step:<31} {tuple(grad.shape)}")
for name, mine_grad, t in (("dv", dv, v), ("dA", dA, weights), ("dS", dS, scores),
                           ("dq", dq, q), ("dk", dk, k)):
    lesson.same(f"{name}: the formula == autograd through the primitives", mine_grad, t.grad)

# mv.attention is one node with a hand-written backward (the derivation's home); it must
# agree too.
for t in (q, k, v):
    t.grad = None
mv.attention(q, k, v).backward(g)
for name, mine_grad, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
    lesson.same(f"{name}: the formula == mv.attention's backward", mine_grad, t.grad)

# The row sum needs no T x T array: sum_j dA_ij A_ij = sum_j (g_i . v_j) A_ij = g_i . out_i.
lesson.same("rowsum(dA * A) == rowsum(g * out), one dot product per query",
            (dA * A).sum(axis=-1), (G * out.data).sum(axis=-1))

# --- 4. An attention map -----------------------------------------------------------------
lesson.say("", "4. Attention maps of 12 tokens with D_h = 64, without and with the scale:")
T, d_h = 12, 64
q, k = (mv.tensor(rng.standard_normal((T, d_h))) for _ in range(2))
maps = {"softmax(q k^T)": mv.softmax(q @ k.T).numpy(),
        "softmax(q k^T / sqrt(D_h))": mv.softmax(q @ k.T / math.sqrt(d_h)).numpy()}
fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), constrained_layout=True)
for ax, (title, a) in zip(axes, maps.items()):
    image = ax.imshow(a, cmap="viridis", vmin=0, vmax=1)
    ax.set(title=title, xlabel="key token", ylabel="query token",
           xticks=range(0, T, 2), yticks=range(0, T, 2))
    lesson.say(f"   {title:<28} mean largest weight per row {a.max(axis=1).mean():.2f}")
fig.colorbar(image, ax=axes, label="attention weight A[query, key]", shrink=0.9)
fig.suptitle(f"Random q, k with D_h = {d_h}: the scale keeps the rows soft")
lesson.figure(fig, "attention_map.png")

# --- 5. Gradient check -------------------------------------------------------------------
lesson.say("", "5. Gradient checks (float64, central differences, random cotangent):")
q, k, v = (mv.tensor(rng.standard_normal((2, 5, 4)), requires_grad=True) for _ in range(3))
lesson.gradcheck("lesson attention wrt q, k, v", lambda q, k, v: attention_by_hand(q, k, v)[0],
                 q, k, v)
lesson.gradcheck("mv.attention wrt q, k, v", mv.attention, q, k, v)
lesson.finish()
