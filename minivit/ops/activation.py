"""Activations: the error function, GELU, softmax, log-softmax and dropout.

Where they appear in ViT (Dosovitskiy et al. 2021):

    GELU       the non-linearity between the two layers of every MLP block (Eq. 3)
    softmax    the attention weights A = softmax(q k^T / sqrt(D_h)) (Appendix A, Eq. 6)
    log-softmax  inside the cross-entropy loss of the classification head
    dropout    after the embeddings, inside the MLP and on the attention weights

Notation as in ops/basic.py: y is the output, g = dL/dy arrives from above and each
backward returns dL/dx.  Every function works on arrays of either backend, with
`xp = backend.array_module(x)`, and keeps float32 inputs float32.
"""
import math

from minivit import backend
from minivit.autograd import Function, Tensor
from minivit.blocks import map_rows

array_module = backend.array_module


# --- the error function ----------------------------------------------------------------

# W. J. Cody, "Rational Chebyshev approximations for the error function",
# Math. Comp. 23 (1969) 631-638; the coefficients of his Fortran routine CALERF
# (netlib SPECFUN, www.netlib.org/specfun/erf), which many C libraries copy.
_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
          2.84423683343917062e03)
_ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
          2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
          2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
          1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
          3.43936767414372164e03, 1.23033935480374942e03)
_ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
          1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_ERF_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
          6.05183413124413191e-2, 2.33520497626869185e-3)
_ONE_OVER_SQRT_PI = 0.56418958354775628695
_ERF_SMALL = 0.46875        # below: erf directly; above: erfc, then erf = 1 - erfc
_ERF_ONE = 6.0              # erfc(6) = 2e-17 < half an ulp of 1: erf(x) rounds to 1 beyond


def _ratio(num, den, z):
    """The rational function  (num[-1] z^n + num[0] z^(n-1) + ... + num[n-1])
                            / (z^n + den[0] z^(n-1) + ... + den[n-1])
    by Horner's rule, in Cody's order (he stores the leading numerator coefficient last)."""
    top, bottom = num[-1] * z, z
    for a, b in zip(num[:-2], den[:-1]):
        top, bottom = (top + a) * z, (bottom + b) * z
    return (top + num[-2]) / (bottom + den[-1])


# Float32: one rational function x P(x^2) / Q(x^2) on x clipped to [-4, 4] (beyond, erf
# rounds to +-1 in float32), the minimax fit Eigen and XLA use for float32 erf.  About
# 25 elementwise passes instead of Cody's ~60, within 5e-7 of the true erf.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)


def _polynomial(coefficients, z):
    """c0 z^n + c1 z^(n-1) + ... + cn by Horner's rule, in one buffer (no temporaries)."""
    result = array_module(z).full_like(z, coefficients[0])
    for c in coefficients[1:]:
        result *= z
        result += c
    return result


def _erf_float32(x):
    x = array_module(x).clip(x, -4.0, 4.0)
    x2 = x * x
    return x * _polynomial(_ERF32_P, x2) / _polynomial(_ERF32_Q, x2)


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise.

    NumPy has no erf (it lives in SciPy, which minivit does not need), so this is
    W. J. Cody's algorithm, "Rational Chebyshev approximations for the error
    function", Math. Comp. 23 (1969), with the coefficients of his routine CALERF
    (netlib SPECFUN).  Accurate to a few units in the last place of float64.  Float32
    input takes a cheaper path (see _erf_float32: Eigen's and XLA's float32 rational
    approximation, within 5e-7 of erf), computed and returned in float32, since
    training runs in float32 and GELU is evaluated on every MLP activation.  With y = |x|:

        y <= 0.46875       erf(y)  = y A(y^2) / B(y^2)
        0.46875 < y <= 4   erfc(y) = exp(-y^2) C(y) / D(y)
        y > 4              erfc(y) = exp(-y^2) (1/sqrt(pi) - z P(z) / Q(z)) / y,  z = 1/y^2

    A/B, C/D, P/Q are rational functions; erf = 1 - erfc on the outer ranges and
    erf(-x) = -erf(x).  exp(-y^2) is taken as exp(-r^2) exp(-(y - r)(y + r)) with
    r = y rounded down to a multiple of 1/16, which keeps y^2 from losing digits.
    All three ranges are computed for every entry, each on y clipped into its range
    (so no branch overflows), and `where` picks the right one: batched, no loops.
    """
    if isinstance(x, Tensor):
        raise TypeError("erf works on raw arrays and has no backward; pass tensor.data, or use "
                        "mv.gelu for the differentiable GELU built on it")
    xp = array_module(x)
    x = xp.asarray(x)
    if not backend.is_floating(x):
        x = x.astype("float64")
    if x.dtype == "float32":
        return _erf_float32(x)
    y = xp.minimum(xp.abs(x), _ERF_ONE)        # NaN stays NaN; erf(+-inf) = +-1

    small = xp.minimum(y, _ERF_SMALL)
    erf_small = small * _ratio(_ERF_A, _ERF_B, small * small)

    middle = xp.clip(y, _ERF_SMALL, 4.0)
    large = xp.maximum(y, 4.0)
    z = 1 / (large * large)
    # erfcx(y) = exp(y^2) erfc(y), the scaled complement, on the middle and the large range
    erfcx = xp.where(y <= 4.0, _ratio(_ERF_C, _ERF_D, middle),
                     (_ONE_OVER_SQRT_PI - z * _ratio(_ERF_P, _ERF_Q, z)) / large)
    outer = xp.maximum(y, _ERF_SMALL)
    r = xp.trunc(outer * 16) / 16
    erfc = xp.exp(-r * r) * xp.exp(-(outer - r) * (outer + r)) * erfcx

    result = xp.where(y <= _ERF_SMALL, erf_small, (0.5 - erfc) + 0.5)
    return xp.copysign(result, x)


# --- GELU ------------------------------------------------------------------------------

_SQRT_HALF = math.sqrt(0.5)
_ONE_OVER_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_TANH_SCALE = math.sqrt(2 / math.pi)
_TANH_CUBIC = 0.044715
GELU_APPROXIMATIONS = ("erf", "tanh")


class GELU(Function):
    """y = GELU(x) = x Phi(x), the MLP non-linearity of ViT (Eq. 3), elementwise.

    approximate="erf" (the paper's text, timm): the exact form, with Phi the standard
    normal CDF and phi its density,
        Phi(x) = (1 + erf(x / sqrt 2)) / 2,      phi(x) = Phi'(x) = exp(-x^2/2) / sqrt(2 pi),
        dy/dx = Phi(x) + x phi(x)                (product rule),
    so dx = g (Phi(x) + x phi(x)).

    approximate="tanh" (Hendrycks & Gimpel; the official JAX code, Flax's default):
        y = x/2 (1 + t),   t = tanh(u),   u = c (x + a x^3),   c = sqrt(2/pi), a = 0.044715,
        dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)   (product and chain rule,
                                                              tanh' = 1 - tanh^2),
    so dx = g times that.
    """

    def __init__(self, approximate="erf"):
        if approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS} "
                             f"('erf': exact x*Phi(x); 'tanh': the tanh approximation), "
                             f"got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        self.x = x
        if self.approximate == "erf":
            y, self.cdf = map_rows(_gelu_erf_forward, x)
        else:
            y, self.t = map_rows(_gelu_tanh_forward, x)
        return y

    def backward(self, g):
        if self.approximate == "erf":
            return map_rows(_gelu_erf_backward, g, self.x, self.cdf)
        return map_rows(_gelu_tanh_backward, g, self.x, self.t)


# The four bodies, on raw arrays.  GELU runs them through map_rows (minivit/blocks.py):
# on the CPU a block of rows at a time, so each chain of ~30 elementwise passes runs in
# the cache.

def _gelu_erf_forward(x):
    cdf = erf(x * _SQRT_HALF)                      # Phi(x) = (1 + erf(x / sqrt 2)) / 2
    cdf += 1
    cdf *= 0.5
    return x * cdf, cdf


def _gelu_erf_backward(g, x, cdf):
    xp = array_module(x)
    pdf = xp.exp(-0.5 * x * x)                     # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    pdf *= _ONE_OVER_SQRT_2PI
    pdf *= x
    pdf += cdf                                     # dy/dx = Phi(x) + x phi(x)
    pdf *= g
    return pdf


def _gelu_tanh_forward(x):
    t = array_module(x).tanh(_TANH_SCALE * (x + _TANH_CUBIC * x * x * x))
    return 0.5 * x * (1 + t), t


def _gelu_tanh_backward(g, x, t):
    du_dx = _TANH_SCALE * (1 + 3 * _TANH_CUBIC * x * x)
    return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)


def gelu(x, approximate="erf"):
    """GELU(x) = x Phi(x); approximate="erf" (exact) or "tanh" (the official ViT code's)."""
    return GELU(approximate)(x)


# --- softmax and log-softmax -----------------------------------------------------------

def _check_axis(name, axis, ndim):
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name}: axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for an array with {ndim} "
                         f"dimension{'s' if ndim != 1 else ''}")


def log_softmax_array(x, axis=-1):
    """log softmax(x) on a raw array: x - max - log(sum(exp(x - max))), stable for any x.

    Subtracting the maximum m changes nothing, log softmax(x) = log softmax(x - m), and
    keeps every exp(x - m) in (0, 1]: no overflow for large logits, and the sum is >= 1,
    so its log is finite."""
    xp = array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    """y = softmax(x) along `axis`: y_i = exp(x_i) / sum_j exp(x_j)  (Appendix A, Eq. 6).

    Forward: computed as exp(x - max x) / sum exp(x - max x), the same values (softmax
    ignores a constant shift) without overflow.
    Backward: dy_i/dx_k = y_i (delta_ik - y_k), so the vector-Jacobian product is
        dx_k = sum_i g_i y_i (delta_ik - y_k) = y_k (g_k - sum_i g_i y_i),
    i.e. dx = y * (g - sum(g * y, axis, keepdims=True)), no K x K Jacobian needed.
    """

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        _check_axis("softmax", self.axis, x.ndim)
        xp = array_module(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, g):
        y = self.y
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """y = log softmax(x) along `axis`: y_i = x_i - log sum_j exp(x_j).

    Forward: x - m - log sum exp(x - m) with m = max x (see log_softmax_array).
    Backward: dy_i/dx_k = delta_ik - softmax(x)_k, so
        dx_k = sum_i g_i (delta_ik - p_k) = g_k - p_k sum_i g_i,   p = softmax(x) = exp(y),
    i.e. dx = g - p * sum(g, axis, keepdims=True).
    """

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        _check_axis("log_softmax", self.axis, x.ndim)
        y = log_softmax_array(x, self.axis)
        self.p = array_module(x).exp(y)
        return y

    def backward(self, g):
        return g - self.p * g.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    """softmax(x) along `axis` (default: the last), computed stably."""
    return Softmax(axis)(x)


def log_softmax(x, axis=-1):
    """log softmax(x) along `axis` (default: the last), computed stably."""
    return LogSoftmax(axis)(x)


# --- dropout ---------------------------------------------------------------------------

class Dropout(Function):
    """y = x * m / (1 - p) with a fixed 0/1 mask m ("inverted" dropout).

    Each m_i is 1 with probability 1 - p, so E[y_i] = x_i: the expectation is kept in
    training and nothing has to be rescaled at evaluation time, where dropout is the
    identity.  y is linear in x with the mask held fixed: dx = g * m / (1 - p).
    `mask` may have fewer axes or axes of length 1 (it is broadcast against x), e.g. a
    (B, 1, 1) mask drops whole samples.
    """

    def __init__(self, mask, p):
        self.mask, self.p = mask, p

    def forward(self, x):
        m = tuple(self.mask.shape)
        if len(m) > x.ndim or any(a not in (1, b) for a, b in zip(m[::-1], x.shape[::-1])):
            raise ValueError(f"dropout: the mask of shape {tuple(self.mask.shape)} does not "
                             f"broadcast to the input's shape {tuple(x.shape)}")
        self.scale = self.mask.astype(x.dtype) / (1 - self.p)   # m / (1 - p), in x's dtype
        return x * self.scale

    def backward(self, g):
        return g * self.scale


def dropout(x, p, training=True, rng=None, mask=None):
    """Inverted dropout: zero each entry of x with probability p, scale the rest by 1/(1-p).

    With p == 0 or training=False, x itself is returned.  Otherwise the keep-mask is
    `mask` when given (a boolean or 0/1 array that broadcasts to x), else drawn from
    `rng`, a generator from minivit.backend.generator(seed, device) on x's device:
    entry i is kept when u_i >= p for u_i uniform on [0, 1), so a seed fixes the mask.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout: p must be a probability in [0, 1), got {p!r}")
    if not training or p == 0:
        return x
    data = x.data if isinstance(x, Tensor) else x
    if mask is None:
        if rng is None:
            raise ValueError("dropout with p > 0 in training needs rng=, e.g. "
                             "minivit.backend.generator(seed, device), or an explicit mask=")
        mask = rng.random(data.shape, dtype="float32") >= p
    else:
        mask = mask.data if isinstance(mask, Tensor) else mask
    backend.check_same_device("dropout", [data, mask])
    return Dropout(mask, p)(x)
