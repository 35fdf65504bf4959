"""The basic operations: arithmetic, elementwise functions, reductions, shapes, matmul.

Each rule has one home, the docstring of its Function in minivit/ops/basic.py (Add, Sub,
Mul, Div, Pow, Exp, Log, Sqrt, Tanh, ReLU, Maximum, Sum, Mean, Max, Reshape, Transpose,
BroadcastTo, GetItem, MatMul, Affine) and `unbroadcast` for broadcasting.  For y = f(x)
backward receives g = dL/dy and returns dL/dx.  These tests check, in order:

1. The binary operations equal NumPy's, broadcast against every shape, on strided inputs
   and with Python scalars on either side, and pass float64 gradient checks
   (test_binary_ops_broadcast, test_binary_ops_non_contiguous,
   test_python_scalars_and_reflected_operators).
2. Their backward is the derived rule, applied to a random g: da = g, db = +-g for
   a +- b; g b, g a for a * b; g / b, -g a / b^2 for a / b; g c x^(c-1) for x^c; g y for
   e^x; g / x for ln x; g / (2y) for sqrt x; g (1 - y^2) for tanh x
   (test_elementwise_backward_follows_the_derived_formulas).
3. The unary operations equal NumPy's and pass gradient checks (test_unary_ops); ReLU's
   gradient at 0 is taken as 0 (test_relu_gradient_at_zero_is_zero) and ReLU(-inf) = 0
   (test_relu_of_minus_infinity_is_zero); where max(a, b) ties the gradient is split
   (test_maximum_ties_split_the_gradient).
4. An input broadcast in forward gets the sum of g over its copies
   (test_unbroadcast_sums_copies).
5. Reductions over any axes equal NumPy's and pass gradient checks (test_reductions);
   their backward copies g back, divided by n for the mean, to the maximum alone for max
   (test_reduction_backward_copies_g_back); a tie in max shares the gradient equally
   (test_max_ties_share_the_gradient_equally);
   the row and column sums equal NumPy's (test_row_and_column_sums).
6. Reshape, transpose and broadcast_to move g back the way they moved the values
   (test_reshape_transpose_broadcast_to); indexing does too (test_getitem), adding the
   gradients of repeated indices (test_getitem_repeated_indices_accumulate); concatenate
   splits g (test_concatenate).
7. matmul, batched and broadcast, equals NumPy's (test_matmul_batched_and_broadcast); its
   backward is da = g b^T, db = a^T g (test_matmul_backward_follows_the_derived_formula);
   on strided inputs too (test_matmul_non_contiguous).
8. affine(x, W, b) = x W + b with dX = G W^T, dW = X^T G, db = the column sums of G
   (test_affine_equals_matmul_plus_bias), on a strided input too
   (test_affine_non_contiguous_input_and_errors).

Then float32 staying float32 and the errors.
"""
import numpy as np
import pytest

import minivit as mv
from minivit.ops.basic import unbroadcast

from conftest import as_numpy, numpy_grad


def T(array, device, grad=True):
    return mv.tensor(np.asarray(array, dtype=np.float64), requires_grad=grad, device=device)


# --- arithmetic and elementwise functions -----------------------------------------------

# Shapes that broadcast against (2, 3, 4), including a scalar.
BROADCAST_SHAPES = [(2, 3, 4), (3, 1), (4,), (1, 4), (2, 1, 1), ()]


BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
    "maximum": (mv.maximum, np.maximum),
}


@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize("b_shape", BROADCAST_SHAPES)
def test_binary_ops_broadcast(name, b_shape, device, rng):
    op, reference = BINARY[name]
    a_np = rng.standard_normal((2, 3, 4))
    b_np = rng.standard_normal(b_shape) + (3.0 if name == "div" else 0.0)   # keep b away from 0
    a, b = T(a_np, device), T(b_np, device)
    np.testing.assert_allclose(op(a, b).numpy(), reference(a_np, b_np), rtol=1e-12)
    assert mv.gradcheck(op, a, b) < 1e-6
    assert mv.gradcheck(op, b, a) < 1e-6          # the broadcast input on the left too


@pytest.mark.parametrize("name", list(BINARY))
def test_binary_ops_non_contiguous(name, device, rng):
    op, reference = BINARY[name]
    a_np = rng.standard_normal((4, 3)).T              # (3, 4), a transposed view
    b_np = rng.standard_normal((4, 3)).T + (3.0 if name == "div" else 0.0)
    assert not a_np.flags.c_contiguous
    a, b = T(a_np, device), T(b_np, device)
    np.testing.assert_allclose(op(a, b).numpy(), reference(a_np, b_np), rtol=1e-12)
    assert mv.gradcheck(op, mv.tensor(a_np, requires_grad=True, device=device),
                        mv.tensor(b_np, requires_grad=True, device=device)) < 1e-6


def test_python_scalars_and_reflected_operators(device, rng):
    x_np = rng.standard_normal((3, 2)) + 3.0
    x = T(x_np, device)
    cases = [
        (lambda x: 2.0 + x, 2.0 + x_np), (lambda x: 2.0 - x, 2.0 - x_np),
        (lambda x: 2.0 * x, 2.0 * x_np), (lambda x: 2.0 / x, 2.0 / x_np),
        (lambda x: x ** 3, x_np ** 3), (lambda x: x ** -0.5, x_np ** -0.5), (lambda x: -x, -x_np),
    ]
    for f, expected in cases:
        np.testing.assert_allclose(f(x).numpy(), expected, rtol=1e-12)
        assert mv.gradcheck(f, x) < 1e-6


def test_elementwise_backward_follows_the_derived_formulas(device, rng):
    """Each rule applied to a random g: da = g, db = -g for a - b; g b and g a for a * b;
    g / b and -g a / b^2 for a / b; g c x^(c-1) for x^c; g y for e^x; g / x for ln x;
    g / (2y) for sqrt x; g (1 - y^2) for tanh x."""
    a_np, b_np = rng.standard_normal((3, 4)) + 3.0, rng.standard_normal((3, 4)) + 3.0
    g = rng.standard_normal((3, 4))
    binary = [(lambda a, b: a + b, g, g), (lambda a, b: a - b, g, -g),
              (lambda a, b: a * b, g * b_np, g * a_np),
              (lambda a, b: a / b, g / b_np, -g * a_np / b_np ** 2)]
    for op, da, db in binary:
        a, b = T(a_np, device), T(b_np, device)
        op(a, b).backward(mv.tensor(g, device=device))
        np.testing.assert_allclose(numpy_grad(a), da, rtol=1e-13)
        np.testing.assert_allclose(numpy_grad(b), db, rtol=1e-13)
    y = {"exp": np.exp(a_np), "sqrt": np.sqrt(a_np), "tanh": np.tanh(a_np)}
    unary = [(lambda x: x ** 2.5, g * 2.5 * a_np ** 1.5), (mv.exp, g * y["exp"]),
             (mv.log, g / a_np), (mv.sqrt, g / (2 * y["sqrt"])),
             (mv.tanh, g * (1 - y["tanh"] ** 2))]
    for op, dx in unary:
        x = T(a_np, device)
        op(x).backward(mv.tensor(g, device=device))
        np.testing.assert_allclose(numpy_grad(x), dx, rtol=1e-13)


UNARY = {
    "exp": (mv.exp, np.exp, 0.0),
    "log": (mv.log, np.log, 3.0),          # shift inputs into the domain
    "sqrt": (mv.sqrt, np.sqrt, 3.0),
    "tanh": (mv.tanh, np.tanh, 0.0),
    "relu": (mv.relu, lambda x: np.maximum(x, 0), 0.0),
    "neg": (mv.neg, np.negative, 0.0),
}


@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("transposed", [False, True])
def test_unary_ops(name, transposed, device, rng):
    op, reference, shift = UNARY[name]
    x_np = rng.standard_normal((4, 5)) + shift
    if name == "relu":
        x_np = np.where(np.abs(x_np) < 0.1, 0.5, x_np)    # stay away from the kink at 0
    x_np = x_np.T if transposed else x_np
    x = T(x_np, device)
    np.testing.assert_allclose(op(x).numpy(), reference(x_np), rtol=1e-12)
    assert mv.gradcheck(op, x) < 1e-6


def test_relu_gradient_at_zero_is_zero(device):
    x = T([-1.0, 0.0, 2.0], device)
    mv.relu(x).sum().backward()
    np.testing.assert_array_equal(numpy_grad(x), [0.0, 0.0, 1.0])


def test_relu_of_minus_infinity_is_zero(device):
    x = T([-np.inf, -1.0, 2.0], device)
    np.testing.assert_array_equal(mv.relu(x).numpy(), [0.0, 0.0, 2.0])


def test_maximum_ties_split_the_gradient(device):
    a, b = T([1.0, 2.0, 3.0], device), T([1.0, 5.0, 0.0], device)
    mv.maximum(a, b).sum().backward()
    np.testing.assert_array_equal(numpy_grad(a), [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(numpy_grad(b), [0.5, 1.0, 0.0])


def test_unbroadcast_sums_copies():
    g = np.ones((2, 3, 4))
    assert unbroadcast(g, (3, 1)).shape == (3, 1)
    np.testing.assert_array_equal(unbroadcast(g, (3, 1)), np.full((3, 1), 8.0))
    np.testing.assert_array_equal(unbroadcast(g, ()), 24.0)
    np.testing.assert_array_equal(unbroadcast(g, (2, 1, 4)), np.full((2, 1, 4), 3.0))


# --- reductions -------------------------------------------------------------------------

REDUCTIONS = {"sum": (mv.sum, np.sum), "mean": (mv.mean, np.mean), "max": (mv.max, np.max)}


@pytest.mark.parametrize("name", list(REDUCTIONS))
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(name, axis, keepdims, device, rng):
    op, reference = REDUCTIONS[name]
    x_np = rng.standard_normal((2, 3, 4))
    x = T(x_np, device)
    f = lambda x: op(x, axis=axis, keepdims=keepdims)   # noqa: E731
    np.testing.assert_allclose(f(x).numpy(), reference(x_np, axis=axis, keepdims=keepdims),
                               rtol=1e-12)
    assert mv.gradcheck(f, x) < 1e-6
    assert mv.gradcheck(f, T(x_np.transpose(2, 0, 1).copy().transpose(1, 2, 0), device)) < 1e-6


def test_reduction_backward_copies_g_back(device, rng):
    """sum: dx = g copied over the summed axis; mean: g / n; max: g at the maximum alone."""
    x_np, g = rng.standard_normal((3, 4)), rng.standard_normal(3)
    copies = np.repeat(g[:, None], 4, axis=1)
    for op, dx in ((mv.sum, copies), (mv.mean, copies / 4),
                   (mv.max, (x_np == x_np.max(1, keepdims=True)) * copies)):
        x = T(x_np, device)
        op(x, axis=1).backward(mv.tensor(g, device=device))
        np.testing.assert_allclose(numpy_grad(x), dx, rtol=1e-13)


def test_max_ties_share_the_gradient_equally(device):
    x = T([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], device)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(numpy_grad(x), [[0, 0.5, 0.5], [0.5, 0, 0.5]])


@pytest.mark.parametrize("shape", [(6,), (2, 3, 5)])
def test_row_and_column_sums(device, rng, shape):
    """row_sum, row_mean and column_sum (BLAS products with a ones vector on the CPU)
    equal NumPy's sums."""
    from minivit.ops.basic import column_sum, row_mean, row_sum
    x_np = rng.standard_normal(shape)
    x = mv.tensor(x_np, device=device).data
    np.testing.assert_allclose(as_numpy(row_sum(x)), x_np.sum(axis=-1), rtol=1e-13)
    np.testing.assert_allclose(as_numpy(row_mean(x)), x_np.mean(axis=-1),
                               rtol=1e-13)
    np.testing.assert_allclose(as_numpy(column_sum(x)),
                               x_np.reshape(-1, shape[-1]).sum(axis=0), rtol=1e-13)


# --- shapes and indexing ----------------------------------------------------------------

def test_reshape_transpose_broadcast_to(device, rng):
    x_np = rng.standard_normal((2, 3, 4))
    x = T(x_np, device)
    cases = [
        (lambda x: x.reshape(4, 6), x_np.reshape(4, 6)),
        (lambda x: x.reshape((3, -1)), x_np.reshape(3, -1)),
        (lambda x: x.transpose(2, 0, 1), x_np.transpose(2, 0, 1)),
        (lambda x: x.permute((1, 2, 0)), x_np.transpose(1, 2, 0)),
        (lambda x: x.T, x_np.T),
        (lambda x: x.swapaxes(-1, -2), x_np.swapaxes(-1, -2)),
        (lambda x: x[:, :1, :].broadcast_to((5, 2, 3, 4)),
         np.broadcast_to(x_np[:, :1, :], (5, 2, 3, 4))),
    ]
    for f, expected in cases:
        np.testing.assert_array_equal(f(x).numpy(), expected)
        assert mv.gradcheck(f, x) < 1e-6


INDICES = [
    (1,), (slice(None, None, 2),), (Ellipsis, 1), (slice(None), [2, 0, 2]),
    (np.array([0, 1, 1, 0]),), (np.array([[0, 1], [1, 1]]), slice(1, 3)),
    (np.array([1, 1, 1]), np.array([2, 2, 0])),
]


@pytest.mark.parametrize("index", INDICES, ids=range(len(INDICES)))
def test_getitem(index, device, rng):
    x_np = rng.standard_normal((2, 3, 4))
    dev_index = tuple(mv.backend.to_device(i, device) if isinstance(i, np.ndarray) else i
                      for i in index)
    x = T(x_np, device)
    f = lambda x: x[dev_index]   # noqa: E731
    np.testing.assert_array_equal(f(x).numpy(), x_np[index])
    assert mv.gradcheck(f, x) < 1e-6


def test_getitem_repeated_indices_accumulate(device):
    x = T([10.0, 20.0, 30.0], device)
    idx = mv.backend.to_device(np.array([0, 2, 0, 0]), device)
    x[idx].sum().backward()
    # x[0] was picked three times, x[1] never: a plain assignment would give [1, 0, 1].
    np.testing.assert_array_equal(numpy_grad(x), [3.0, 0.0, 1.0])


def test_concatenate(device, rng):
    parts = [rng.standard_normal((2, n, 3)) for n in (1, 4, 2)]
    ts = [T(p, device) for p in parts]
    f = lambda a, b, c: mv.concatenate([a, b, c], axis=1)   # noqa: E731
    np.testing.assert_array_equal(f(*ts).numpy(), np.concatenate(parts, axis=1))
    assert mv.gradcheck(f, *ts) < 1e-6
    with pytest.raises(ValueError, match="at least one"):
        mv.concatenate([])


# --- matmul and affine ------------------------------------------------------------------

MATMUL_SHAPES = [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)),
                 ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 5)), ((2, 3, 4), (4,)), ((4,), (4,))]


@pytest.mark.parametrize("a_shape,b_shape", MATMUL_SHAPES)
def test_matmul_batched_and_broadcast(a_shape, b_shape, device, rng):
    a_np, b_np = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    a, b = T(a_np, device), T(b_np, device)
    np.testing.assert_allclose((a @ b).numpy(), np.matmul(a_np, b_np), rtol=1e-12)
    assert mv.gradcheck(lambda a, b: a @ b, a, b) < 1e-6


def test_matmul_backward_follows_the_derived_formula(device, rng):
    """y_ij = sum_k a_ik b_kj, so da = g b^T and db = a^T g; with a batch axis on a alone,
    b's gradient sums over it."""
    a_np, b_np, g = (rng.standard_normal(s) for s in ((2, 3, 4), (4, 5), (2, 3, 5)))
    a, b = T(a_np, device), T(b_np, device)
    (a @ b).backward(mv.tensor(g, device=device))
    np.testing.assert_allclose(numpy_grad(a), g @ b_np.T, rtol=1e-13)
    np.testing.assert_allclose(numpy_grad(b), (a_np.swapaxes(1, 2) @ g).sum(0), rtol=1e-13)


def test_matmul_non_contiguous(device, rng):
    a_np, b_np = rng.standard_normal((5, 3)).T, rng.standard_normal((2, 5, 4)).swapaxes(1, 2)
    a, b = T(a_np, device), T(b_np, device)   # (3, 5) and (2, 4, 5)
    f = lambda a, b: a @ b.swapaxes(-1, -2)   # noqa: E731
    np.testing.assert_allclose(f(a, b).numpy(), a_np @ b_np.swapaxes(1, 2), rtol=1e-12)
    assert mv.gradcheck(f, a, b) < 1e-6


@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3), (3,)])
@pytest.mark.parametrize("biased", [True, False])
def test_affine_equals_matmul_plus_bias(device, rng, x_shape, biased):
    """affine(x, W, b) = x W + b over the last axis; dX = G W^T, dW = X^T G and db = the
    column sums of G, with the leading axes folded into rows X, G."""
    from minivit.ops.basic import affine
    x_np, w_np, b_np = (rng.standard_normal(s) for s in (x_shape, (3, 4), (4,)))
    g = mv.tensor(rng.standard_normal(x_shape[:-1] + (4,)), device=device)
    x, w, b = T(x_np, device), T(w_np, device), T(b_np, device) if biased else None
    y = affine(x, w, b)
    y.backward(g)
    want = x_np @ w_np + (b_np if biased else 0)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-13)
    g2 = g.numpy().reshape(-1, 4)
    np.testing.assert_allclose(numpy_grad(x), (g2 @ w_np.T).reshape(x_shape), rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(w), x_np.reshape(-1, 3).T @ g2, rtol=1e-12)
    if biased:
        np.testing.assert_allclose(numpy_grad(b), g2.sum(axis=0), rtol=1e-12)
    inputs = (x, w) + ((b,) if biased else ())
    assert mv.gradcheck(lambda *a: affine(*a), *inputs) < 1e-6


def test_affine_non_contiguous_input_and_errors(device, rng):
    from minivit.ops.basic import affine
    x = mv.Tensor(mv.tensor(rng.standard_normal((3, 2, 4)), device=device).data.swapaxes(0, 1),
                  requires_grad=True)                               # (2, 3, 4), strided
    w, b = T(rng.standard_normal((4, 5)), device), T(rng.standard_normal(5), device)
    assert mv.gradcheck(affine, x, w, b) < 1e-6
    with pytest.raises(ValueError, match=r"x of shape \(2, 3, 4\) and W of shape \(3, 5\) do "
                                         r"not match"):
        affine(x, T(np.ones((3, 5)), device))
    with pytest.raises(ValueError, match=r"b has shape \(4,\), expected \(5,\)"):
        affine(x, w, T(np.ones(4), device))


# --- errors, dtypes and devices ---------------------------------------------------------

def test_scalar_keeps_float32(device):
    x = mv.tensor(np.ones((2, 2), np.float32), requires_grad=True, device=device)
    y = (2.0 * x + 1.0) / 3.0
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_numpy_scalar_exponent_keeps_float32(device):
    x = mv.tensor(np.full(3, 2.0, np.float32), requires_grad=True, device=device)
    y = x ** np.float64(2.0)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_pow_rejects_a_tensor_exponent(device):
    x = T([1.0, 2.0], device)
    with pytest.raises(TypeError, match="constant exponent"):
        x ** x


def test_reduction_axis_out_of_range(device):
    with pytest.raises(ValueError, match="axis 3 is out of range for an array with 2 dimensions"):
        T(np.ones((2, 2)), device).sum(axis=3)


def test_transpose_rejects_a_non_permutation(device):
    with pytest.raises(ValueError, match="not a permutation"):
        T(np.ones((2, 3)), device).transpose(0, 0)


def test_matmul_shape_error(device):
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(4, 5\) do not match"):
        T(np.ones((2, 3)), device) @ T(np.ones((4, 5)), device)
