"""Optimisers, learning-rate schedules and gradient clipping.

An optimiser puts its parameters into flat buffers, one per dtype and device
(minivit.nn.module.ParameterBuffer): each parameter's .data and .grad are views into
two long arrays, and its state (moment estimates) is arrays of the same length.  An
update is then a handful of whole-buffer array operations, however many parameter
tensors the model has -- on a GPU, a dozen kernel launches instead of a dozen per
parameter.  The parameters it decays come first in the buffer, so weight decay is
one slice.  State is saved and restored per parameter with state_dict() /
load_state_dict() (plain arrays), so a run can resume exactly.
"""
import math

from minivit import backend
from minivit.nn.module import ParameterBuffer


class Optimizer:
    """Subclasses set their options, then call Optimizer.__init__, and implement
    update(buffer, state) on flat arrays; `slots` names the state arrays."""

    slots = ()

    def __init__(self, params, lr, no_decay=()):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
        self.lr = lr
        self.steps = 0
        self.no_decay = {id(p) for p in no_decay}
        groups = {}
        for p in self.params:                       # one buffer per dtype and device
            groups.setdefault((str(p.dtype), p.device), []).append(p)
        self.buffers, self.state = [], []
        for group in groups.values():
            decayed = [p for p in group if self.decays(p)]
            buffer = ParameterBuffer(decayed + [p for p in group if not self.decays(p)])
            buffer.decayed = sum(p.size for p in decayed)     # data[:decayed] is decayed
            xp = backend.array_module(buffer.data)
            self.buffers.append(buffer)
            self.state.append({slot: xp.zeros_like(buffer.data) for slot in self.slots})

    def decays(self, p):
        """Whether weight decay applies to parameter p (not to those listed in no_decay)."""
        return id(p) not in self.no_decay

    def zero_grad(self):
        for buffer in self.buffers:
            buffer.zero_grad()

    def step(self):
        """One update of every parameter (a parameter whose .grad is None has a zero
        gradient: momentum and weight decay still act on it)."""
        self.steps += 1
        for buffer, state in zip(self.buffers, self.state):
            if buffer.stale:
                raise RuntimeError(f"{type(self).__name__}.step: a parameter was moved to another "
                                   "device or cast to another dtype after the optimiser was "
                                   "created; create the optimiser after model.to(...) / "
                                   "model.astype(...)")
            self.update(buffer, state)

    def update(self, buffer, state):
        raise NotImplementedError

    # --- saving and restoring -------------------------------------------------------

    def _where(self):
        """(buffer index, offset) of each parameter, in self.params order."""
        where = {}
        for b, buffer in enumerate(self.buffers):
            for p, offset in zip(buffer.params, buffer.offsets):
                where[id(p)] = (b, offset)
        return [where[id(p)] for p in self.params]

    def state_dict(self):
        """{"lr", "steps", and for each slot a list of NumPy arrays, one per parameter}."""
        state = {"lr": self.lr, "steps": self.steps}
        for slot in self.slots:
            flat = [backend.to_numpy(s[slot]) for s in self.state]     # one read per buffer
            state[slot] = [flat[b][o:o + p.size].reshape(p.shape).copy()
                           for p, (b, o) in zip(self.params, self._where())]
        return state

    def load_state_dict(self, state):
        self.lr, self.steps = state["lr"], state["steps"]
        np = backend.module_for("cpu")
        for slot in self.slots:
            arrays = state[slot]
            if len(arrays) != len(self.params):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for "
                                 f"{len(arrays)} parameters, optimiser has {len(self.params)}")
            flat = [np.zeros(buffer.data.shape, dtype=buffer.data.dtype) for buffer in self.buffers]
            for a, p, (b, o) in zip(arrays, self.params, self._where()):
                if a is not None:                   # None: a parameter that never had a gradient
                    flat[b][o:o + p.size] = np.asarray(a).reshape(-1)
            for s, host, buffer in zip(self.state, flat, self.buffers):
                s[slot] = backend.asarray(host, device=backend.device_of(buffer.data))


class SGD(Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum and decoupled weight decay:

        b <- momentum * b + g
        w <- w - lr * (b + weight_decay * w)

    on the whole flat buffer at once (b starts at zero, so the first b is g).
    """

    slots = ("buffers",)

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, nesterov=False, no_decay=()):
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        super().__init__(params, lr, no_decay)

    def update(self, buffer, state):
        g = buffer.grad
        if self.momentum:
            b = state["buffers"]
            b *= self.momentum
            b += g
            g = g + self.momentum * b if self.nesterov else b
        n = buffer.decayed
        if self.weight_decay and n:
            g = g.copy() if g is buffer.grad or g is state["buffers"] else g
            g[:n] += self.weight_decay * buffer.data[:n]
        buffer.data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), per parameter tensor:

        m <- b1 m + (1 - b1) g,          v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t),          v_hat = v / (1 - b2^t)
        w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)

    Every line is elementwise, so it holds for the concatenation of all parameters as
    well as for each one: with w, g, m, v the flat buffers (decayed parameters first, n
    entries), the fused update is

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   w[:n] <- w[:n] - lr wd w[:n]
        w <- w - s m / (sqrt(v) + eps_hat),   s = lr sqrt(1 - b2^t) / (1 - b1^t),
                                              eps_hat = eps sqrt(1 - b2^t),

    where m_hat / (sqrt(v_hat) + eps) = m sqrt(1 - b2^t) / ((1 - b1^t)(sqrt(v) + eps_hat)):
    the bias corrections fold into two host scalars.  About a dozen array operations per
    step for the whole model; each element sees the same operations in the same order
    as in a per-tensor loop, so the two give identical results (a test checks it).
    The decay acts on w directly, not through g, so it is not rescaled by sqrt(v_hat).
    Parameters with fewer than two axes (biases, LayerNorm scales, ...) are not decayed
    when decay_matrices_only is set, as is usual for Transformers, and neither are the
    parameters listed in no_decay (for ViT: the [CLS] token and position embeddings,
    which are stored with extra axes but are not weight matrices; see
    VisionTransformer.no_weight_decay()).
    """

    slots = ("m", "v")

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decay_matrices_only=True, no_decay=()):
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.decay_matrices_only = decay_matrices_only
        super().__init__(params, lr, no_decay)

    def decays(self, p):
        return super().decays(p) and (p.ndim >= 2 or not self.decay_matrices_only)

    def update(self, buffer, state):
        xp = backend.array_module(buffer.data)
        w, g, m, v = buffer.data, buffer.grad, state["m"], state["v"]
        m *= self.b1
        m += (1 - self.b1) * g
        v *= self.b2
        v += (1 - self.b2) * (g * g)
        t = self.steps
        step_size = self.lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
        eps_hat = self.eps * math.sqrt(1 - self.b2 ** t)      # eps applied to sqrt(v_hat)
        n = buffer.decayed
        if self.weight_decay and n:
            w[:n] -= (self.lr * self.weight_decay) * w[:n]
        w -= step_size * m / (xp.sqrt(v) + eps_hat)


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    The global norm is sqrt(sum over every parameter of sum(g^2)), summed in float64.
    It is computed, compared and applied on the device: nothing is read back to the
    host, so a GPU never waits here.  Returns the norm before clipping as a 0-d array
    on the gradients' device (float() it to log it or to spot inf or NaN; a non-finite
    norm clips nothing).  Parameters that share one flat buffer are done with one
    reduction over it.
    """
    grads = _flat_grads(params)
    if not grads:
        return backend.asarray(0.0)
    xp = backend.array_module(grads[0])
    total = None
    for g in grads:
        squares = (g * g).sum(dtype="float64")
        total = squares if total is None else total + squares
    total = xp.sqrt(total)
    if max_norm is not None:
        clip = (total > max_norm) & xp.isfinite(total)
        scale = xp.where(clip, max_norm / (total + 1e-6), 1.0)
        for g in grads:
            g *= scale.astype(g.dtype)
    return total


def _flat_grads(params):
    """The gradient arrays of `params`: whole flat buffers where the parameters fill them
    exactly, else one array per parameter that has a gradient."""
    params = list(params)
    buffers = {id(p._buffer): p._buffer for p in params if getattr(p, "_buffer", None)}
    ids = {id(p) for p in params}
    if buffers and all(getattr(p, "_buffer", None) for p in params) and \
            sum(len(b.params) for b in buffers.values()) == len(ids) and \
            all(id(q) in ids for b in buffers.values() for q in b.params):
        return [b.grad for b in buffers.values()]
    return [p.grad for p in params if p.grad is not None]


def warmup_cosine(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """The learning rate at `step` (0-based): linear warm-up from 0 to base_lr over
    warmup_steps, then a half cosine from base_lr down to final_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))
