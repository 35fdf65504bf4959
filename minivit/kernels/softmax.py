"""Launchers of softmax.cu's kernels: attention's row softmax of c S and its backward."""
from minivit import backend
from minivit.kernels import function, normal

MAX_LENGTH = 1024         # the longest row a warp holds in registers (32 values a lane)
THREADS = 256             # 8 warps a block, one row per warp at a time
ROWS_PER_BLOCK = THREADS // 32


def _launch(name, arrays, scale):
    xp = backend.array_module(arrays[0])
    arrays = [xp.ascontiguousarray(a) for a in arrays]
    out = xp.empty_like(arrays[0])
    t = out.shape[-1]
    rows = out.size // max(t, 1)
    grid = (max(min((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, 65535), 1),)
    name += "_256" if t <= 256 else "_1024"          # 8 or 32 values a lane
    function("softmax.cu", name)(grid, (THREADS,), (*arrays, out, xp.float32(scale),
                                                    xp.int64(rows), xp.int32(t)))
    return out


def forward(s, scale):
    """A = softmax(scale * s) over the last axis."""
    return _launch("attention_softmax_forward", [s], scale)


def backward(da, a, scale):
    """dS = scale * A * (dA - sum(dA * A, last axis))."""
    return _launch("attention_softmax_backward", [da, a], scale)


# Inputs at a training-like size (cifar-small at batch 128: 3 heads, 65 tokens, D_h 64),
# for the GPU tests and timings.

SCORES = (128, 3, 65, 65)
SCALE = 64 ** -0.5


def example_forward(xp):
    """S, c: the scores of a training step and 1 / sqrt(D_h)."""
    return (*normal(xp, SCORES), SCALE)


def example_backward(xp):
    """dA, A, c (A's rows positive, summing to 1)."""
    da, s = normal(xp, SCORES, SCORES)
    a = xp.exp(s)
    return da, a / a.sum(axis=-1, keepdims=True), SCALE
