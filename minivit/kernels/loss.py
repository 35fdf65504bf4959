"""Launchers of loss.cu's kernels: cross-entropy of integer labels with label smoothing."""
from minivit import backend
from minivit.kernels import function

THREADS = 256             # 8 warps a block
ROWS_PER_BLOCK = THREADS // 32


def _inputs(z, labels):
    xp = backend.array_module(z)
    return xp, xp.ascontiguousarray(z), xp.ascontiguousarray(labels.astype("int64", copy=False))


def forward(z, labels, smoothing):
    """The mean over rows of the smoothed cross-entropy, a 0-d array (NaN for a bad label)."""
    xp, z, labels = _inputs(z, labels)
    rows, k = z.shape
    loss = xp.empty(1, dtype=z.dtype)
    function("loss.cu", "cross_entropy_forward")(
        (1,), (THREADS,), (z, labels, loss, xp.float32(smoothing), xp.int64(rows),
                           xp.int32(k)))
    return loss.reshape(())


def backward(z, labels, smoothing, g):
    """dz = g (softmax(z) - t) / rows, t the smoothed one-hot targets."""
    xp, z, labels = _inputs(z, labels)
    rows, k = z.shape
    grad = xp.ascontiguousarray(xp.asarray(g, dtype=z.dtype).reshape(1))
    dz = xp.empty_like(z)
    grid = (max(min((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, 65535), 1),)
    function("loss.cu", "cross_entropy_backward")(
        grid, (THREADS,), (z, labels, grad, dz, xp.float32(smoothing), xp.int64(rows),
                           xp.int32(k)))
    return dz


# Inputs at a training-like size (cifar-small at batch 128: 10 classes, smoothing 0.1), for
# the GPU tests and timings.

def example_forward(xp):
    """z, labels, s: the logits and labels of a training step."""
    rng = xp.random.default_rng(0)
    return (rng.standard_normal((128, 10), dtype="float32"),
            rng.integers(0, 10, 128).astype("int64"), 0.1)


def example_backward(xp):
    """z, labels, s, g (g = dL/dloss, a 0-d array)."""
    return (*example_forward(xp), xp.ones((), dtype="float32"))
