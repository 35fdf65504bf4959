"""Optimisers, learning-rate schedules and gradient clipping.

Each optimiser updates the raw arrays of its parameters in place from their .grad,
as batched array arithmetic over one parameter at a time (a handful of arrays, not
items of a batch).  Their state (step count, moment estimates) is plain arrays, saved
and restored with state_dict() / load_state_dict(), so a run can resume exactly.
"""
import math

from minivit import backend


class Optimizer:
    def __init__(self, params, lr, no_decay=()):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
        self.lr = lr
        self.steps = 0
        self.no_decay = {id(p) for p in no_decay}

    def decays(self, p):
        """Whether weight decay applies to parameter p (not to those listed in no_decay)."""
        return id(p) not in self.no_decay

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        """One update of every parameter that has a gradient."""
        self.steps += 1
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.update(i, p)

    def update(self, i, p):
        raise NotImplementedError

    # --- saving and restoring -------------------------------------------------------

    def _slots(self):
        """Names of the per-parameter state lists (e.g. "m", "v")."""
        return ()

    def state_dict(self):
        """{"lr", "steps", and for each slot a list of NumPy arrays or None}."""
        state = {"lr": self.lr, "steps": self.steps}
        for slot in self._slots():
            state[slot] = [None if a is None else backend.to_numpy(a).copy()
                           for a in getattr(self, slot)]
        return state

    def load_state_dict(self, state):
        self.lr, self.steps = state["lr"], state["steps"]
        for slot in self._slots():
            arrays = state[slot]
            if len(arrays) != len(self.params):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for "
                                 f"{len(arrays)} parameters, optimiser has {len(self.params)}")
            setattr(self, slot, [None if a is None else
                                 backend.asarray(a, dtype=p.dtype, device=p.device)
                                 for a, p in zip(arrays, self.params)])


class SGD(Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum and decoupled weight decay:

        b <- momentum * b + g
        w <- w - lr * (b + weight_decay * w)
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, nesterov=False, no_decay=()):
        super().__init__(params, lr, no_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buffers = [None] * len(self.params)

    def _slots(self):
        return ("buffers",)

    def update(self, i, p):
        g = p.grad
        if self.momentum:
            b = self.buffers[i]
            if b is None:
                b = self.buffers[i] = g.copy()
            else:
                b *= self.momentum
                b += g
            g = g + self.momentum * b if self.nesterov else b
        if self.weight_decay and self.decays(p):
            g = g + self.weight_decay * p.data
        p.data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019):

        m <- b1 m + (1 - b1) g,          v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t),          v_hat = v / (1 - b2^t)
        w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)

    The decay acts on w directly, not through g, so it is not rescaled by sqrt(v_hat).
    Parameters with fewer than two axes (biases, LayerNorm scales, ...) are not decayed
    when decay_matrices_only is set, as is usual for Transformers, and neither are the
    parameters listed in no_decay (for ViT: the [CLS] token and position embeddings,
    which are stored with extra axes but are not weight matrices; see
    VisionTransformer.no_weight_decay()).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decay_matrices_only=True, no_decay=()):
        super().__init__(params, lr, no_decay)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.decay_matrices_only = decay_matrices_only
        self.m = [None] * len(self.params)
        self.v = [None] * len(self.params)

    def decays(self, p):
        return super().decays(p) and (p.ndim >= 2 or not self.decay_matrices_only)

    def _slots(self):
        return ("m", "v")

    def update(self, i, p):
        xp = backend.array_module(p.data)
        g = p.grad
        if self.m[i] is None:
            self.m[i], self.v[i] = xp.zeros_like(p.data), xp.zeros_like(p.data)
        m, v = self.m[i], self.v[i]
        m *= self.b1
        m += (1 - self.b1) * g
        v *= self.b2
        v += (1 - self.b2) * (g * g)
        t = self.steps
        step_size = self.lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
        eps_hat = self.eps * math.sqrt(1 - self.b2 ** t)      # eps applied to sqrt(v_hat)
        if self.weight_decay and self.decays(p):
            p.data -= (self.lr * self.weight_decay) * p.data
        p.data -= step_size * m / (xp.sqrt(v) + eps_hat)


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    The global norm is sqrt(sum over every parameter of sum(g^2)); returns it (before
    clipping) as a Python float, so a training loop can log it and spot inf or NaN.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # the squares are summed on the device, in float64, and read back once
    total = math.sqrt(float(sum((g * g).sum(dtype="float64") for g in grads)))
    if max_norm is not None and total > max_norm and math.isfinite(total):
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= scale
    return total


def warmup_cosine(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """The learning rate at `step` (0-based): linear warm-up from 0 to base_lr over
    warmup_steps, then a half cosine from base_lr down to final_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))
