"""The classification loss of the ViT head, and accuracy.

The head maps the [CLS] representation y = LN(z_L^0) (Eq. 4) to K logits z; training
minimises the cross-entropy between softmax(z) and the label.
"""
from minivit import backend, kernels
from minivit.autograd import Function, Tensor
from minivit.kernels import loss as _loss_cuda
from minivit.ops.activation import log_softmax_array

array_module = backend.array_module


class CrossEntropy(Function):
    """L = -(1/B) sum_b sum_k t_bk log softmax(z_b)_k for logits z (B, K), targets t (B, K).

    t is fixed (a one-hot label, a label-smoothed one, or a soft target) and each row
    sums to 1.  Backward: with p_b = softmax(z_b) and d log p_bk / d z_bj = delta_kj - p_bj,
        dL/dz_bj = -(1/B) sum_k t_bk (delta_kj - p_bj) = (p_bj sum_k t_bk - t_bj) / B
                 = (p_bj - t_bj) / B,
    so dz = g (softmax(z) - t) / B: the predicted distribution minus the target.
    The forward uses the stable log-softmax, z - max - log sum exp(z - max).
    `valid`, a 0-d boolean array or None, turns the loss into NaN where False: targets
    already on the GPU are checked there, without making the host wait for the answer.
    """

    def __init__(self, targets, valid=None):
        self.t, self.valid = targets, valid

    def forward(self, z):
        loss, self.p = cross_entropy_forward(z, self.t, self.valid)
        return loss

    def backward(self, g):
        return cross_entropy_backward(g, self.p, self.t)


def cross_entropy_forward(z, t, valid=None):
    """CrossEntropy's forward on raw arrays: (loss, p = softmax(z))."""
    xp = array_module(z)
    log_p = log_softmax_array(z, axis=-1)
    p = xp.exp(log_p)
    loss = -(t * log_p).sum() / z.shape[0]
    if valid is not None:
        loss = xp.where(valid, loss, xp.nan).astype(loss.dtype)
    return loss, p


def cross_entropy_backward(g, p, t):
    """CrossEntropy's backward on raw arrays: dz = g (p - t) / B."""
    return g * (p - t) / p.shape[0]


def _label_targets(labels, k, label_smoothing, dtype, check=True):
    """(t, valid): the (B, K) targets of integer labels, one-hot then label-smoothed, and
    whether every label is a class index (a 0-d boolean array on the labels' device; None
    with check=False)."""
    xp = array_module(labels)
    t = (labels[:, None] == xp.arange(k)).astype(dtype)          # one-hot; 0 for a bad label
    valid = t.sum() == labels.shape[0] if check else None
    if label_smoothing:
        t = (1 - label_smoothing) * t + label_smoothing / k
    return t, valid


def _forward_reference(z, labels, label_smoothing):
    """The loss of integer labels, NaN if one is out of range."""
    t, valid = _label_targets(labels, z.shape[1], label_smoothing, z.dtype)
    return cross_entropy_forward(z, t, valid)[0]


def _backward_reference(z, labels, label_smoothing, g):
    """dz = g (softmax(z) - t) / B."""
    t = _label_targets(labels, z.shape[1], label_smoothing, z.dtype, check=False)[0]
    return cross_entropy_backward(g, cross_entropy_forward(z, t)[1], t)


# Fast path (GPU): the loss of integer labels as one kernel each way, which builds the
# smoothed target itself and keeps nothing: the backward recomputes softmax(z) from z.
CROSS_ENTROPY_FORWARD = kernels.Kernel("cross_entropy_forward", "loss.cu",
                                       _loss_cuda.forward, _forward_reference,
                                       sample=kernels.leading(0, 1),
                                       example=_loss_cuda.example_forward)
CROSS_ENTROPY_BACKWARD = kernels.Kernel("cross_entropy_backward", "loss.cu",
                                        _loss_cuda.backward, _backward_reference,
                                        sample=kernels.leading(0, 1),
                                        example=_loss_cuda.example_backward)


class LabelCrossEntropy(Function):
    """CrossEntropy of integer labels with label smoothing s, by the two kernels above."""

    def __init__(self, labels, label_smoothing):
        self.labels, self.s = labels, label_smoothing

    def forward(self, z):
        self.z = z
        return CROSS_ENTROPY_FORWARD(z, self.labels, self.s)

    def backward(self, g):
        return CROSS_ENTROPY_BACKWARD(self.z, self.labels, self.s, g)


def _logits_array(name, logits):
    z = logits.data if isinstance(logits, Tensor) else logits
    if not backend.is_array(z) or z.ndim != 2:
        got = f"shape {tuple(z.shape)}" if backend.is_array(z) else type(z).__name__
        raise ValueError(f"{name}: expected logits of shape (B, K) (batch, classes), got {got}")
    return z


def _labels_array(name, labels, z):
    """labels as a raw array on z's device, checked against the logits z: integer class
    indices of shape (B,) or targets of shape (B, K).  Labels given on the host (a list,
    a NumPy array) have their values checked there before they are copied to the device;
    labels already on the GPU only their shape and dtype (reading values back would stall
    the GPU every step: see cross_entropy)."""
    if isinstance(labels, Tensor):
        if labels.requires_grad:
            raise ValueError(f"{name}: labels must not require grad (the loss is not "
                             "differentiated with respect to its targets); pass labels.detach()")
        labels = labels.data
    on_gpu = backend.is_array(labels) and backend.device_of(labels) == "cuda"
    if not on_gpu:
        labels = backend.asarray(labels, device="cpu")
    b, k = z.shape
    if labels.ndim == 1:
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{name}: labels of shape (B,) must be integer class indices, "
                            f"got dtype {labels.dtype}")
        if labels.shape[0] != b:
            raise ValueError(f"{name}: got {labels.shape[0]} labels for a batch of {b} logits "
                             f"(logits shape {tuple(z.shape)})")
        if not on_gpu:
            bad = labels[(labels < 0) | (labels >= k)]
            if bad.size:
                raise ValueError(f"{name}: labels must be class indices in [0, {k}) for "
                                 f"{k} classes, got {int(bad[0])}")
    elif tuple(labels.shape) != (b, k):
        raise ValueError(f"{name}: labels must be class indices of shape ({b},) or targets "
                         f"of shape ({b}, {k}) like the logits, got shape {tuple(labels.shape)}")
    elif not on_gpu and b:
        row_sums = labels.sum(axis=-1)
        worst = abs(row_sums - 1).argmax()
        if abs(row_sums[worst] - 1) > 1e-3:
            raise ValueError("cross_entropy: each row of (B, K) targets must sum to 1 (a "
                             f"probability distribution), got row sums as far off as "
                             f"{float(row_sums[worst]):.6g}")
    return backend.asarray(labels, device=backend.device_of(z))


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean over the batch of -sum_k t_k log softmax(logits)_k.

    logits: a (B, K) tensor.  labels: integer class indices (B,), or targets (B, K)
    whose rows sum to 1 (one-hot or soft), as a raw array, a list or a tensor without
    grad; they are moved to the logits' device.  With label_smoothing s the target is
    t = (1 - s) t + s / K (Szegedy et al. 2016), e.g. s = 0.1.
    Labels on the host are checked there (a clear error for a class index out of range).
    Labels already on the GPU are checked on the GPU: a bad one makes the loss NaN, which
    a training loop's check for non-finite losses catches, and the host never waits.
    """
    z = _logits_array("cross_entropy", logits)
    if isinstance(label_smoothing, bool) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], "
                         f"got {label_smoothing!r}")
    on_gpu = backend.is_array(labels) and backend.device_of(labels) == "cuda"
    labels = _labels_array("cross_entropy", labels, z)
    xp = array_module(z)
    b, k = z.shape
    if labels.ndim == 1 and kernels.usable(z):
        return LabelCrossEntropy(labels, label_smoothing)(logits)
    if labels.ndim == 1:
        t, valid = _label_targets(labels, k, label_smoothing, z.dtype, check=on_gpu)
    else:
        t = labels.astype(z.dtype, copy=False)
        valid = (xp.abs(t.sum(axis=-1) - 1) <= 1e-3).all() if on_gpu else None
        if label_smoothing:
            t = (1 - label_smoothing) * t + label_smoothing / k
    return CrossEntropy(t, valid)(logits)


def correct(logits, labels):
    """How many rows have their largest logit at the label: a 0-d integer array on the
    logits' device (add these up over batches and read the total once).
    labels: class indices (B,) or targets (B, K), whose argmax is then the class."""
    z = _logits_array("correct", logits)
    labels = _labels_array("correct", labels, z)
    if labels.ndim == 2:
        labels = labels.argmax(axis=-1)
    return (z.argmax(axis=-1) == labels).sum()


def accuracy(logits, labels):
    """The fraction of rows whose largest logit is at the label (a Python float, no grad;
    one read from the device: in a training loop, sum `correct` instead)."""
    z = _logits_array("accuracy", logits)
    labels = _labels_array("accuracy", labels, z)
    return int(correct(z, labels)) / z.shape[0]
