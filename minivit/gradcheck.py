"""Numerical gradient checking: does a backward pass agree with finite differences?

For a function y = f(x1, ..., xn) we pick a random cotangent g (same shape as y)
and check the gradient of the scalar

    phi(x) = <g, f(x)> = sum(g * f(x)),

whose gradient with respect to x is exactly what backward(g) computes.  A random g,
rather than all ones, matters: sum(softmax(x)) is always 1 and sum(layer_norm(x))
always 0, so a ones-seeded check would pass a softmax or LayerNorm backward that
drops a term.

Each partial derivative is estimated by a central difference,

    d phi / d x_i  ~  (phi(x + eps e_i) - phi(x - eps e_i)) / (2 eps),

whose error is O(eps^2) from truncation plus O(u |phi| / eps) from rounding, with u
the unit roundoff.  In float64 (u ~ 1e-16) and eps = 1e-6 both are ~1e-10; in
float32 (u ~ 6e-8) the rounding term alone is percents, so the check always runs
on float64 copies of the inputs.
"""
import itertools

from minivit import backend
from minivit.autograd import Tensor, no_grad


class GradcheckError(AssertionError):
    """The analytic gradient disagrees with the numerical one."""


def _float64_copy(x):
    """A float64 copy of a floating tensor (keeping its memory layout, so a transposed
    view stays non-contiguous); float64 tensors and anything else pass through unchanged."""
    if isinstance(x, Tensor) and backend.is_floating(x.data) and x.dtype != "float64":
        return Tensor(x.data.astype("float64", order="K", copy=True),
                      requires_grad=x.requires_grad)
    return x


def numerical_gradient(phi, x, eps=1e-6):
    """Central differences of the scalar function phi() with respect to every entry of
    x (an array that phi reads), perturbing x in place and restoring it."""
    xp = backend.array_module(x)
    grad = xp.zeros(x.shape, dtype=x.dtype)
    for index in itertools.product(*(range(n) for n in x.shape)):
        old = x[index].item()
        x[index] = old + eps
        up = phi()
        x[index] = old - eps
        down = phi()
        x[index] = old
        grad[index] = (up - down) / (2 * eps)
    return grad


def gradcheck(fn, *inputs, eps=1e-6, atol=1e-7, rtol=1e-6, seed=0):
    """Check the gradients of `fn(*inputs)` for every input tensor with requires_grad.

    Runs in float64 on both backends.  An entry passes when

        |analytic - numeric| <= max(rtol * max(|analytic|, |numeric|), atol),

    i.e. its relative error is at most rtol, with errors below magnitude atol/rtol
    measured absolutely (a float64 central difference resolves ~1e-10, not less).
    Returns the largest such relative error; raises GradcheckError naming the input,
    the worst entry, both values and the error when a check fails.
    `fn` must be deterministic (fix dropout masks with a seed inside it), and the inputs
    should lie away from kinks (ReLU at 0, ties in max), where a central difference
    straddles two slopes: the caller chooses them, as the tests do.
    Float32 inputs are checked through float64 copies; float64 inputs are used as they
    are (perturbed in place and restored, their .grad left as it was), so the
    parameters of a model cast to float64 can be checked where the model reads them.
    """
    args = [_float64_copy(x) for x in inputs]
    checked = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to check")

    for i in checked:
        _require_finite(args[i].data, f"input {i}", ValueError,
                        "gradcheck needs finite inputs: choose them away from inf and NaN")
    y = fn(*args)
    if not isinstance(y, Tensor) or not y.requires_grad:
        raise ValueError("gradcheck: fn must return a Tensor computed from the inputs that "
                         f"require grad, got {type(y).__name__}")
    _require_finite(y.data, "the output of fn", GradcheckError,
                    "a NaN or inf compares false with everything, so no check could fail")
    cotangent = backend.random_normal(y.shape, seed, like=y.data)
    # float64 inputs are the caller's own: keep copies of their gradients (a parameter's
    # .grad may be a view into an optimiser's flat buffer, which backward writes into)
    saved_grads = [None if args[i].grad is None else args[i].grad.copy() for i in checked]
    for i in checked:
        args[i].grad = None
    try:
        y.backward(cotangent)
        return _compare(fn, args, checked, cotangent, eps, atol, rtol)
    finally:
        for i, grad in zip(checked, saved_grads):
            args[i].grad = grad


def _require_finite(a, what, error, why):
    """Raise `error` naming the first NaN or inf in array `a` (a NaN makes every
    comparison false, so a check that met one would pass whatever the backward did)."""
    xp = backend.array_module(a)
    bad = ~xp.isfinite(a)
    if bool(bad.any()):
        k = int(bad.reshape(-1).argmax())
        where = _unravel(k, a.shape)
        value = float(a.reshape(-1)[k])
        raise error(f"gradcheck: {what} has a non-finite value {value} at index {where}; {why}")


def _unravel(k, shape):
    """The index tuple of flat (C-order) position k in an array of `shape`, on the host
    (CuPy's unravel_index takes only device arrays)."""
    where = []
    for n in reversed(shape):
        k, i = divmod(k, n)
        where.append(i)
    return tuple(reversed(where))


def _compare(fn, args, checked, cotangent, eps, atol, rtol):

    def phi():
        with no_grad():
            return (fn(*args).data * cotangent).sum().item()

    worst = 0.0
    for i in checked:
        x = args[i]
        xp = backend.array_module(x.data)
        analytic = x.grad if x.grad is not None else xp.zeros_like(x.data)
        _require_finite(analytic, f"the analytic gradient of input {i}", GradcheckError,
                        "backward produced it")
        numeric = numerical_gradient(phi, x.data, eps)
        _require_finite(numeric, f"the numerical gradient of input {i}", GradcheckError,
                        "fn is not finite near the input (a pole, a log of a negative?)")
        scale = xp.maximum(xp.maximum(xp.abs(analytic), xp.abs(numeric)), atol / rtol)
        error = xp.abs(analytic - numeric) / scale
        k = int(error.argmax()) if error.size else 0
        err = float(error.reshape(-1)[k]) if error.size else 0.0
        worst = err if err > worst else worst
        if err > rtol:
            where = _unravel(k, x.shape)
            raise GradcheckError(
                f"gradcheck failed for input {i} (shape {x.shape}): at index {where} the "
                f"analytic gradient is {float(analytic[where]):.10g} but the numerical one is "
                f"{float(numeric[where]):.10g}; relative error {err:.3g} > rtol {rtol:g}")
    return worst
