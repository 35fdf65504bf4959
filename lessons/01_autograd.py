"""Autograd: the chain rule, applied backwards through a recorded graph.

Training a ViT means following the gradient of the loss with respect to every
parameter: E, E_pos and x_class of Eq. 1, the attention and MLP weights of Eq. 2-3,
the head after Eq. 4.  Nobody writes those gradients out for the whole model.
Instead every operation is a Function that knows its own local derivative, and the
chain rule strings them together.

Forward, each Function computes y = f(x) and records the edge x -> f -> y, so the
tensors form a graph.  loss.backward() walks that graph from the loss back to the
leaves, and each Function turns g = dL/dy into dL/dx:

    dL/dx = sum over outputs y of  dL/dy * dy/dx          (the chain rule)

For y = tanh(u), dL/du = g * (1 - y^2); for u = x W + b, dL/dW = x^T g, dL/db = the
sum of g over the batch, dL/dx = g W^T.  When a tensor feeds two operations (a
"diamond"), the sum in the chain rule runs over both paths, so the walk adds the
two gradients.  Under `with mv.no_grad():` nothing is recorded (evaluation, and
the optimiser's updates).

A backward pass is trusted once it matches the gradient measured numerically, from
the forward pass alone: a gradient check (at the end here; lesson 02 in depth).
"""
import numpy as np

import minivit as mv
from common import Lesson

lesson = Lesson("01", "autograd", __doc__)
rng = np.random.default_rng(0)


def graph(t, root=True):
    """The recorded graph behind t as nested Function names (named tensors by name)."""
    if t.creator is None or (t.name and not root):
        return t.name or f"{t.item():g}"
    return f"{type(t.creator).__name__}({', '.join(graph(x, False) for x in t.creator.inputs)})"


def diamond(x, W):
    """h = tanh(x W) feeds two operations: L2 = sum(h * h + 3 h)."""
    h = (x @ W).tanh()
    return h * h + 3 * h


# --- 1. A small graph: one tanh layer and a squared error -------------------------------
x = mv.tensor(rng.standard_normal((4, 3)), requires_grad=True, name="x")   # 4 inputs of width 3
W = mv.tensor(rng.standard_normal((3, 2)), requires_grad=True, name="W")
b = mv.tensor(rng.standard_normal(2), requires_grad=True, name="b")
t = mv.tensor(rng.standard_normal((4, 2)), name="t")                        # targets

u = x @ W + b                       # (4, 2); b is broadcast over the 4 rows
y = u.tanh()
L = ((y - t) ** 2).mean()
lesson.say(f"L = mean((tanh(x W + b) - t)^2) = {L.item():.6f}",
           f"the recorded graph: L = {graph(L)}")

L.backward()                        # autograd: fills x.grad, W.grad, b.grad

# --- 2. The same gradients by hand, with plain array math --------------------------------
xp = mv.backend.array_module(x.data)
n = y.size
gL = 1.0                                        # dL/dL
gy = gL * 2 * (y.data - t.data) / n             # L = (1/n) sum (y - t)^2
gu = gy * (1 - y.data ** 2)                     # y = tanh(u):   tanh' = 1 - tanh^2
gW = x.data.T @ gu                              # u = x W + b:   dL/dW = x^T g
gb = gu.sum(axis=0)                             # and dL/db = g summed over the rows
gx = gu @ W.data.T                              # and dL/dx = g W^T
lesson.say("", "by hand: gy = 2(y - t)/n, gu = gy (1 - y^2), gW = x^T gu, gb = sum_rows gu, "
               "gx = gu W^T")
lesson.same("dL/dW: backward() equals the hand-derived chain rule", W.grad, gW)
lesson.same("dL/db: backward() equals the hand-derived chain rule", b.grad, gb)
lesson.same("dL/dx: backward() equals the hand-derived chain rule", x.grad, gx)

# --- 3. A diamond: one tensor used twice, the gradients of both paths add up -------------
#   h = tanh(x W)  feeds both  h * h  and  3 h:   L = sum(h * h + 3 h)
#   dL/dh = 2 h (through h * h, itself h used twice) + 3 (through 3 h)
x.grad = W.grad = None
h = (x @ W).tanh()
h.name = "h"
L2 = (h * h + 3 * h).sum()
lesson.say("", f"diamond: L2 = {graph(L2)}  with  h = {graph(h)}")
L2.backward()
gh = 2 * h.data + 3                                     # both paths, added
gW2 = x.data.T @ (gh * (1 - h.data ** 2))
lesson.same("diamond: dL2/dW adds the paths (2h + 3)", W.grad, gW2)
one_path = x.data.T @ (3 * (1 - h.data ** 2))           # what forgetting a path would give
lesson.expect("one path alone would be wrong",
              float(xp.abs(one_path - W.grad).max()) > 1e-3,
              f"max difference {float(xp.abs(one_path - W.grad).max()):.2f}")

# --- 4. Gradients accumulate: .grad += on every backward ---------------------------------
W.grad = None
for _ in range(2):
    ((x @ W).tanh() ** 2).sum().backward()              # two backward passes, no reset
single = mv.tensor(W.data, requires_grad=True)
((x.detach() @ single).tanh() ** 2).sum().backward()
lesson.same("two backward() calls without resetting give twice the gradient",
            W.grad, 2 * single.grad)
lesson.say("(so a training step sets .grad = None before its backward: model.zero_grad())")

# --- 5. no_grad: nothing recorded ---------------------------------------------------------
with mv.no_grad():
    y_eval = (x @ W + b).tanh()
lesson.expect("under no_grad the result has no creator and needs no grad",
              y_eval.creator is None and not y_eval.requires_grad)
try:
    y_eval.sum().backward()
    lesson.expect("backward() through a no_grad result is refused", False)
except RuntimeError as e:
    lesson.expect("backward() through a no_grad result is refused", True, str(e))

# --- 6. And a numerical check: the gradient measured, not derived ------------------------
lesson.say("",
           "A numerical gradient check measures the gradient instead of deriving it: nudge",
           "one input entry by +-eps, run the forward pass twice, and the central difference",
           "(L(+eps) - L(-eps)) / (2 eps) approximates dL/d(entry).  mv.gradcheck does this",
           "for every entry of every input, in float64, compares it with backward() and",
           "reports the largest relative error (pass: below 1e-6).  Lesson 02 builds one",
           "from scratch and shows why float64 and why a random cotangent.")


def tanh_layer_loss(x, W, b):
    return (((x @ W + b).tanh() - t) ** 2).mean()


W.grad = None
tanh_layer_loss(x, W, b).backward()
eps = 1e-6
nudge = xp.zeros(W.shape)
nudge[0, 0] = eps                                       # moves W[0, 0] only
with mv.no_grad():
    up = tanh_layer_loss(x, mv.tensor(W.data + nudge), b).item()
    down = tanh_layer_loss(x, mv.tensor(W.data - nudge), b).item()
central_difference = (up - down) / (2 * eps)
lesson.say(f"dL/dW[0, 0]: central difference {central_difference:.10f}, backward() "
           f"{W.grad[0, 0].item():.10f}")
lesson.same("one entry: the central difference equals backward()",
            np.array(central_difference), W.grad[0, 0], rtol=1e-7, atol=1e-9)
lesson.gradcheck("every entry: the tanh layer and its loss (x, W, b)", tanh_layer_loss, x, W, b)
lesson.gradcheck("every entry: the diamond (x, W)", diamond, x, W)
lesson.finish()
