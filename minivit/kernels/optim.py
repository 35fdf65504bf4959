"""Launchers of optim.cu's kernels: AdamW and SGD on a whole flat buffer, in place, and
the global gradient norm with its clip factor."""
from minivit import backend
from minivit.kernels import BLOCK, blocks, function, normal

NORM_BLOCKS = 1024          # at most this many blocks (and partial sums) for grad_norm


def adamw(w, g, m, v, scale, b1, b2, step_size, eps_hat, lr_wd, decayed):
    xp = backend.array_module(w)
    n = w.size
    function("optim.cu", "adamw_update")(
        blocks(n), (BLOCK,),
        (w, g, m, v, scale, xp.float32(b1), xp.float32(b2), xp.float32(step_size),
         xp.float32(eps_hat), xp.float32(lr_wd), xp.int64(decayed), xp.int64(n)))
    return w, m, v


def sgd(w, g, b, scale, lr, momentum, nesterov, weight_decay, decayed):
    xp = backend.array_module(w)
    n = w.size
    function("optim.cu", "sgd_update")(
        blocks(n), (BLOCK,),
        (w, g, b, scale, xp.float32(lr), xp.float32(momentum), xp.int32(bool(nesterov)),
         xp.float32(weight_decay), xp.int64(decayed), xp.int64(n)))
    return w, b


def grad_norm(g, max_norm):
    xp = backend.array_module(g)
    n = g.size
    grid = (max(1, min(NORM_BLOCKS, blocks(n)[0])),)
    partial = xp.empty(grid[0], dtype="float64")
    norm = xp.empty((), dtype="float64")
    scale = xp.empty(1, dtype="float32")
    function("optim.cu", "grad_norm")(
        grid, (BLOCK,), (g, partial, norm, scale, xp.float64(max_norm), xp.int64(n)))
    return norm, scale


# Inputs at a training-like size (cifar-small's 1.8M parameters, the first 1.2M decayed),
# for the GPU tests and timings.

PARAMETERS, DECAYED = 1_806_538, 1_200_000


def example_adamw(xp):
    """w, g, m, v, clip factor, b1, b2, step size, eps_hat, lr * weight decay, decayed."""
    w, g, m, v = normal(xp, PARAMETERS, PARAMETERS, PARAMETERS, PARAMETERS)
    return (w, g, m, v * v, xp.full(1, 0.5, dtype="float32"), 0.9, 0.999, 1e-3, 1e-8, 1e-4,
            DECAYED)


def example_sgd(xp):
    """w, g, momentum buffer, clip factor, lr, momentum, nesterov, weight decay, decayed."""
    w, g, b = normal(xp, PARAMETERS, PARAMETERS, PARAMETERS)
    return w, g, b, xp.full(1, 0.5, dtype="float32"), 0.03, 0.9, False, 1e-4, DECAYED


def example_grad_norm(xp):
    """g, max_norm: a gradient whose norm is clipped."""
    return normal(xp, PARAMETERS)[0], 1.0
