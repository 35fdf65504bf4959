"""Launchers of layernorm.cu's kernels: LayerNorm forward and backward over the last axis."""
from minivit import backend
from minivit.kernels import function, normal

MAX_WIDTH = 1024          # the widest row a warp holds in registers (32 values a lane)
THREADS = 256             # 8 warps a block, one row per warp at a time
ROWS_PER_BLOCK = THREADS // 32
MAX_BLOCKS = 512          # the backward's partial sums: at most this many blocks


def _width(d):
    """The kernels' suffix for rows d wide: _256 (8 values a lane) or _1024 (32)."""
    return "_256" if d <= 256 else "_1024"


def _rows(x):
    xp = backend.array_module(x)
    d = x.shape[-1]
    return xp, xp.ascontiguousarray(x).reshape(-1, d), d


def forward(x, gamma, beta, eps):
    """(y, mu, 1/sigma): y like x, mu and 1/sigma of shape x.shape[:-1]."""
    xp, rows, d = _rows(x)
    n = rows.shape[0]
    y = xp.empty_like(rows)
    mean = xp.empty(n, dtype=rows.dtype)
    rstd = xp.empty(n, dtype=rows.dtype)
    grid = (max(min((n + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, 65535), 1),)
    function("layernorm.cu", "layernorm_forward" + _width(d))(
        grid, (THREADS,), (rows, xp.ascontiguousarray(gamma), xp.ascontiguousarray(beta),
                           y, mean, rstd, xp.int64(n), xp.int32(d), xp.float32(eps)))
    lead = x.shape[:-1]
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def backward(dy, x, gamma, mean, rstd, dgamma=None, dbeta=None):
    """(dx, dgamma, dbeta) from dy, the forward's input x, gamma, mu and 1/sigma; dgamma
    and dbeta written into the given contiguous arrays (gradient slots), if any."""
    xp, rows, d = _rows(x)
    n = rows.shape[0]
    dy_rows = xp.ascontiguousarray(dy).reshape(-1, d)
    dx = xp.empty_like(rows)
    blocks = max(min((n + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, MAX_BLOCKS), 1)
    partial = xp.empty((blocks, 2, d), dtype=rows.dtype)
    function("layernorm.cu", "layernorm_backward" + _width(d))(
        (blocks,), (THREADS,), (dy_rows, rows, xp.ascontiguousarray(gamma),
                                xp.ascontiguousarray(mean), xp.ascontiguousarray(rstd),
                                dx, partial, xp.int64(n), xp.int32(d)))
    dgamma = xp.empty(d, dtype=rows.dtype) if dgamma is None else dgamma
    dbeta = xp.empty(d, dtype=rows.dtype) if dbeta is None else dbeta
    function("layernorm.cu", "layernorm_column_sums")(
        ((2 * d + THREADS - 1) // THREADS,), (THREADS,), (partial, dgamma, dbeta,
                                                         xp.int32(blocks), xp.int32(d)))
    return dx.reshape(x.shape), dgamma, dbeta


# Inputs at a training-like size (cifar-small at batch 128: 65 tokens of width 192), for
# the GPU tests and timings.

TOKENS = (128, 65, 192)


def example_forward(xp):
    """x, gamma, beta, eps: a LayerNorm's input in a training step."""
    return (*normal(xp, TOKENS, TOKENS[-1:], TOKENS[-1:]), 1e-6)


def example_backward(xp):
    """dy, x, gamma, mu, 1/sigma."""
    dy, x, gamma, mu, s = normal(xp, TOKENS, TOKENS, TOKENS[-1:], TOKENS[:-1], TOKENS[:-1])
    return dy, x, gamma, mu, xp.abs(s) + 0.5
