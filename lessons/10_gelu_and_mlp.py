"""GELU and the MLP block: the per-token half of every encoder block.

Attention mixes tokens; the MLP then transforms each token on its own (Eq. 3):

    MLP(x) = GELU(x W_1 + b_1) W_2 + b_2,    W_1: (D, M),  W_2: (M, D),  M = 4D in ViT-B

so x (B, T, D) -> (B, T, M) -> GELU -> (B, T, M) -> (B, T, D).  Between the two
layers sits the GELU non-linearity (Hendrycks & Gimpel 2016):

    GELU(x) = x Phi(x),     Phi(x) = (1 + erf(x / sqrt 2)) / 2, the normal CDF,

a smooth ReLU: x is kept with the probability that a standard normal is below it.
Its derivative, by the product rule with phi = Phi' the normal density:

    GELU'(x) = Phi(x) + x phi(x),     phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

The official JAX code (Flax's default) uses the tanh approximation

    GELU_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),

and the paper's text and timm the exact erf form; minivit has both
(ViTConfig(gelu="erf" or "tanh")).  They differ by less than 5e-4.
"""
import math

import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv

lesson = Lesson("10", "GELU and the MLP block", __doc__)
rng = np.random.default_rng(0)


# --- 1. The exact GELU as a Function, the tanh GELU from primitives ----------------------
# mv.erf works on raw arrays: it is not a differentiable primitive.  So the exact GELU
# becomes a Function, forward and backward on raw arrays, with the derivative above as its
# backward -- the way every operation of minivit is made.
class GeluByHand(mv.Function):
    """y = x Phi(x);  dx = g (Phi(x) + x phi(x))."""

    def forward(self, x):
        self.x, self.cdf = x, 0.5 * (1 + mv.erf(x / math.sqrt(2)))   # Phi(x)
        return x * self.cdf

    def backward(self, g):
        xp = mv.backend.array_module(g)
        pdf = xp.exp(-0.5 * self.x ** 2) / math.sqrt(2 * math.pi)      # phi(x)
        return g * (self.cdf + self.x * pdf)


def gelu_exact(x):
    return GeluByHand()(x)


def gelu_tanh(x):
    """The tanh approximation from tanh, multiply and add: autograd does the derivative."""
    return 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)).tanh())


lesson.say("1. GELU, exact and tanh, against mv.gelu:")
x = mv.tensor(np.linspace(-4, 4, 801), requires_grad=True)
curves, slopes = {}, {}
for name, mine in (("erf", gelu_exact), ("tanh", gelu_tanh)):
    y_mine, y_lib = mine(x), mv.gelu(x, approximate=name)
    lesson.same(f"lesson GELU ({name}) == mv.gelu(approximate={name!r})", y_mine, y_lib)
    grads = []
    for y in (y_mine, y_lib):                    # elementwise: a ones cotangent gives y'(x)
        x.grad = None
        y.backward(mv.tensor(np.ones(x.shape)))
        grads.append(mv.backend.to_numpy(x.grad))
    lesson.same(f"GELU'({name}): lesson backward == mv.gelu backward", *grads)
    curves[name], slopes[name] = y_lib.numpy(), grads[1]

xs = x.numpy()
phi = np.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi)
lesson.same("GELU'(erf) == Phi(x) + x phi(x), the closed form",
            slopes["erf"], 0.5 * (1 + mv.erf(xs / math.sqrt(2))) + xs * phi)
gap = np.abs(curves["tanh"] - curves["erf"])
slope_gap = np.abs(slopes["tanh"] - slopes["erf"])
lesson.say(f"   largest |GELU_tanh - GELU_erf| on [-4, 4]: {gap.max():.2e} at x = "
           f"{xs[gap.argmax()]:+.2f}; of the derivatives: {slope_gap.max():.2e}")
lesson.expect("the two GELUs differ by less than 5e-4", gap.max() < 5e-4)
lesson.expect("GELU has a negative dip: min GELU(x) ~ -0.17 near x = -0.75",
              abs(curves["erf"].min() + 0.17) < 0.01, f"min {curves['erf'].min():.4f}")

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
left.plot(xs, np.maximum(xs, 0), color="0.6", ls=":", label="ReLU(x)")
left.plot(xs, curves["erf"], lw=2.5, label="GELU(x) = x Phi(x)  (exact, erf)")
left.plot(xs, slopes["erf"], lw=2.5, label="GELU'(x) = Phi(x) + x phi(x)")
left.plot(xs, curves["tanh"], "k--", lw=1, label="tanh approximation, and its derivative")
left.plot(xs, slopes["tanh"], "k--", lw=1)
left.set(xlabel="x", ylabel="value", title="GELU and its derivative: the two forms overlap")
right.plot(xs, 1e4 * (curves["tanh"] - curves["erf"]), label="GELU_tanh(x) - GELU(x)")
right.plot(xs, 1e4 * (slopes["tanh"] - slopes["erf"]), label="GELU_tanh'(x) - GELU'(x)")
right.set(xlabel="x", ylabel="difference (units of 1e-4)",
          title="The tanh approximation minus the exact form")
for ax in (left, right):
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
lesson.figure(fig, "gelu.png")

# --- 2. The MLP block --------------------------------------------------------------------
B, T, D, M = 2, 3, 4, 8
lesson.say("", f"2. The MLP: x (B, T, D) = {(B, T, D)} -> (B, T, M) = {(B, T, M)} -> GELU -> "
               f"{(B, T, D)}")


def mlp_by_hand(x, w1, b1, w2, b2, approximate="erf"):
    hidden = mv.gelu(x @ w1 + b1, approximate)        # (B, T, M)
    return hidden @ w2 + b2                           # (B, T, D)


def randn(*shape, scale=1.0):
    return mv.tensor(scale * rng.standard_normal(shape), requires_grad=True)


x = randn(B, T, D)
weights = (randn(D, M, scale=D ** -0.5), randn(M, scale=0.1),
           randn(M, D, scale=M ** -0.5), randn(D, scale=0.1))
for approximate in ("erf", "tanh"):
    mlp = mv.nn.MLP(D, M, dropout=0.0, gelu=approximate, rng=mv.backend.generator(0, "cpu"),
                    random_source=mv.nn.RandomSource(0)).astype("float64")
    mlp.load_state_dict({name: w.numpy() for name, w in
                         zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), weights)})
    lesson.same(f"lesson MLP == mv.nn.MLP (gelu={approximate!r}, dropout 0)",
                mlp_by_hand(x, *weights, approximate), mlp(x))

# --- 3. Gradient checks ------------------------------------------------------------------
lesson.say("", "3. Gradient checks (float64, central differences):")
x_small = randn(3, 5)
lesson.gradcheck("lesson GELU (erf, the Function above)", gelu_exact, x_small)
lesson.gradcheck("lesson GELU (tanh, from primitives)", gelu_tanh, x_small)
for approximate in ("erf", "tanh"):
    lesson.gradcheck(f"mv.gelu(approximate={approximate!r})",
                     lambda x: mv.gelu(x, approximate), x_small)
lesson.gradcheck("lesson MLP wrt x, W_1, b_1, W_2, b_2", mlp_by_hand, x, *weights)
lesson.gradcheck("mv.nn.MLP (tanh) wrt x and its parameters", lambda x, *params: mlp(x),
                 x, *mlp.parameters())
lesson.finish()
