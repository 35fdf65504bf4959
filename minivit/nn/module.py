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
    """A tensor the optimiser updates: requires_grad=True, and found by Module.parameters()."""

    def __init__(self, data, name=None):
        super().__init__(data, requires_grad=True, name=name)


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
        for p in self.parameters():
            p.grad = None

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
