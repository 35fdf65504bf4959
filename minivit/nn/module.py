"""Module and Parameter: the bookkeeping that turns functions into models.

A Parameter is a Tensor that a model learns (requires_grad is always on).  A Module
holds Parameters, fixed arrays (buffers) and other Modules as plain attributes, in
the order they were assigned; `named_parameters()` walks them and gives each a stable
dotted name such as "encoder.blocks.3.attn.qkv.weight".  Lists of Modules are
walked too, their items named by index.
"""
from minivit import backend
from minivit.autograd import Tensor


class Parameter(Tensor):
    """A tensor the optimiser updates: requires_grad=True, and found by Module.parameters().

    An optimiser puts its parameters into flat buffers (see ParameterBuffer): then .data
    and .grad are views into one array each, and assigning to them copies into the view
    (same shape, dtype and device) instead of replacing it, so `p.data = values`,
    `p.grad = g` and load_state_dict keep the buffer whole.  An array of another dtype
    or device (Module.to, Module.astype) takes the parameter out of its buffer.  While
    its gradient is unset, the graph walk offers its .grad view as the place a Function's
    backward may write the gradient into (minivit.autograd, "Gradients written in
    place"), so the gradient lands in the buffer without a copy.
    """

    def __init__(self, data, name=None):
        self._buffer = None          # the ParameterBuffer holding .data and .grad, if any
        self._grad_view = None       # this parameter's part of the buffer's gradient
        super().__init__(data, requires_grad=True, name=name)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        if self._buffer is not None:
            if value is self._data:               # p.data -= x: already written in place
                return
            if _fits(value, self._data):
                self._data[...] = value
                return
            self._buffer.release(self)
        self._data = value

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        if self._buffer is None:
            self._grad = value
        elif value is None:                        # no gradient: zero in the buffer
            if self._grad is not None:
                self._grad_view.fill(0)
            self._grad = None
        else:
            if not _fits(value, self._data):
                raise ValueError(f"Parameter.grad: expected an array of shape {self.shape}, "
                                 f"{self.dtype} on {self.device} (the parameter's), got "
                                 f"{tuple(value.shape)}, {value.dtype} on "
                                 f"{backend.device_of(value)}")
            if value is not self._grad_view:
                self._grad_view[...] = value
            self._grad = self._grad_view

    def _accumulate_grad(self, g):
        if self._buffer is None:
            return super()._accumulate_grad(g)
        if self._grad is None:                     # the gradient lands in the buffer
            if g is not self._grad_view:           # (unless backward wrote it there)
                self._grad_view[...] = g
            self._grad = self._grad_view
        else:
            self._grad_view += g

    def _empty_grad_slot(self):
        """In a flat buffer, before any gradient has arrived: the view for .grad there."""
        return self._grad_view if self._buffer is not None and self._grad is None else None


def _fits(value, like):
    return (backend.is_array(value) and tuple(value.shape) == tuple(like.shape)
            and value.dtype == like.dtype and backend.device_of(value) == backend.device_of(like))


class ParameterBuffer:
    """Parameters of one dtype and device, and their gradients, in two flat arrays.

    Each parameter's .data and .grad become views of its stretch of `data` and `grad`,
    so an optimiser updates every parameter with a handful of whole-buffer operations
    and `zero_grad` is one fill, instead of a dozen small operations per parameter
    (on a GPU each one is a kernel launch, 4-10 us of host time).  A parameter whose
    .grad is None has zeros there.  `params` keeps the order given; `offsets[i]` is
    where params[i] starts.  Taking a parameter out (another dtype or device assigned
    to its .data) marks the buffer stale: an optimiser built on it refuses to step.
    """

    def __init__(self, params):
        params = list(params)
        first = params[0].data
        xp = backend.array_module(first)
        for p in params:
            if p.dtype != first.dtype or p.device != backend.device_of(first):
                raise ValueError(f"ParameterBuffer: every parameter must be {first.dtype} on "
                                 f"{backend.device_of(first)}, got {p.dtype} on {p.device}")
        self.params, self.offsets = params, []
        total = sum(p.size for p in params)
        self.data = xp.empty(total, dtype=first.dtype)
        self.grad = xp.zeros(total, dtype=first.dtype)
        offset = 0
        for p in params:
            if p._buffer is not None:
                p._buffer.release(p)
            grad = p.grad
            end = offset + p.size
            self.data[offset:end] = p.data.reshape(-1)
            p._data = self.data[offset:end].reshape(p.shape)
            p._grad_view = self.grad[offset:end].reshape(p.shape)
            p._buffer, p._grad = self, None
            if grad is not None:
                p.grad = grad
            self.offsets.append(offset)
            offset = end
        self.stale = False

    def release(self, p):
        """Take parameter p out: it keeps copies of its values and gradient."""
        p._data = p._data.copy()
        p._grad = None if p._grad is None else p._grad.copy()
        p._buffer = p._grad_view = None
        self.stale = True

    def zero_grad(self):
        self.grad.fill(0)
        for p in self.params:
            p._grad = None


class Module:
    """Base class of every layer and model: call it like a function to run forward()."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # --- walking the tree -----------------------------------------------------------

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) for every parameter, in the order they were assigned."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_parameters(f"{prefix}{name}.{i}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # --- modes and gradients --------------------------------------------------------

    def train(self, mode=True):
        """Training mode (dropout on) for this module and every module inside it."""
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        """Evaluation mode (dropout off)."""
        return self.train(False)

    def zero_grad(self):
        """Every gradient to None (one fill per flat buffer of an optimiser's parameters)."""
        buffers = {}
        for p in self.parameters():
            if p._buffer is not None:
                buffers[id(p._buffer)] = p._buffer
            else:
                p.grad = None
        for buffer in buffers.values():
            buffer.zero_grad()

    # --- devices and saving ---------------------------------------------------------

    def to(self, device):
        """Move every parameter and buffer to `device` ("cpu" or "cuda"), in place."""
        for _, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Tensor):
                    value.data = backend.to_device(value.data, device)
                    value.grad = None
                elif backend.is_array(value):
                    setattr(module, name, backend.to_device(value, device))
        return self

    def astype(self, dtype):
        """Cast every parameter and floating buffer to `dtype`, in place (e.g. "float64" for
        a gradient check of the whole model)."""
        for _, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Tensor):
                    value.data = value.data.astype(dtype)
                    value.grad = None
                elif backend.is_array(value) and backend.is_floating(value):
                    setattr(module, name, value.astype(dtype))
        return self

    def state_dict(self):
        """{dotted name: NumPy array} of every parameter (copies, safe to save)."""
        return {name: backend.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters of the same names; every name and shape must match."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing parameters {missing}, "
                           f"unexpected parameters {unexpected}")
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {p.shape} in the model "
                                 f"but {tuple(value.shape)} in the state")
            p.data = backend.asarray(value, dtype=p.dtype, device=p.device)
