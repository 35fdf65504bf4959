"""The error function erf, which GELU needs (Eq. 3) and NumPy does not have.

    erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt,    Phi(x) = (1 + erf(x / sqrt 2)) / 2

is the standard normal CDF Phi in disguise.  It lives in SciPy, which minivit does not
need, so here it is written out: W. J. Cody's rational approximations (the reference,
accurate to float64 rounding) and, for float32 input, the single rational function
that Eigen and XLA use (a fast path).
"""

from minivit import backend, fast
from minivit.autograd import Tensor

array_module = backend.array_module


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


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise.

    W. J. Cody's algorithm ("Rational Chebyshev approximations for the error function",
    Math. Comp. 23, 1969, with the coefficients of his routine CALERF), accurate to a
    few units in the last place of float64.  With y = |x|:

        y <= 0.46875       erf(y)  = y A(y^2) / B(y^2)
        0.46875 < y <= 4   erfc(y) = exp(-y^2) C(y) / D(y)
        y > 4              erfc(y) = exp(-y^2) (1/sqrt(pi) - z P(z) / Q(z)) / y,  z = 1/y^2

    A/B, C/D, P/Q are rational functions; erf = 1 - erfc on the outer ranges and
    erf(-x) = -erf(x).  exp(-y^2) is taken as exp(-r^2) exp(-(y - r)(y + r)) with
    r = y rounded down to a multiple of 1/16, which keeps y^2 from losing digits.
    All three ranges are computed for every entry, each on y clipped into its range
    (so no branch overflows), and `where` picks the right one: batched, no loops.
    Float32 input gives float32 output (computed in float64, or by erf_float32).
    """
    if isinstance(x, Tensor):
        raise TypeError("erf works on raw arrays and has no backward; pass tensor.data, or use "
                        "mv.gelu for the differentiable GELU built on it")
    xp = array_module(x)
    x = xp.asarray(x)
    if not backend.is_floating(x):
        x = x.astype("float64")
    if x.dtype == "float32":
        if fast.enabled("float32_erf"):
            return erf_float32(x)
        return erf(x.astype("float64")).astype("float32")
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


# --- fast path -------------------------------------------------------------------------

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


def erf_float32(x):
    """Fast path: float32 erf as one rational function, within 5e-7 of erf; Cody's
    three ranges in float64 cost several times the passes."""
    x = array_module(x).clip(x, -4.0, 4.0)
    x2 = x * x
    return x * _polynomial(_ERF32_P, x2) / _polynomial(_ERF32_Q, x2)
