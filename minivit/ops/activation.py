"""Activations: GELU, softmax, log-softmax and dropout.

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

from minivit import backend, kernels
from minivit.autograd import Function, Tensor
from minivit.blocks import map_rows
from minivit.ops.special import erf

array_module = backend.array_module


# --- GELU ---------------------------------------------------------------------------------

_SQRT_HALF = math.sqrt(0.5)
_ONE_OVER_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_TANH_SCALE = math.sqrt(2 / math.pi)
_TANH_CUBIC = 0.044715
GELU_APPROXIMATIONS = ("erf", "tanh")


def gelu_erf(x):
    """GELU(x) = x Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2; returns (y, Phi(x))."""
    cdf = 0.5 * (1 + erf(x * _SQRT_HALF))
    return x * cdf, cdf


def gelu_erf_backward(g, x, cdf):
    """dx = g (Phi(x) + x phi(x)), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    pdf = array_module(x).exp(-0.5 * x * x) * _ONE_OVER_SQRT_2PI
    dy_dx = cdf + x * pdf
    return g * dy_dx


def gelu_tanh(x):
    """GELU(x) ~ x/2 (1 + tanh(c (x + a x^3))); returns (y, t = tanh(...))."""
    t = array_module(x).tanh(_TANH_SCALE * (x + _TANH_CUBIC * x * x * x))
    return 0.5 * x * (1 + t), t


def gelu_tanh_backward(g, x, t):
    """dx = g ((1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2))."""
    du_dx = _TANH_SCALE * (1 + 3 * _TANH_CUBIC * x * x)
    dy_dx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx
    return g * dy_dx


# Fast path (GPU): each rule as one CUDA kernel instead of a dozen elementwise launches;
# the forward saves nothing, the backward recomputes Phi(x) or tanh(u) from x.
from minivit.kernels import gelu as _gelu_cuda  # noqa: E402

GELU_KERNELS = {
    "erf": (kernels.Kernel("gelu_erf_forward", "gelu.cu", _gelu_cuda.erf_forward,
                           lambda x: gelu_erf(x)[0], example=_gelu_cuda.example_forward),
            kernels.Kernel("gelu_erf_backward", "gelu.cu", _gelu_cuda.erf_backward,
                           lambda g, x: gelu_erf_backward(g, x, gelu_erf(x)[1]),
                           sample=kernels.leading(0, 1), example=_gelu_cuda.example_backward)),
    "tanh": (kernels.Kernel("gelu_tanh_forward", "gelu.cu", _gelu_cuda.tanh_forward,
                            lambda x: gelu_tanh(x)[0], example=_gelu_cuda.example_forward),
             kernels.Kernel("gelu_tanh_backward", "gelu.cu", _gelu_cuda.tanh_backward,
                            lambda g, x: gelu_tanh_backward(g, x, gelu_tanh(x)[1]),
                            sample=kernels.leading(0, 1), example=_gelu_cuda.example_backward)),
}


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
    so dx = g times that.  The four functions above are the two forms' forward and
    backward; on the CPU they run a block of rows at a time (minivit/blocks.py).
    """

    RULES = {"erf": (gelu_erf, gelu_erf_backward), "tanh": (gelu_tanh, gelu_tanh_backward)}

    def __init__(self, approximate="erf"):
        if approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS} "
                             f"('erf': exact x*Phi(x); 'tanh': the tanh approximation), "
                             f"got {approximate!r}")
        self.rule, self.backward_rule = self.RULES[approximate]
        self.kernels = GELU_KERNELS[approximate]

    def forward(self, x):
        self.x = x
        if kernels.usable(x):
            self.saved = None
            return self.kernels[0](x)
        y, self.saved = map_rows(self.rule, x)          # saved: Phi(x), or tanh(u)
        return y

    def backward(self, g):
        if self.saved is None:
            return self.kernels[1](g, self.x)
        return map_rows(self.backward_rule, g, self.x, self.saved)


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


def softmax_array(x, axis=-1):
    """softmax(x) on a raw array: exp(x - m) / sum exp(x - m), m the maximum along `axis`.

    Softmax ignores a constant shift of its inputs, and with the maximum subtracted
    every exp is at most 1 (no overflow) and the largest is exactly 1 (the sum is >= 1)."""
    e = array_module(x).exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Softmax(Function):
    """y = softmax(x) along `axis`: y_i = exp(x_i) / sum_j exp(x_j)  (Appendix A, Eq. 6).

    Forward: softmax_array, the same values computed without overflow.
    Backward: dy_i/dx_k = y_i (delta_ik - y_k), so the vector-Jacobian product is
        dx_k = sum_i g_i y_i (delta_ik - y_k) = y_k (g_k - sum_i g_i y_i),
    i.e. dx = y * (g - sum(g * y, axis, keepdims=True)), no K x K Jacobian needed.
    """

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        _check_axis("softmax", self.axis, x.ndim)
        self.y = softmax_array(x, self.axis)
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
    `scale` is m / (1 - p) (see dropout_mask); it may have fewer axes or axes of length
    1 (it is broadcast against x), e.g. a (B, 1, 1) mask drops whole samples.
    """

    def __init__(self, scale):
        self.scale = scale

    def forward(self, x):
        m = tuple(self.scale.shape)
        if len(m) > x.ndim or any(a not in (1, b) for a, b in zip(m[::-1], x.shape[::-1])):
            raise ValueError(f"dropout: the mask of shape {m} does not broadcast to the "
                             f"input's shape {tuple(x.shape)}")
        return x * self.scale

    def backward(self, g):
        return g * self.scale


def dropout_mask(rng, shape, p, dtype="float32"):
    """m / (1 - p), the fixed multiplier of inverted dropout, in `dtype`: m_i = 1 when
    u_i >= p for u_i uniform on [0, 1) drawn from `rng`, so a seed fixes the mask."""
    keep = rng.random(shape, dtype="float32") >= p
    return keep.astype(dtype) / (1 - p)


def dropout(x, p, training=True, rng=None, mask=None):
    """Inverted dropout: zero each entry of x with probability p, scale the rest by 1/(1-p).

    With p == 0 or training=False, x itself is returned.  Otherwise the keep-mask is
    `mask` when given (a boolean or 0/1 array that broadcasts to x), else drawn from
    `rng`, a generator from minivit.backend.generator(seed, device) on x's device
    (dropout_mask).
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
        scale = dropout_mask(rng, data.shape, p, data.dtype)
    else:
        mask = mask.data if isinstance(mask, Tensor) else mask
        backend.check_same_device("dropout", [data, mask])
        scale = mask.astype(data.dtype) / (1 - p)
    return Dropout(scale)(x)


# --- patch dropout ---------------------------------------------------------------------

class KeepTokens(Function):
    """y[b, j] = z[b, keep[b, j]]: of each image b's tokens z[b] (T x D), the K listed in
    row b of `keep` (B, K), in that order.

    Every output row is one input row, so the gradient puts each row of g back where it
    came from and leaves zeros at the tokens that were dropped:
        dz[b, keep[b, j]] = g[b, j],      dz[b, t] = 0 for t not in keep[b].
    `keep` lists distinct tokens in each row (patch_dropout draws it so): no token gets
    two rows of g, so assignment is the whole rule (GetItem's scatter-add is the
    general case, where an index may repeat).
    """

    def __init__(self, keep):
        self.keep = keep

    def forward(self, z):
        if z.ndim != 3 or self.keep.ndim != 2 or self.keep.shape[0] != z.shape[0]:
            raise ValueError(f"keep_tokens expects tokens (B, T, D) and indices (B, K), got "
                             f"shapes {tuple(z.shape)} and {tuple(self.keep.shape)}")
        self.shape = z.shape
        self.images = array_module(z).arange(z.shape[0])[:, None]       # (B, 1): b
        return z[self.images, self.keep]

    def backward(self, g):
        dz = array_module(g).zeros(self.shape, dtype=g.dtype)
        dz[self.images, self.keep] = g
        return dz


def patch_dropout_indices(rng, batch, num_tokens, p, num_prefix=0, device="cpu"):
    """The tokens patch dropout keeps, (batch, K) integers on `device` (where `rng`
    draws): the first num_prefix tokens ([CLS]) always, then max(1, int(N (1 - p))) of
    the N = num_tokens - num_prefix patch tokens, a different random subset for each
    image: the positions of the smallest of N uniform draws, so every subset of that
    size is equally likely."""
    xp = backend.module_for(device)
    n = num_tokens - num_prefix
    kept = max(1, int(n * (1 - p)))
    draws = rng.random((batch, n), dtype="float32")
    patches = xp.argsort(draws, axis=1)[:, :kept] + num_prefix
    prefix = xp.broadcast_to(xp.arange(num_prefix), (batch, num_prefix))
    return xp.concatenate([prefix, patches], axis=1)


def patch_dropout(z, p, training=True, rng=None, num_prefix=0):
    """PatchDropout (Liu et al. 2022): each training image keeps a random max(1, int(N (1 -
    p))) of its N patch tokens z (B, num_prefix + N, D), after the position embeddings
    are added (each kept token still knows where it was), and drops the rest; the first
    num_prefix tokens ([CLS]) are always kept.  The encoder's cost falls with the number
    of tokens, so a step costs about (1 - p) as much; at evaluation (training=False, or
    p == 0) every token stays and z itself is returned.  `rng`: a generator on z's
    device, as for dropout."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"patch_dropout: p must be a fraction in [0, 1), got {p!r}")
    if not training or p == 0:
        return z
    if rng is None:
        raise ValueError("patch_dropout with p > 0 in training needs rng=, e.g. "
                         "minivit.backend.generator(seed, device)")
    data = z.data if isinstance(z, Tensor) else z
    if data.ndim != 3:
        raise ValueError(f"patch_dropout expects tokens of shape (B, T, D), got shape "
                         f"{tuple(data.shape)}")
    B, T = data.shape[:2]
    if not 0 <= num_prefix < T:
        raise ValueError(f"patch_dropout: num_prefix {num_prefix} leaves no patch token of "
                         f"the {T} tokens in z (shape {tuple(z.shape)})")
    keep = patch_dropout_indices(rng, B, T, p, num_prefix, backend.device_of(data))
    return KeepTokens(keep)(z)


def keep_tokens(z, keep):
    """z[b, keep[b, j]] for tokens z (B, T, D) and distinct indices keep (B, K) per row."""
    return KeepTokens(keep.data if isinstance(keep, Tensor) else keep)(z)
