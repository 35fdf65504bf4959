"""Gradient checking: how we know a hand-derived backward pass is right.

Every Function in minivit carries a backward pass derived by hand (softmax,
LayerNorm, attention, ... all of Eq. 1-4).  One wrong sign there and the ViT still
trains, just worse, and nothing crashes.  So each backward is compared with numbers
that need no derivation: central differences of the forward pass.

For y = f(x) and a cotangent g of y's shape, backward(g) computes the gradient of
the scalar phi(x) = <g, f(x)> = sum(g * f(x)).  Each entry of that gradient is

    d phi / d x_i  ~  (phi(x + eps e_i) - phi(x - eps e_i)) / (2 eps),

with two errors: truncation ~ eps^2 |phi'''| / 6 and rounding ~ u |phi| / eps (u the
unit roundoff).  In float64 (u = 1.1e-16) with eps = 1e-6 both are ~1e-10; in
float32 (u = 6e-8) the rounding term alone is ~1e-1: percents.  Checks run in float64.

They compare with a relative error |a - n| / max(|a|, |n|), floored at 0.1 (so
entries near zero are judged absolutely) and pass at 1e-6.

And g must be random.  With g = ones the check looks at sum(f(x)); for softmax that
is always 1, its true gradient is 0, and a backward that forgot a factor returns 0 as
well -- the check passes a bug.  Below, a deliberately broken softmax shows it.
"""
import matplotlib.pyplot as plt
import numpy as np

import minivit as mv
from minivit.gradcheck import numerical_gradient
from common import Lesson

lesson = Lesson("02", "gradient checking", __doc__)
rng = np.random.default_rng(0)


def central_difference(phi, x, eps):
    """(phi(x + eps e_i) - phi(x - eps e_i)) / (2 eps) for every entry i of the raw array x,
    which phi reads: each entry is nudged in place and put back."""
    grad = mv.backend.array_module(x).zeros(x.shape, dtype="float64")
    flat, out = x.reshape(-1), grad.reshape(-1)            # views of x and grad
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + eps
        up = phi()
        flat[i] = old - eps
        down = phi()
        flat[i] = old
        out[i] = (up - down) / (2 * eps)
    return grad


def relative_error(a, n, floor=0.1):
    """max over entries of |a - n| / max(|a|, |n|, floor); mv.gradcheck's floor is
    atol / rtol = 1e-7 / 1e-6 = 0.1."""
    xp = mv.backend.array_module(a)
    return float((xp.abs(a - n) / xp.maximum(xp.maximum(xp.abs(a), xp.abs(n)), floor)).max())


# --- 1. Central differences in float64 and in float32 -------------------------------------
x_host, g_host = rng.standard_normal(16), rng.standard_normal(16)
exact = mv.tensor(g_host * (1 - np.tanh(x_host) ** 2))      # d<g, tanh x>/dx = g (1 - tanh^2 x)


def tanh_error(dtype, eps):
    x, g = mv.tensor(x_host, dtype=dtype), mv.tensor(g_host, dtype=dtype)
    numeric = central_difference(lambda: (g * x.tanh()).sum().item(), x.data, eps)
    return relative_error(numeric, exact.data)


err64, err32 = tanh_error("float64", 1e-6), tanh_error("float32", 1e-6)
lesson.say(f"phi(x) = <g, tanh x>, 16 entries, eps = 1e-6: central differences vs the exact "
           f"gradient: float64 error {err64:.1e}, float32 error {err32:.1e} ({100 * err32:.0f}%)")
lesson.expect("float64 differences are good to ~1e-10", err64 < 1e-8, f"{err64:.1e}")
lesson.expect("float32 differences are off by percents", err32 > 1e-2, f"{err32:.1e}")

epsilons = np.logspace(-12, 0, 25)
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for dtype, u in (("float32", 2.0 ** -24), ("float64", 2.0 ** -53)):
    errors = [tanh_error(dtype, eps) for eps in epsilons]
    ax.loglog(epsilons, errors, "o-", ms=3, label=f"{dtype} (u = {u:.0e})")
    best = epsilons[int(np.argmin(errors))]
    lesson.say(f"  {dtype}: smallest error {min(errors):.1e} at eps = {best:.0e}")
ax.axvline(1e-6, color="gray", ls=":", label="eps = 1e-6 (mv.gradcheck)")
ax.axhline(1e-6, color="red", ls="--", lw=1, label="pass threshold rtol = 1e-6")
ax.set(xlabel="step eps", ylabel="max relative error of d<g, tanh x>/dx",
       title="Central differences: rounding (left) vs truncation (right)", ylim=(1e-12, 10))
ax.legend(fontsize=8, loc="lower left")
lesson.figure(fig, "gradcheck_eps.png")


# --- 2. A gradient check from scratch, and mv.gradcheck ----------------------------------
def my_gradcheck(fn, x, eps=1e-6):
    """Random cotangent g; backward(g) vs central differences of <g, fn(x)>."""
    y = fn(x)
    g = mv.backend.random_normal(y.shape, 0, like=y.data)   # the cotangent mv.gradcheck draws
    x.grad = None
    y.backward(g)
    with mv.no_grad():
        numeric = central_difference(lambda: float((fn(x).data * g).sum()), x.data, eps)
    return relative_error(x.grad, numeric)


logits = mv.tensor(rng.standard_normal((3, 5)), requires_grad=True)
g = mv.tensor(rng.standard_normal((3, 5)))


def phi():
    return float((mv.softmax(logits).data * g.data).sum())


lesson.say("", "A gradient check of mv.softmax written out here, then mv.gradcheck itself:")
with mv.no_grad():
    ours = central_difference(phi, logits.data, 1e-6)
    minivits = numerical_gradient(phi, logits.data)
lesson.same("our central differences equal minivit's numerical_gradient", ours, minivits)
mine = my_gradcheck(mv.softmax, logits)
lesson.same("our check's error equals mv.gradcheck's", np.array(mine),
            np.array(mv.gradcheck(mv.softmax, logits)))
lesson.gradcheck("mv.softmax (random cotangent, float64)", mv.softmax, logits)


# --- 3. The sum(softmax) = 1 trap, and a bug that mv.gradcheck catches ---------------------
class SoftmaxForgotY(mv.Function):
    """softmax with a BUG in backward: dx = g - sum(g y) instead of y * (g - sum(g y))."""

    def forward(self, x):
        xp = mv.backend.array_module(x)
        e = xp.exp(x - x.max(axis=-1, keepdims=True))
        self.y = e / e.sum(axis=-1, keepdims=True)
        return self.y

    def backward(self, g):
        return g - (g * self.y).sum(axis=-1, keepdims=True)      # the leading y is missing


def buggy(x):
    return SoftmaxForgotY()(x)


ones = mv.backend.array_module(logits.data).ones(logits.shape)
logits.grad = None
buggy(logits).backward(ones)                                         # g = ones
with mv.no_grad():
    numeric = central_difference(lambda: float(buggy(logits).data.sum()), logits.data, 1e-6)
ones_error = relative_error(logits.grad, numeric)
lesson.say("", f"With g = ones: buggy backward gives max |dx| = "
               f"{float(abs(logits.grad).max()):.1e}, central differences of sum(softmax) = 1 "
               f"give {float(abs(numeric).max()):.1e}: error {ones_error:.1e}.")
lesson.expect("a ones cotangent is fooled by the bug", ones_error < 1e-6,
              "both gradients are ~0, the check passes")
random_error = my_gradcheck(buggy, logits)
lesson.expect("a random cotangent exposes it", random_error > 1e-2,
              f"relative error {random_error:.2f}")
try:
    mv.gradcheck(buggy, logits)
    lesson.expect("mv.gradcheck raises GradcheckError on the bug", False)
except mv.GradcheckError as e:
    lesson.say(f"mv.gradcheck(buggy softmax) -> GradcheckError: {e}")
    lesson.expect("mv.gradcheck raises GradcheckError on the bug", True)

lesson.finish()
