"""Launchers of gelu.cu's kernels: GELU (erf and tanh forms) forward and backward."""
from minivit import backend
from minivit.kernels import BLOCK, blocks, function, normal

ACTIVATION = (128 * 65, 384)    # the MLP's hidden activation of cifar-small at batch 128


def _elementwise(name, *inputs):
    xp = backend.array_module(inputs[0])
    inputs = [xp.ascontiguousarray(a) for a in inputs]
    out = xp.empty_like(inputs[0])
    n = out.size
    function("gelu.cu", name)(blocks(n), (BLOCK,), (*inputs, out, xp.int64(n)))
    return out


def erf_forward(x):
    return _elementwise("gelu_erf_forward", x)


def erf_backward(g, x):
    return _elementwise("gelu_erf_backward", g, x)


def tanh_forward(x):
    return _elementwise("gelu_tanh_forward", x)


def tanh_backward(g, x):
    return _elementwise("gelu_tanh_backward", g, x)


def example_forward(xp):
    """x: an activation of a training step."""
    return normal(xp, ACTIVATION)


def example_backward(xp):
    """g, x: its gradient and the activation."""
    return normal(xp, ACTIVATION, ACTIVATION)
