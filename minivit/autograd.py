"""Reverse-mode automatic differentiation: Tensor, Function and the graph walk.

A `Tensor` wraps one raw array (numpy.ndarray or cupy.ndarray) together with
its gradient `grad` and the `Function` that made it (`creator`).  A `Function`
computes `forward(*arrays) -> array` on raw arrays and, given dL/dy, returns
dL/dx for each input in `backward(grad_out)`.  Calling a Function on tensors
records the edge output -> function -> inputs, so the tensors form a graph.

`loss.backward()` walks that graph from the loss to the leaves in reverse
topological order (an explicit stack, no recursion, so graphs of any depth
work), applies each Function's backward once, and adds up the gradients of
tensors used more than once (the chain rule sums over every path).  Leaves that
require grad receive `.grad`; afterwards the graph is released so the arrays
each Function saved for backward can be freed.

Gradients written in place.  A parameter that an optimiser keeps in a flat buffer
(minivit.nn.module.ParameterBuffer) has a slot for its gradient there, a view of the
buffer's gradient array.  Before it calls a Function's backward, the walk tells the
Function where each input's gradient may go: `fn.grad_destination(i)` is that input's
empty slot when input i is such a leaf and no gradient has reached it yet in this walk
(nor from an earlier backward), else None.  A backward may write dL/dx_i straight into
it (`xp.matmul(a, b, out=dest)`, `g.sum(axis=0, out=dest)`) and return that very array;
or ignore it and return a new array as always.  The walk notices which, so a gradient
written in place is never copied again, and a second gradient for the same leaf (a
parameter used twice) is added into the slot.  Only whole gradients are written: a
backward that uses its destination fills every element of it.
"""
import contextlib

from minivit import backend


# --- grad mode --------------------------------------------------------------------------

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside `with no_grad():` operations record no graph (for evaluation and updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


# --- Tensor -----------------------------------------------------------------------------

class Tensor:
    """An array that remembers how it was computed, so gradients can flow back to it."""

    __array_priority__ = 1000    # make `ndarray * Tensor` call Tensor.__rmul__

    def __init__(self, data, requires_grad=False, name=None):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(...) takes a raw array; use tensor.detach() to copy a Tensor")
        if not backend.is_array(data):
            raise TypeError(f"Tensor wraps a numpy or cupy array, got {type(data).__name__}; "
                            "use minivit.tensor(data) to convert Python data")
        if requires_grad and not backend.is_floating(data):
            raise TypeError(f"requires_grad=True needs a floating-point tensor (float32 or "
                            f"float64), got {data.dtype}: only real numbers have gradients; "
                            f"convert first, e.g. mv.tensor(x, dtype='float64', "
                            f"requires_grad=True)")
        self.data = data
        self.grad = None
        self.creator = None          # the Function that produced this tensor, if any
        self.requires_grad = bool(requires_grad)
        self.retains_grad = False    # keep .grad on a non-leaf tensor too
        self.name = name
        self._graph_freed = False    # set once backward() has released the creator

    # array facts
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    T = property(lambda self: self.transpose())

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        body = repr(backend.to_numpy(self.data)).replace("array(", "").rstrip(")")
        return f"tensor({body}{grad}, device='{self.device}')"

    def item(self):
        return self.data.item()

    def numpy(self):
        """The values as a NumPy array (copied from the GPU if needed), outside the graph."""
        return backend.to_numpy(self.data)

    def detach(self):
        """The same values in a new tensor that is cut from the graph."""
        return Tensor(self.data)

    def _accumulate_grad(self, g):
        """grad += g, the first time as a copy (never alias an array of the graph)."""
        self.grad = g.copy() if self.grad is None else self.grad + g

    def _empty_grad_slot(self):
        """The array this tensor's next gradient may be written into directly, or None
        (a plain tensor has none; a Parameter in a flat buffer has its view there)."""
        return None

    def retain_grad(self):
        """Ask backward() to store .grad on this intermediate tensor as well."""
        self.retains_grad = True
        return self

    @property
    def is_leaf(self):
        return self.creator is None

    # --- backward -----------------------------------------------------------------------

    def backward(self, grad=None, retain_graph=False):
        """Compute d(self)/d(leaf) for every leaf that requires grad; add it to leaf.grad.

        `grad` is dL/d(self); it may be omitted when self holds a single value (then it
        is 1).  With retain_graph=False (the default) the graph is released afterwards.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of "
                               "the computation had requires_grad=True (or it ran under no_grad)")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-value tensor, "
                                   f"got shape {self.shape}; pass grad= of that shape")
            grad = backend.array_module(self.data).ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != tuple(self.shape):
                raise ValueError(f"backward(grad): grad has shape {tuple(grad.shape)}, "
                                 f"expected the tensor's shape {self.shape}")
            if grad.dtype != self.dtype or backend.device_of(grad) != self.device:
                raise ValueError(f"backward(grad): grad is {grad.dtype} on "
                                 f"{backend.device_of(grad)}, expected the tensor's {self.dtype} "
                                 f"on {self.device}")
        backward_walk(self, grad, retain_graph)

    # --- moving between devices ---------------------------------------------------------

    def to(self, device):
        """This tensor on `device` ("cpu" or "cuda"); differentiable, and a no-op if already there."""
        if backend.device_name(device) == self.device:
            return self
        from minivit.ops.basic import ToDevice
        return ToDevice(device)(self)

    # --- Python operators and methods (defined in minivit.ops.basic) --------------------

    def __add__(self, other): return _ops.add(self, other)
    def __radd__(self, other): return _ops.add(other, self)
    def __sub__(self, other): return _ops.sub(self, other)
    def __rsub__(self, other): return _ops.sub(other, self)
    def __mul__(self, other): return _ops.mul(self, other)
    def __rmul__(self, other): return _ops.mul(other, self)
    def __truediv__(self, other): return _ops.div(self, other)
    def __rtruediv__(self, other): return _ops.div(other, self)
    def __neg__(self): return _ops.neg(self)
    def __pow__(self, exponent): return _ops.pow(self, exponent)
    def __matmul__(self, other): return _ops.matmul(self, other)
    def __rmatmul__(self, other): return _ops.matmul(other, self)
    def __getitem__(self, index): return _ops.getitem(self, index)

    def exp(self): return _ops.exp(self)
    def log(self): return _ops.log(self)
    def sqrt(self): return _ops.sqrt(self)
    def tanh(self): return _ops.tanh(self)
    def relu(self): return _ops.relu(self)
    def sum(self, axis=None, keepdims=False): return _ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _ops.max(self, axis, keepdims)
    def broadcast_to(self, shape): return _ops.broadcast_to(self, shape)

    def reshape(self, *shape):
        return _ops.reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int)
                            else shape)

    def transpose(self, *axes):
        return _ops.transpose(self, axes[0] if len(axes) == 1 and not isinstance(axes[0], int)
                              else (axes or None))

    permute = transpose

    def swapaxes(self, axis1, axis2): return _ops.swapaxes(self, axis1, axis2)


def tensor(data, dtype=None, requires_grad=False, device=None, name=None):
    """Make a Tensor from an array, a Python number or a nested list.

    The values are placed on `device` ("cpu" or "cuda"), by default on the default
    backend's device (see minivit.backend).  `dtype` defaults to the data's own.
    """
    if isinstance(data, Tensor):
        data = data.data
    return Tensor(backend.asarray(data, dtype=dtype, device=device),
                  requires_grad=requires_grad, name=name)


def as_tensor(x, like=None):
    """x as a Tensor: tensors pass through, arrays are wrapped, Python numbers become arrays
    of `like`'s floating dtype on `like`'s device."""
    if isinstance(x, Tensor):
        return x
    if backend.is_array(x):
        return Tensor(x)
    if like is not None:
        dtype = like.dtype if backend.is_floating(like) else None
        return Tensor(backend.asarray(x, dtype=dtype, device=backend.device_of(like)))
    return tensor(x)


# --- Function ---------------------------------------------------------------------------

class Function:
    """One differentiable operation: y = f(x1, ..., xn) on raw arrays.

    Subclasses implement forward(*arrays) -> array, saving on `self` what backward
    needs, and backward(gy) -> dL/dx for each input (a tuple, or one array for a single
    input; None for an input that takes no gradient).  Options (axes, shapes, ...) go to
    __init__, so one Function object is one node of the graph.
    """

    def __call__(self, *inputs):
        first = next((x.data if isinstance(x, Tensor) else x
                      for x in inputs if isinstance(x, Tensor) or backend.is_array(x)), None)
        inputs = tuple(as_tensor(x, like=first) for x in inputs)
        arrays = [x.data for x in inputs]
        backend.check_same_device(type(self).__name__, arrays)
        y = self.forward(*arrays)
        if not backend.is_array(y):     # NumPy turns 0-d results into scalars: make arrays again
            y = backend.array_module(arrays[0]).asarray(y)
        out = Tensor(y)
        if _grad_enabled and any(x.requires_grad for x in inputs):
            out.requires_grad = True
            out.creator = self
            self.inputs = inputs
        return out

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, grad_out):
        raise NotImplementedError

    grad_destinations = ()     # set by the graph walk just before backward()

    def grad_destination(self, i):
        """The array that input i's gradient may be written into (then return that array
        from backward), or None: see "Gradients written in place" above."""
        return self.grad_destinations[i] if i < len(self.grad_destinations) else None


# --- the graph walk ---------------------------------------------------------------------

def _topological_order(root):
    """Tensors reachable from `root` through creators, each after everything it feeds.

    An iterative depth-first search: a tensor is emitted once all of its inputs have been,
    so the reversed list visits every tensor before the tensors it was computed from.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, inputs_done = stack.pop()
        if inputs_done:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        if t.creator is not None:
            for x in t.creator.inputs:
                if x.requires_grad and id(x) not in visited:
                    stack.append((x, False))
    return order


def _accumulate(grads, t, g, in_place=()):
    """grads[t] += g; in place when grads[t] is t's own gradient slot (in `in_place`)."""
    key = id(t)
    if key not in grads:
        grads[key] = g
    elif key in in_place:
        grads[key] += g
    else:
        grads[key] = grads[key] + g


def _destinations(inputs, grads):
    """For each input: its empty gradient slot if it is a leaf that no gradient has
    reached yet (and it appears once among the inputs), else None."""
    ids = [id(x) for x in inputs]
    return tuple(None if x.creator is not None or not x.requires_grad or id(x) in grads
                 or ids.count(id(x)) > 1 else x._empty_grad_slot() for x in inputs)


def backward_walk(root, grad, retain_graph=False):
    """Backpropagate `grad` = dL/d(root) through the graph behind `root`."""
    grads = {id(root): grad}
    written = set()          # leaves whose gradient so far sits in their own slot
    for t in reversed(_topological_order(root)):
        g = grads.pop(id(t), None)
        if g is None:
            continue
        fn = t.creator
        if fn is None:
            if t._graph_freed:
                raise RuntimeError("backward() through a graph that an earlier backward() "
                                   "already released; pass retain_graph=True to the first "
                                   "backward() to go through the graph twice")
            t._accumulate_grad(g)
            continue
        if t.retains_grad:
            t.grad = g.copy() if t.grad is None else t.grad + g
        fn.grad_destinations = _destinations(fn.inputs, grads)
        input_grads = fn.backward(g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        for x, gx, slot in zip(fn.inputs, input_grads, fn.grad_destinations or
                               (None,) * len(fn.inputs)):
            if gx is None or not x.requires_grad:
                continue
            if tuple(gx.shape) != tuple(x.shape):
                raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape "
                                   f"{tuple(gx.shape)} for an input of shape {x.shape}")
            if gx.dtype != x.dtype:
                raise RuntimeError(f"{type(fn).__name__}.backward returned a {gx.dtype} gradient "
                                   f"for a {x.dtype} input (a gradient keeps its input's dtype)")
            _accumulate(grads, x, gx, written)
            if slot is not None and gx is slot:
                written.add(id(x))
        fn.grad_destinations = ()
        if not retain_graph:       # release the graph: the Function and what it saved
            t.creator = None
            t._graph_freed = True


from minivit.ops import basic as _ops  # noqa: E402  (operators above call into it)
