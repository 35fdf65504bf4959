"""Optimisers, learning-rate schedules and gradient clipping.

Each optimiser's `update` is the textbook rule for one parameter tensor: the reference.
An optimiser also puts its parameters into flat buffers, one per dtype and device
(minivit.nn.module.ParameterBuffer): each parameter's .data and .grad are views into
two long arrays, and its state (moment estimates) is arrays of the same length.  Every
rule is elementwise, so it holds for the whole buffer as for each tensor: the fast path
`update_flat` is a handful of whole-buffer operations however many tensors the model
has (on a GPU, a dozen kernel launches instead of a dozen per parameter).  The
parameters it decays come first in the buffer, so weight decay is one slice.  State is
saved and restored per parameter with state_dict() / load_state_dict() (plain arrays),
so a run can resume exactly.

On a GPU (float32 CUDA buffers) each whole-buffer update is one hand-written CUDA kernel
(minivit/kernels/optim.cu) in place on the parameters and their state, with the bias
corrections passed as host numbers: one launch per step instead of a dozen.  Gradient
clipping can ride along: `optimizer.clip_grad_norm(max_norm)` computes the global norm
now (one reduction kernel) and leaves the clip factor on the device for the next step(),
which scales each gradient as it reads it; nothing is read back to the host.
"""
import math

from minivit import backend, fast, kernels
from minivit.kernels import optim as _optim_cuda
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
        self.grad_scale = None      # the clip factor for the next step (clip_grad_norm)
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

    def clip_grad_norm(self, max_norm):
        """Clip the gradients as clip_grad_norm(self.params, max_norm) does, inside the
        next step(): the global norm is computed now and returned (a 0-d array on the
        device, nothing read back); step() multiplies every gradient by the clip factor
        as it reads it (on a GPU inside its one update kernel), so p.grad itself keeps
        the unclipped values.  max_norm None: the norm only, nothing is clipped."""
        grads = _flat_grads(self.params)          # the same sums as clip_grad_norm's
        limit = math.inf if max_norm is None else max_norm
        if len(grads) == 1 and kernels.usable(grads[0]):
            norm, scale = GRAD_NORM_KERNEL(grads[0], limit)
        else:
            norm, scale = global_norm_and_clip_factor(grads, limit)
        self.grad_scale = None if max_norm is None else scale
        return norm

    def step(self):
        """One update of every parameter (a parameter whose .grad is None has a zero
        gradient: momentum and weight decay still act on it)."""
        self.steps += 1
        scale, self.grad_scale = self.grad_scale, None
        for buffer, state in zip(self.buffers, self.state):
            if buffer.stale:
                raise RuntimeError(f"{type(self).__name__}.step: a parameter was moved to another "
                                   "device or cast to another dtype after the optimiser was "
                                   "created; create the optimiser after model.to(...) / "
                                   "model.astype(...)")
            s = scale
            if s is not None and (s.dtype != buffer.grad.dtype or
                                  backend.device_of(s) != backend.device_of(buffer.grad)):
                s = backend.to_device(s.astype(buffer.grad.dtype), backend.device_of(buffer.grad))
            if fast.enabled("flat_optimizer"):
                self.update_flat(buffer, state, s)
                continue
            for p, offset in zip(buffer.params, buffer.offsets):     # one tensor at a time
                part = slice(offset, offset + p.size)
                g = buffer.grad[part].reshape(p.shape)
                self.update(buffer.data[part].reshape(p.shape),
                            g if s is None else g * s.reshape(()),
                            {slot: a[part].reshape(p.shape) for slot, a in state.items()},
                            offset < buffer.decayed)

    def update(self, w, g, state, decays):
        """The reference: one step of parameter tensor w (in place) with gradient g and
        state arrays `state` (views, updated in place); `decays`: weight decay applies."""
        raise NotImplementedError

    def update_flat(self, buffer, state, scale=None):
        """Fast path: the same step on a whole flat buffer (decayed parameters first), with
        every gradient multiplied by `scale` (a one-element array) if given."""
        raise NotImplementedError

    def scale_for(self, buffer, scale):
        """The clip factor as the update kernel takes it: an array of one float32."""
        if scale is not None:
            return scale
        if getattr(buffer, "ones", None) is None:
            buffer.ones = backend.array_module(buffer.grad).ones(1, dtype=buffer.grad.dtype)
        return buffer.ones

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

        b <- momentum * b + g                       (b starts at zero, so the first b is g)
        w <- w - lr * (b + weight_decay * w)

    (Nesterov momentum steps along g + momentum * b instead of b.)
    """

    slots = ("buffers",)

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, nesterov=False, no_decay=()):
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        super().__init__(params, lr, no_decay)

    def update(self, w, g, state, decays):
        if self.momentum:
            b = state["buffers"]
            b[...] = self.momentum * b + g
            g = g + self.momentum * b if self.nesterov else b
        if decays and self.weight_decay:
            g = g + self.weight_decay * w
        w -= self.lr * g

    def update_flat(self, buffer, state, scale=None):
        args = (buffer.data, buffer.grad, state["buffers"], scale, self.lr, self.momentum,
                self.nesterov, self.weight_decay, buffer.decayed)
        if kernels.usable(buffer.data):
            SGD_KERNEL(*args[:3], self.scale_for(buffer, scale), *args[4:])
        else:
            sgd_flat(*args)


def sgd_flat(w, g, b, scale, lr, momentum, nesterov, weight_decay, decayed):
    """SGD on whole flat buffers, in place on w and b (elements [0, decayed) are decayed);
    g is multiplied by `scale` first if given.  Returns (w, b)."""
    if scale is not None:
        g = g * scale
    if momentum:
        b *= momentum
        b += g
        g = g + momentum * b if nesterov else b
    n = decayed
    if weight_decay and n:
        w[:n] -= lr * (g[:n] + weight_decay * w[:n])
        w[n:] -= lr * g[n:]
    else:
        w -= lr * g
    return w, b


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), per parameter tensor,
    at step t = 1, 2, ...:

        m <- b1 m + (1 - b1) g,          v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t),          v_hat = v / (1 - b2^t)
        w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)

    The decay acts on w directly, not through g, so it is not rescaled by sqrt(v_hat).
    Parameters with fewer than two axes (biases, LayerNorm scales, ...) are not decayed
    when decay_matrices_only is set, as is usual for Transformers, and neither are the
    parameters listed in no_decay (for ViT: the [CLS] token and position embeddings,
    which are stored with extra axes but are not weight matrices; see
    VisionTransformer.no_weight_decay()).

    The whole-buffer update folds the two bias corrections into host scalars:
    m_hat / (sqrt(v_hat) + eps) = s m / (sqrt(v) + eps_hat) with
    s = sqrt(1 - b2^t) / (1 - b1^t) and eps_hat = eps sqrt(1 - b2^t).
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

    def update(self, w, g, state, decays):
        xp = backend.array_module(w)
        b1, b2, t = self.b1, self.b2, self.steps
        m, v = state["m"], state["v"]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        w -= self.lr * (m_hat / (xp.sqrt(v_hat) + self.eps)
                        + (self.weight_decay * w if decays else 0))

    def update_flat(self, buffer, state, scale=None):
        t = self.steps
        step_size = self.lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
        eps_hat = self.eps * math.sqrt(1 - self.b2 ** t)
        args = (buffer.data, buffer.grad, state["m"], state["v"], scale, self.b1, self.b2,
                step_size, eps_hat, self.lr * self.weight_decay, buffer.decayed)
        if kernels.usable(buffer.data):
            ADAMW_KERNEL(*args[:4], self.scale_for(buffer, scale), *args[5:])
        else:
            adamw_flat(*args)


def adamw_flat(w, g, m, v, scale, b1, b2, step_size, eps_hat, lr_wd, decayed):
    """AdamW on whole flat buffers, in place on w, m and v, the bias corrections folded
    into step_size and eps_hat; elements [0, decayed) lose lr_wd * w first; g is
    multiplied by `scale` first if given.  Returns (w, m, v)."""
    xp = backend.array_module(w)
    if scale is not None:
        g = g * scale
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    if lr_wd and decayed:
        w[:decayed] -= lr_wd * w[:decayed]
    w -= step_size * m / (xp.sqrt(v) + eps_hat)
    return w, m, v


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
    total, scale = global_norm_and_clip_factor(grads, math.inf if max_norm is None else max_norm)
    if max_norm is not None:
        for g in grads:
            g *= scale.astype(g.dtype, copy=False)
    return total


def global_norm_and_clip_factor(grads, max_norm):
    """(sqrt(sum of g^2 over every array), summed in float64, as a 0-d array; the clip
    factor max_norm / (norm + 1e-6) where the norm exceeds max_norm and is finite, else
    1, as an array of one value of the gradients' dtype), both on the device."""
    xp = backend.array_module(grads[0])
    total = None
    for g in grads:
        squares = (g * g).sum(dtype="float64")
        total = squares if total is None else total + squares
    total = xp.sqrt(total)
    clip = (total > max_norm) & xp.isfinite(total)
    scale = xp.where(clip, max_norm / (total + 1e-6), 1.0).astype(grads[0].dtype).reshape(1)
    return total, scale


def _flat_grads(params):
    """The gradient arrays of `params`: the whole flat buffers when `params` are exactly
    the parameters they hold (the fast path), else one array per parameter."""
    params = {id(p): p for p in params}
    buffers = {id(b): b for b in (getattr(p, "_buffer", None) for p in params.values())
               if b is not None}
    if fast.enabled("flat_optimizer") and buffers and \
            sorted(id(q) for b in buffers.values() for q in b.params) == sorted(params):
        return [b.grad for b in buffers.values()]
    return [p.grad for p in params.values() if p.grad is not None]


# Fast paths (GPU): each whole-buffer update as one CUDA kernel, in place; the global norm
# as one reduction kernel that also leaves the clip factor on the device.
ADAMW_KERNEL = kernels.Kernel("adamw_update", "optim.cu", _optim_cuda.adamw, adamw_flat,
                              sample=kernels.leading(0, 1, 2, 3, n=4096),
                              example=_optim_cuda.example_adamw)
SGD_KERNEL = kernels.Kernel("sgd_update", "optim.cu", _optim_cuda.sgd, sgd_flat,
                            sample=kernels.leading(0, 1, 2, n=4096),
                            example=_optim_cuda.example_sgd)
GRAD_NORM_KERNEL = kernels.Kernel(
    "grad_norm", "optim.cu", _optim_cuda.grad_norm,
    lambda g, max_norm: global_norm_and_clip_factor([g], max_norm), rtol=1e-5, atol=1e-7,
    example=_optim_cuda.example_grad_norm)


def warmup_cosine(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """The learning rate at `step` (0-based): linear warm-up from 0 to base_lr over
    warmup_steps, then a half cosine from base_lr down to final_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))
