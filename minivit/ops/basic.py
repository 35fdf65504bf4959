"""Arithmetic, elementwise functions, reductions, shapes, indexing and matmul.

Notation: y is the output, x (or a, b) the inputs, g = dL/dy the gradient that
arrives from above.  Each backward returns dL/dx by the chain rule,
dL/dx = sum_y dL/dy * dy/dx, which for an elementwise f is simply g * f'(x).

Broadcasting: when a binary op broadcasts an input of shape s to the output's
shape, each input value was copied to several outputs, so its gradient is the
sum over those copies.  `unbroadcast(g, s)` does that sum, for every binary op.
"""
from minivit import backend, fast
from minivit.autograd import Function, Tensor, as_tensor

array_module = backend.array_module


def unbroadcast(g, shape, out=None):
    """Sum g down to `shape`: the gradient of an input that was broadcast to g's shape.

    Broadcasting prepends axes and stretches axes of length 1; both copy values, and
    the gradient of a copied value is the sum over its copies: one sum over all those
    axes.  out: an array of `shape` to write the sum into (then returned), or None.
    """
    shape = tuple(shape)
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, n in enumerate(shape)
                                       if n == 1 and g.shape[extra + i] != 1)
    kept = (1,) * extra + shape                       # the sum's shape with keepdims
    if out is not None:
        g.sum(axis=axes, keepdims=True, out=out.reshape(kept))
        return out
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def row_sum(x, keepdims=False):
    """The sum over the last axis (kept as length 1 with keepdims)."""
    if fast.enabled("blas_sums") and backend.device_of(x) == "cpu":
        s = _row_sum_blas(x)
    else:
        s = x.sum(axis=-1)
    return s[..., None] if keepdims else s


def row_mean(x, keepdims=False):
    """The mean over the last axis (kept as length 1 with keepdims)."""
    return row_sum(x, keepdims) / x.shape[-1]


def column_sum(x, out=None):
    """The sum over every axis but the last (written into `out` if given)."""
    if fast.enabled("blas_sums") and backend.device_of(x) == "cpu":
        s = _column_sum_blas(x, out)
    else:
        s = x.reshape(-1, x.shape[-1]).sum(axis=0, out=out)
    return s if out is None else out


def _row_sum_blas(x):
    """Fast path (CPU): x (1, ..., 1), one BLAS call; NumPy sums short rows one at a time."""
    return x @ array_module(x).ones(x.shape[-1], dtype=x.dtype)


def _column_sum_blas(x, out=None):
    """Fast path (CPU): (1, ..., 1) X with x as a (rows, D) matrix X, one BLAS call."""
    rows = x.reshape(-1, x.shape[-1])
    xp = array_module(x)
    return xp.matmul(xp.ones(rows.shape[0], dtype=x.dtype), rows, out=out)


def _axes(axis, ndim):
    """A reduction's axis argument as a tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array with {ndim} dimensions")
    return tuple(a % ndim for a in axes)


def _expand(g, x_shape, axes):
    """Put back the reduced axes (as length 1) so g broadcasts against the input."""
    kept = [1 if i in axes else n for i, n in enumerate(x_shape)]
    return g.reshape(kept)


# --- arithmetic -----------------------------------------------------------------------

class Add(Function):
    """y = a + b.   dy/da = dy/db = 1, so da = g, db = g (each summed to its shape)."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return (unbroadcast(g, self.shapes[0], self.grad_destination(0)),
                unbroadcast(g, self.shapes[1], self.grad_destination(1)))


class Sub(Function):
    """y = a - b.   da = g, db = -g."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(-g, self.shapes[1])


class Mul(Function):
    """y = a * b.   dy/da = b, dy/db = a, so da = g * b, db = g * a."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return unbroadcast(g * self.b, self.a.shape), unbroadcast(g * self.a, self.b.shape)


class Div(Function):
    """y = a / b.   dy/da = 1/b, dy/db = -a/b^2, so da = g / b, db = -g * a / b^2."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        a, b = self.a, self.b
        return unbroadcast(g / b, a.shape), unbroadcast(-g * a / (b * b), b.shape)


class Neg(Function):
    """y = -x.   dx = -g."""

    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


class Pow(Function):
    """y = x^c for a constant exponent c.   dy/dx = c x^(c-1), so dx = g * c * x^(c-1)."""

    def __init__(self, c):
        self.c = c

    def forward(self, x):
        self.x = x
        return x ** self.c

    def backward(self, g):
        return g * self.c * self.x ** (self.c - 1)


# --- elementwise functions ------------------------------------------------------------

class Exp(Function):
    """y = e^x.   dy/dx = e^x = y, so dx = g * y."""

    def forward(self, x):
        self.y = array_module(x).exp(x)
        return self.y

    def backward(self, g):
        return g * self.y


class Log(Function):
    """y = ln x.   dy/dx = 1/x, so dx = g / x."""

    def forward(self, x):
        self.x = x
        return array_module(x).log(x)

    def backward(self, g):
        return g / self.x


class Sqrt(Function):
    """y = sqrt(x).   dy/dx = 1 / (2 sqrt(x)) = 1 / (2y), so dx = g / (2y)."""

    def forward(self, x):
        self.y = array_module(x).sqrt(x)
        return self.y

    def backward(self, g):
        return g / (2 * self.y)


class Tanh(Function):
    """y = tanh x.   dy/dx = 1 - tanh^2 x = 1 - y^2, so dx = g * (1 - y^2)."""

    def forward(self, x):
        self.y = array_module(x).tanh(x)
        return self.y

    def backward(self, g):
        return g * (1 - self.y * self.y)


class Maximum(Function):
    """y = max(a, b) elementwise.

    The gradient goes to the larger input: da = g * [a > b], db = g * [b > a].
    Ties (a == b), where y has no derivative, split it evenly: each side gets g / 2,
    so da + db = g always (the average of the two one-sided derivatives).
    """

    def forward(self, a, b):
        self.a, self.b = a, b
        return array_module(a).maximum(a, b)

    def backward(self, g):
        a, b = self.a, self.b
        share_a = ((a > b) + 0.5 * (a == b)).astype(g.dtype)
        return unbroadcast(g * share_a, a.shape), unbroadcast(g * (1 - share_a), b.shape)


class ReLU(Function):
    """y = max(x, 0).   dx = g * [x > 0]; at x = 0 the gradient is taken as 0."""

    def forward(self, x):
        self.positive = x > 0
        return array_module(x).where(self.positive, x, 0)

    def backward(self, g):
        return g * self.positive


# --- reductions -----------------------------------------------------------------------

class Sum(Function):
    """y = sum of x over `axis`.   Every summed x_i has dy/dx_i = 1: dx = g copied back
    over the summed axes."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape, self.axes = x.shape, _axes(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        xp = array_module(g)
        return xp.broadcast_to(_expand(g, self.x_shape, self.axes), self.x_shape)


class Mean(Function):
    """y = (1/n) sum of x over `axis` (n values each).   dx = g / n copied back."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape, self.axes = x.shape, _axes(self.axis, x.ndim)
        self.n = 1
        for a in self.axes:
            self.n *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        xp = array_module(g)
        return xp.broadcast_to(_expand(g, self.x_shape, self.axes) / self.n, self.x_shape)


class Max(Function):
    """y = max of x over `axis`.

    Only the maximal entry moves y, so dx = g at the argmax and 0 elsewhere.
    Ties: when k entries share the maximum, each gets g / k (the rule NumPy users
    know from torch.amax); the gradients still add up to g.
    """

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _axes(self.axis, x.ndim)
        y = x.max(axis=self.axes, keepdims=True)
        is_max = (x == y).astype(x.dtype)
        self.share = is_max / is_max.sum(axis=self.axes, keepdims=True)
        return y if self.keepdims else y.reshape([n for i, n in enumerate(x.shape)
                                                  if i not in self.axes])

    def backward(self, g):
        return _expand(g, self.share.shape, self.axes) * self.share


# --- shapes ---------------------------------------------------------------------------

class Reshape(Function):
    """y = x with a new shape (same values, same order).   dx = g reshaped back."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.x_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, g):
        return g.reshape(self.x_shape)


class Transpose(Function):
    """y = x with its axes permuted: y[..i_axes[k]..] = x[..].   The gradient goes back
    through the inverse permutation: dx = g transposed by argsort(axes)."""

    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, x):
        axes = tuple(reversed(range(x.ndim))) if self.axes is None else _axes(self.axes, x.ndim)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {self.axes} are not a permutation of "
                             f"the {x.ndim} axes of an array of shape {x.shape}")
        self.inverse = tuple(sorted(range(x.ndim), key=lambda i: axes[i]))
        return x.transpose(axes)

    def backward(self, g):
        return g.transpose(self.inverse)


class BroadcastTo(Function):
    """y = x broadcast to `shape` (values copied).   dx = g summed over the copies."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.x_shape = x.shape
        return array_module(x).broadcast_to(x, self.shape)

    def backward(self, g):
        return unbroadcast(g, self.x_shape, self.grad_destination(0))


def _is_advanced(index):
    """True when an index contains arrays or lists (NumPy's "advanced" indexing)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(backend.is_array(p) or isinstance(p, (list, Tensor)) for p in parts)


class GetItem(Function):
    """y = x[index] for slices, integers and integer (or boolean) arrays.

    Each y value is one x value, so dx is zero except at the picked positions, where it
    is g.  An integer array can pick one position several times; then the gradients add
    up there: dx = scatter-add of g into zeros (np.add.at), not plain assignment,
    which would keep only the last.  Slices never repeat, so they assign directly.
    """

    def __init__(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        parts = tuple(p.data if isinstance(p, Tensor) else p for p in parts)
        self.index = parts if isinstance(index, tuple) else parts[0]

    def forward(self, x):
        self.x = x
        return x[self.index]

    def backward(self, g):
        xp = array_module(g)
        dx = xp.zeros(self.x.shape, dtype=g.dtype)
        if _is_advanced(self.index):
            backend.scatter_add(dx, self.index, g)
        else:
            dx[self.index] = g
        return dx


class Concatenate(Function):
    """y = [x1, x2, ...] joined along `axis`.   dx_k = the slice of g where x_k landed."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return array_module(xs[0]).concatenate(xs, axis=self.axis)

    def backward(self, g):
        xp = array_module(g)
        bounds, total = [], 0
        for n in self.sizes[:-1]:
            total += n
            bounds.append(total)
        return tuple(xp.split(g, bounds, axis=self.axis))


# --- matrix product -------------------------------------------------------------------

class MatMul(Function):
    """y = a @ b, batched over leading axes that broadcast (as numpy.matmul).

    For matrices, y_ij = sum_k a_ik b_kj, so dL/da_ik = sum_j g_ij b_kj and
    dL/db_kj = sum_i a_ik g_ij:   da = g @ b^T,   db = a^T @ g
    (^T swaps the last two axes).  Batch axes that were broadcast are summed back.
    A 1-D operand is a row (for a) or column (for b) vector whose added axis is dropped.
    """

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul needs arrays with at least 1 dimension, got shapes "
                             f"{a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match: the last "
                             f"axis of a ({a.shape[-1]}) must equal the "
                             f"{'second-to-last' if b.ndim > 1 else 'only'} axis of b")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a = self.a[None, :] if self.a.ndim == 1 else self.a        # (1, k)
        b = self.b[:, None] if self.b.ndim == 1 else self.b        # (k, 1)
        if self.b.ndim == 1:
            g = g[..., None]
        if self.a.ndim == 1:
            g = g[..., None, :]
        da = unbroadcast(g @ b.swapaxes(-1, -2), a.shape).reshape(self.a.shape)
        db = unbroadcast(a.swapaxes(-1, -2) @ g, b.shape).reshape(self.b.shape)
        return da, db


class Affine(Function):
    """Fast path: y = x W + b (a Linear layer) as one node, where the reference is
    matmul(x, W) + b; one product over all tokens, and db as column sums.

    The leading axes are folded into one, so the whole batch of tokens is a single
    (rows, in) @ (in, out) matrix product X W.  With G = dL/dY seen as (rows, out), the
    matmul rule gives dX = G W^T and dW = X^T G, and b was added to every row, so db is
    G summed over the rows: the sum that unbroadcast would take, without a broadcast.
    """

    def forward(self, x, w, b=None):
        self.x_shape, self.w = x.shape, w
        self.x = x.reshape(-1, w.shape[0])                    # (rows, in)
        y = self.x @ w
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[1],))

    def backward(self, g):
        xp = array_module(g)
        g = g.reshape(-1, self.w.shape[1])                    # (rows, out)
        dx = (g @ self.w.T).reshape(self.x_shape)
        # dW and db straight into the parameters' gradient slots when the walk offers them
        slot = self.grad_destination(1)
        dw = xp.matmul(self.x.T, g, out=slot)
        dw = dw if slot is None else slot
        if len(self.inputs) == 2:
            return dx, dw
        return dx, dw, column_sum(g, out=self.grad_destination(2))


# --- devices --------------------------------------------------------------------------

class ToDevice(Function):
    """y = x copied to another device.   dx = g copied back to x's device."""

    def __init__(self, device):
        self.device = backend.device_name(device)

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, g):
        return backend.to_device(g, self.source)


# --- the functions users call ---------------------------------------------------------

def add(a, b): return Add()(a, b)
def sub(a, b): return Sub()(a, b)
def mul(a, b): return Mul()(a, b)
def div(a, b): return Div()(a, b)
def neg(x): return Neg()(x)
def exp(x): return Exp()(x)
def log(x): return Log()(x)
def sqrt(x): return Sqrt()(x)
def tanh(x): return Tanh()(x)
def relu(x): return ReLU()(x)
def maximum(a, b): return Maximum()(a, b)
def matmul(a, b): return MatMul()(a, b)
def sum(x, axis=None, keepdims=False): return Sum(axis, keepdims)(x)   # noqa: A001
def mean(x, axis=None, keepdims=False): return Mean(axis, keepdims)(x)
def max(x, axis=None, keepdims=False): return Max(axis, keepdims)(x)   # noqa: A001
def reshape(x, shape): return Reshape(shape)(x)
def transpose(x, axes=None): return Transpose(axes)(x)
def broadcast_to(x, shape): return BroadcastTo(shape)(x)
def getitem(x, index): return GetItem(index)(x)


def pow(x, c):  # noqa: A001
    if isinstance(c, Tensor) or backend.is_array(c):
        raise TypeError("x ** c takes a constant exponent c (a Python number); for a tensor "
                        "exponent write exp(c * log(x))")
    c = c.item() if hasattr(c, "item") else c      # a NumPy scalar would promote float32
    return Pow(c)(x)


def swapaxes(x, axis1, axis2):
    axes = list(range(as_tensor(x).ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(x, tuple(axes))


def concatenate(xs, axis=0):
    if len(xs) == 0:
        raise ValueError("concatenate needs at least one tensor")
    return Concatenate(axis)(*xs)


def affine(x, w, b=None):
    """x W + b over the last axis of x (b may be None): a Linear layer's computation."""
    x, w = as_tensor(x), as_tensor(w)
    if w.ndim != 2 or x.ndim == 0 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"affine: x of shape {tuple(x.shape)} and W of shape "
                         f"{tuple(w.shape)} do not match: expected x (..., in) and W "
                         f"(in, out)")
    if b is not None and tuple(b.shape) != tuple(w.shape[1:]):
        raise ValueError(f"affine: b has shape {tuple(b.shape)}, expected ({w.shape[1]},) "
                         f"for W of shape {tuple(w.shape)}")
    if fast.enabled("affine"):
        return Affine()(x, w) if b is None else Affine()(x, w, b)
    y = matmul(x, w)
    return y if b is None else y + b
