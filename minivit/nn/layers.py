"""The layers a Vision Transformer is made of: Linear, LayerNorm, Dropout, PatchDropout,
GELU.

Initial values are drawn on the host from a seeded NumPy generator and then moved
to the default device, so a seed gives the same model on the CPU and on the GPU.
Weights are stored as (in, out), the layout of the official checkpoints' Dense
kernels, so y = x W + b.
"""
import math

from minivit import backend
from minivit.nn.module import Module, Parameter
from minivit.ops.activation import dropout, gelu, patch_dropout
from minivit.ops.basic import affine
from minivit.ops.norm import layer_norm


# --- initialisers: host arrays from a seeded generator --------------------------------

def host_generator(seed):
    """A seeded generator on the CPU, used for every initial value."""
    return backend.generator(seed, "cpu")


def param(array, dtype="float32"):
    """A Parameter with the values of a host array, on the default device."""
    return Parameter(backend.asarray(array, dtype=dtype))


def zeros(shape):
    return backend.module_for("cpu").zeros(shape)


def normal(rng, shape, std):
    return std * rng.standard_normal(shape)


def xavier_uniform(rng, fan_in, fan_out):
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio), as the official
    code's Dense layers in the encoder use."""
    limit = math.sqrt(6 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, (fan_in, fan_out))


def lecun_normal(rng, fan_in, fan_out):
    """N(0, 1/fan_in), Flax's default kernel initialiser (here without truncation)."""
    return normal(rng, (fan_in, fan_out), math.sqrt(1 / fan_in))


# --- layers ---------------------------------------------------------------------------

class Linear(Module):
    """y = x W + b over the last axis: (..., in) -> (..., out).

    The leading axes are folded into one before the product (ops.basic.affine), so the
    whole batch of tokens is a single (B*T, in) @ (in, out) matrix product, and so is
    dW = x^T g.
    """

    def __init__(self, in_features, out_features, rng, bias=True, init="xavier_uniform",
                 bias_std=0.0):
        inits = {"xavier_uniform": xavier_uniform, "lecun_normal": lecun_normal,
                 "zeros": lambda rng, i, o: zeros((i, o))}
        if init not in inits:
            raise ValueError(f"Linear: init must be one of {sorted(inits)}, got {init!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = param(inits[init](rng, in_features, out_features))
        self.bias = None
        if bias:
            self.bias = param(normal(rng, (out_features,), bias_std) if bias_std
                              else zeros((out_features,)))

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear({self.in_features} -> {self.out_features}) expects inputs "
                             f"whose last axis is {self.in_features}, got shape {x.shape}")
        return affine(x, self.weight, self.bias)


class LayerNorm(Module):
    """LayerNorm over the last axis, gamma = 1 and beta = 0 at first, eps = 1e-6 (official)."""

    def __init__(self, dim, eps=1e-6):
        self.eps = eps
        self.scale = param(backend.module_for("cpu").ones(dim))
        self.bias = param(zeros((dim,)))

    def forward(self, x):
        return layer_norm(x, self.scale, self.bias, self.eps)


class RandomSource:
    """One seeded generator per device, shared by all the dropout layers of a model."""

    def __init__(self, seed):
        self.seed = seed
        self.generators = {}

    def reseed(self, seed):
        """Start every device's generator afresh from `seed` (e.g. one seed per epoch, so
        a resumed run draws the same masks as an uninterrupted one)."""
        self.seed = seed
        self.generators = {}

    def get(self, device):
        if device not in self.generators:
            self.generators[device] = backend.generator(self.seed, device)
        return self.generators[device]


class Dropout(Module):
    """Inverted dropout with probability p in training mode; the identity in eval mode."""

    def __init__(self, p, random_source):
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.random_source = p, random_source

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return dropout(x, self.p, training=True, rng=self.random_source.get(x.device))


class PatchDropout(Module):
    """In training, each image keeps a random max(1, int(N (1 - p))) of its N patch tokens
    and the first num_prefix tokens ([CLS]); the identity in eval mode."""

    def __init__(self, p, random_source, num_prefix=0):
        if not 0 <= p < 1:
            raise ValueError(f"PatchDropout: p must be in [0, 1), got {p}")
        self.p, self.random_source, self.num_prefix = p, random_source, num_prefix

    def forward(self, z):
        if not self.training or self.p == 0:
            return z
        return patch_dropout(z, self.p, training=True, rng=self.random_source.get(z.device),
                             num_prefix=self.num_prefix)


class GELU(Module):
    """GELU(x) = x Phi(x): approximate="erf" (exact, the paper's text and timm) or "tanh"
    (the official JAX code)."""

    def __init__(self, approximate="erf"):
        self.approximate = approximate

    def forward(self, x):
        return gelu(x, self.approximate)
