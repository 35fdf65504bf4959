"""The classification loss of the ViT head, and accuracy.

The head maps the [CLS] representation y = LN(z_L^0) (Eq. 4) to K logits z; training
minimises the cross-entropy between softmax(z) and the label.
"""
from minivit import backend
from minivit.autograd import Function, Tensor
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
    """

    def __init__(self, targets):
        self.t = targets

    def forward(self, z):
        log_p = log_softmax_array(z, axis=-1)
        self.p = array_module(z).exp(log_p)
        return -(self.t * log_p).sum() / z.shape[0]

    def backward(self, g):
        return g * (self.p - self.t) / self.p.shape[0]


def _logits_array(name, logits):
    z = logits.data if isinstance(logits, Tensor) else logits
    if not backend.is_array(z) or z.ndim != 2:
        got = f"shape {tuple(z.shape)}" if backend.is_array(z) else type(z).__name__
        raise ValueError(f"{name}: expected logits of shape (B, K) (batch, classes), got {got}")
    return z


def _labels_array(name, labels, z):
    """labels as a raw array on z's device (moved there if needed), checked against the
    logits z: integer class indices of shape (B,) or targets of shape (B, K)."""
    if isinstance(labels, Tensor):
        if labels.requires_grad:
            raise ValueError(f"{name}: labels must not require grad (the loss is not "
                             "differentiated with respect to its targets); pass labels.detach()")
        labels = labels.data
    labels = backend.asarray(labels, device=backend.device_of(z))
    b, k = z.shape
    if labels.ndim == 1:
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{name}: labels of shape (B,) must be integer class indices, "
                            f"got dtype {labels.dtype}")
        if labels.shape[0] != b:
            raise ValueError(f"{name}: got {labels.shape[0]} labels for a batch of {b} logits "
                             f"(logits shape {tuple(z.shape)})")
    elif tuple(labels.shape) != (b, k):
        raise ValueError(f"{name}: labels must be class indices of shape ({b},) or targets "
                         f"of shape ({b}, {k}) like the logits, got shape {tuple(labels.shape)}")
    return labels


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean over the batch of -sum_k t_k log softmax(logits)_k.

    logits: a (B, K) tensor.  labels: integer class indices (B,), or targets (B, K)
    whose rows sum to 1 (one-hot or soft), as a raw array, a list or a tensor without
    grad; they are moved to the logits' device.  With label_smoothing s the target is
    t = (1 - s) t + s / K (Szegedy et al. 2016), e.g. s = 0.1.
    """
    z = _logits_array("cross_entropy", logits)
    if isinstance(label_smoothing, bool) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], "
                         f"got {label_smoothing!r}")
    labels = _labels_array("cross_entropy", labels, z)
    xp = array_module(z)
    b, k = z.shape
    if labels.ndim == 1:
        if b and (int(labels.min()) < 0 or int(labels.max()) >= k):
            bad = labels[(labels < 0) | (labels >= k)]
            raise ValueError(f"cross_entropy: labels must be class indices in [0, {k}) for "
                             f"{k} classes, got {int(bad[0])}")
        t = xp.zeros_like(z)
        t[xp.arange(b), labels] = 1
    else:
        t = labels.astype(z.dtype, copy=False)
        row_sums = t.sum(axis=-1)
        if b and float(xp.abs(row_sums - 1).max()) > 1e-3:
            raise ValueError("cross_entropy: each row of (B, K) targets must sum to 1 (a "
                             f"probability distribution), got row sums as far off as "
                             f"{float(row_sums[xp.abs(row_sums - 1).argmax()]):.6g}")
    if label_smoothing:
        t = (1 - label_smoothing) * t + label_smoothing / k
    return CrossEntropy(t)(logits)


def accuracy(logits, labels):
    """The fraction of rows whose largest logit is at the label (a Python float, no grad).
    labels: class indices (B,) or targets (B, K), whose argmax is then the class."""
    z = _logits_array("accuracy", logits)
    labels = _labels_array("accuracy", labels, z)
    if labels.ndim == 2:
        labels = labels.argmax(axis=-1)
    return float((z.argmax(axis=-1) == labels).sum()) / z.shape[0]
