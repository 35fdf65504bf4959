"""Cross-entropy of the classification head, and accuracy.

The derivation has one home: the docstring of CrossEntropy in minivit/ops/loss.py.  For
logits z (B, K) and targets t whose rows sum to 1, L = -(1/B) sum_b sum_k t_bk log p_bk
with p_b = softmax(z_b); these tests check, in order:

1. The loss is that sum, written with loops, and -mean log p of the true class for
   integer labels (test_cross_entropy_matches_the_definition).
2. Label smoothing s uses t = (1 - s) onehot + s/K, which is (1 - s) CE + s mean_k(-log p),
   and s = 0 is plain cross-entropy (test_label_smoothing_value_and_s_0).
3. One-hot targets give the integer labels' loss, and soft targets their own
   (test_soft_targets_and_one_hot_targets).
4. The gradient is dL/dz = (softmax(z) - t) / B, with and without smoothing
   (test_gradient_is_softmax_minus_target_over_batch): dL/d log p = -t / B, and
   log-softmax's backward makes it -t / B + p sum_k t_k / B = (p - t) / B
   (test_gradient_goes_through_log_softmax_as_the_derivation_does); the same as autograd finds
   through -(t * log_softmax(z)).sum() / B (test_backward_matches_autograd_of_the_composition).
5. Float64 gradient checks pass for labels, soft targets and a strided input
   (test_cross_entropy_gradcheck), and catch a gradient without the "- t"
   (test_gradcheck_catches_a_gradient_without_the_target).
6. The stable log-softmax keeps logits of 1000 and 5000 finite
   (test_cross_entropy_is_stable_for_huge_logits).
7. accuracy is the fraction of rows whose largest logit is at the label
   (test_accuracy); correct counts them on the logits' device
   (test_correct_counts_on_the_device).
8. On CuPy, float32 logits with integer labels run as CUDA kernels
   (minivit/kernels/loss.cu) that build the smoothed target themselves.  On the stand-in
   (a kernel runs its reference there) the kernel path gives the reference path's loss
   and gradient (test_loss_kernel_path_equals_the_reference_path), one launch each way
   with no read back (test_loss_kernel_path_is_one_launch_each_way), a NaN loss for a
   label out of range (test_loss_kernel_path_makes_a_bad_label_nan), and with
   MINIVIT_KERNELS=0 the reference runs (test_minivit_kernels_0_runs_the_loss_reference).
   On a real GPU the kernels equal their references for 10, 100 and 1000 classes
   (test_loss_kernels_equal_their_references_on_a_gpu).

Then the forms labels may take, float32, the errors, and labels on the GPU checked
there without a read back to the host.
"""
import math

import numpy as np
import pytest

import minivit as mv
from minivit import backend, kernels
from minivit.kernels import loss as loss_cuda
from minivit.ops import loss as loss_module
from minivit.ops.loss import CrossEntropy, accuracy, cross_entropy

from conftest import STANDIN, numpy_grad, require_cupy
from reference import softmax


def _t(a, device, requires_grad=True):
    return mv.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad,
                     device=device)


def _ce_loops(z, labels, s=0.0):
    """-(1/B) sum_b sum_k t_bk log softmax(z_b)_k, one row and one class at a time."""
    b, k = z.shape
    total = 0.0
    for i in range(b):
        log_norm = math.log(sum(math.exp(v) for v in z[i]))
        for c in range(k):
            target = (1 - s) * (c == labels[i]) + s / k
            total -= target * (z[i, c] - log_norm)
    return total / b


# --- the loss ---------------------------------------------------------------------------

def test_cross_entropy_matches_the_definition(device, rng):
    z, labels = rng.standard_normal((5, 7)), np.array([0, 6, 3, 3, 1])
    loss = cross_entropy(_t(z, device), labels)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), _ce_loops(z, labels), rtol=1e-14)
    # the same thing written as -mean of the log-probability of the true class
    log_p = np.log(softmax(z))
    np.testing.assert_allclose(loss.item(), -log_p[np.arange(5), labels].mean(), rtol=1e-14)


def test_label_smoothing_value_and_s_0(device, rng):
    z, labels = rng.standard_normal((4, 10)), np.array([2, 9, 0, 5])
    s = 0.1
    smoothed = cross_entropy(_t(z, device), labels, label_smoothing=s).item()
    np.testing.assert_allclose(smoothed, _ce_loops(z, labels, s), rtol=1e-14)
    # the same value from the closed form (1 - s) CE + s * mean over classes of -log p
    log_p = np.log(softmax(z))
    closed = (1 - s) * -log_p[np.arange(4), labels].mean() - s * log_p.mean(-1).mean()
    np.testing.assert_allclose(smoothed, closed, rtol=1e-14)
    plain = cross_entropy(_t(z, device), labels).item()
    assert cross_entropy(_t(z, device), labels, label_smoothing=0.0).item() == plain
    assert abs(smoothed - plain) > 1e-3


def test_soft_targets_and_one_hot_targets(device, rng):
    z, labels = rng.standard_normal((4, 5)), np.array([1, 0, 4, 4])
    one_hot = np.eye(5)[labels]
    np.testing.assert_allclose(cross_entropy(_t(z, device), one_hot).item(),
                               cross_entropy(_t(z, device), labels).item(), rtol=1e-14)
    soft = rng.random((4, 5))
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(cross_entropy(_t(z, device), soft).item(),
                               -(soft * np.log(softmax(z))).sum() / 4, rtol=1e-14)


# --- the gradient -----------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.0, 0.2])
def test_gradient_is_softmax_minus_target_over_batch(device, rng, s):
    z, labels = rng.standard_normal((3, 6)), np.array([5, 0, 2])
    logits = _t(z, device)
    cross_entropy(logits, labels, label_smoothing=s).backward()
    t = (1 - s) * np.eye(6)[labels] + s / 6
    np.testing.assert_allclose(numpy_grad(logits), (softmax(z) - t) / 3,
                               rtol=1e-13, atol=1e-16)


def test_gradient_goes_through_log_softmax_as_the_derivation_does(device, rng):
    """dL/d log p = -t / B, and log-softmax's backward turns it into
    -t / B + p sum_k t_k / B = (p - t) / B, because each row of t sums to 1."""
    z, labels, s = rng.standard_normal((3, 6)), np.array([5, 0, 2]), 0.2
    t = (1 - s) * np.eye(6)[labels] + s / 6
    through_log_softmax = _t(z, device)
    mv.log_softmax(through_log_softmax).backward(backend.asarray(-t / 3, device=device))
    logits = _t(z, device)
    cross_entropy(logits, labels, label_smoothing=s).backward()
    p = softmax(z)
    np.testing.assert_allclose(numpy_grad(through_log_softmax),
                               (p * t.sum(-1, keepdims=True) - t) / 3, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(numpy_grad(logits), numpy_grad(through_log_softmax),
                               rtol=1e-13, atol=1e-16)


def test_backward_matches_autograd_of_the_composition(device, rng):
    """-(t * logsoftmax(z)).sum() / B from engine primitives, differentiated by autograd."""
    z, labels = rng.standard_normal((4, 6)), np.array([3, 1, 1, 5])
    t = (1 - 0.1) * np.eye(6)[labels] + 0.1 / 6
    a, b = _t(z, device), _t(z, device)
    la = cross_entropy(a, labels, label_smoothing=0.1)
    shifted = b - b.max(axis=-1, keepdims=True)
    log_p = shifted - mv.log(mv.exp(shifted).sum(axis=-1, keepdims=True))
    lb = -(backend.asarray(t, device=device) * log_p).sum() / 4
    np.testing.assert_allclose(la.item(), lb.item(), rtol=1e-14)
    la.backward()
    lb.backward()
    np.testing.assert_allclose(numpy_grad(a), numpy_grad(b),
                               rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("s", [0.0, 0.1])
def test_cross_entropy_gradcheck(device, rng, s):
    labels = np.array([0, 4, 2, 2])
    z = _t(rng.standard_normal((4, 5)) * 2, device)
    assert mv.gradcheck(lambda z: cross_entropy(z, labels, label_smoothing=s), z) < 1e-6
    soft = rng.random((4, 5))
    soft /= soft.sum(-1, keepdims=True)
    assert mv.gradcheck(lambda z: cross_entropy(z, soft, label_smoothing=s), z) < 1e-6
    base = mv.tensor(rng.standard_normal((5, 4)), device=device)
    zt = mv.Tensor(base.data.T, requires_grad=True)                # non-contiguous (4, 5)
    assert mv.gradcheck(lambda z: cross_entropy(z, labels, label_smoothing=s), zt) < 1e-6


class CrossEntropyWithoutTarget(CrossEntropy):
    """Wrong on purpose: dz = g softmax(z) / B, the "- t" forgotten."""

    def backward(self, g):
        return g * self.p / self.p.shape[0]


def test_gradcheck_catches_a_gradient_without_the_target(device, rng):
    t = backend.asarray(np.eye(5)[[0, 4, 2]], device=device)
    z = _t(rng.standard_normal((3, 5)), device)
    with pytest.raises(mv.GradcheckError):
        mv.gradcheck(lambda z: CrossEntropyWithoutTarget(t)(z), z)


def test_cross_entropy_is_stable_for_huge_logits(device, rng):
    z = 1000 + rng.standard_normal((3, 4))
    z[0, 2] = 5000
    logits = _t(z, device)
    loss = cross_entropy(logits, np.array([2, 0, 3]))
    loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(numpy_grad(logits)).all()
    np.testing.assert_allclose(loss.item(), _ce_loops(z - z.max(-1, keepdims=True),
                                                      [2, 0, 3]), rtol=1e-12)


# --- accuracy ---------------------------------------------------------------------------

def test_accuracy(device, rng):
    z = rng.standard_normal((8, 3))
    labels = rng.integers(0, 3, 8)
    expected = float((z.argmax(-1) == labels).mean())
    got = accuracy(_t(z, device), labels)
    assert type(got) is float and got == expected
    assert accuracy(_t(z, device), np.eye(3)[labels]) == expected        # one-hot labels
    assert accuracy(z, z.argmax(-1)) == 1.0                              # a raw array works
    with pytest.raises(ValueError, match="got 2 labels for a batch of 8"):
        accuracy(_t(z, device), labels[:2])


def test_correct_counts_on_the_device(device, rng):
    z = rng.standard_normal((8, 3))
    labels = rng.integers(0, 3, 8)
    got = mv.correct(_t(z, device), mv.backend.to_device(labels, device))
    assert mv.backend.device_of(got) == device and got.ndim == 0
    assert int(got) == int((z.argmax(-1) == labels).sum())


# --- errors, dtypes and devices ---------------------------------------------------------

def test_labels_may_be_a_tensor_a_list_or_an_array_on_another_device(device, rng):
    z, labels = rng.standard_normal((3, 4)), np.array([3, 0, 1])
    expected = _ce_loops(z, labels)
    for given in (labels, list(labels), mv.tensor(labels, device=device),
                  backend.asarray(labels, device=device), mv.tensor(labels, device="cpu")):
        np.testing.assert_allclose(cross_entropy(_t(z, device), given).item(), expected,
                                   rtol=1e-14)


def test_cross_entropy_keeps_float32(device, rng):
    logits = mv.tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True,
                       device=device)
    for target in (np.array([0, 1, 3]), np.full((3, 4), 0.25)):    # soft targets in float64
        logits.grad = None
        loss = cross_entropy(logits, target, label_smoothing=0.1)
        loss.backward()
        assert loss.dtype == np.float32 and logits.grad.dtype == np.float32


def test_cross_entropy_rejects_bad_input(device):
    z = _t(np.zeros((3, 4)), device)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\) for 4 classes, got 4"):
        cross_entropy(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\).*got -1"):
        cross_entropy(z, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="got 2 labels for a batch of 3 logits"):
        cross_entropy(z, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"targets of shape \(3, 4\) like the logits, got "
                                         r"shape \(3, 5\)"):
        cross_entropy(z, np.zeros((3, 5)))
    with pytest.raises(TypeError, match="must be integer class indices, got dtype float64"):
        cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"expected logits of shape \(B, K\).*got shape \(4,\)"):
        cross_entropy(_t(np.zeros(4), device), np.array([1]))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        cross_entropy(z, np.array([0, 1, 2]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="each row of \\(B, K\\) targets must sum to 1"):
        cross_entropy(z, np.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="labels must not require grad"):
        cross_entropy(z, _t(np.eye(4)[[0, 1, 2]], device))


def test_labels_on_the_device_are_checked_there(device):
    """Host labels get a clear error; labels already on the device are checked on the
    device (a read would stall a GPU every step): a bad one makes the loss NaN."""
    z = _t(np.zeros((3, 4)), device)
    on_device = mv.backend.to_device(np.array([0, 4, 1]), device)
    if device == "cpu":                     # NumPy labels are host labels
        with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
            cross_entropy(z, on_device)
        return
    assert np.isnan(cross_entropy(z, on_device).item())
    assert np.isnan(cross_entropy(z, mv.backend.to_device(np.full((3, 4), 0.5), device)).item())
    good = mv.backend.to_device(np.array([0, 3, 1]), device)
    assert cross_entropy(z, good).item() == pytest.approx(np.log(4))


def test_a_loss_on_device_labels_reads_nothing_back(standin):
    z = mv.tensor(np.random.default_rng(0).standard_normal((8, 3)), device="cuda",
                  requires_grad=True)
    labels = mv.backend.to_device(np.arange(8) % 3, "cuda")
    standin.reset()
    loss = cross_entropy(z, labels, label_smoothing=0.1)
    loss.backward()
    mv.correct(z, labels)
    assert standin.counts()["reads"] == 0 and standin.counts()["copies"] == 0


# --- the CUDA kernels -------------------------------------------------------------------

@pytest.fixture
def kernels_on(monkeypatch):
    """Kernels on for this test, whatever MINIVIT_KERNELS says outside it."""
    monkeypatch.setenv("MINIVIT_KERNELS", "1")
    if not kernels.on():
        pytest.skip("kernels are off (MINIVIT_REFERENCE=1)")


def _logits_and_labels(rng, b, k):
    z = mv.tensor(rng.standard_normal((b, k)).astype(np.float32), device="cuda",
                  requires_grad=True)
    return z, backend.to_device(rng.integers(0, k, b), "cuda")


@pytest.mark.parametrize("s", [0.0, 0.1])
def test_loss_kernel_path_equals_the_reference_path(standin, monkeypatch, s):
    results = []
    for use_kernels in ("0", "1"):
        monkeypatch.setenv("MINIVIT_KERNELS", use_kernels)
        z, labels = _logits_and_labels(np.random.default_rng(0), 6, 10)
        loss = cross_entropy(z, labels, label_smoothing=s)
        kind = type(loss.creator).__name__
        loss.backward(backend.asarray(np.float32(2.0), device="cuda"))
        results.append((kind, loss.item(), z.grad))
    (want_kind, want_loss, want_grad), (got_kind, got_loss, got_grad) = results
    assert (want_kind, got_kind) == ("CrossEntropy", "LabelCrossEntropy")   # both paths ran
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(backend.to_device(got_grad, "cpu"),
                               backend.to_device(want_grad, "cpu"), rtol=1e-5, atol=1e-7)


def test_loss_kernel_path_is_one_launch_each_way(standin, kernels_on):
    z, labels = _logits_and_labels(np.random.default_rng(1), 12, 10)
    cross_entropy(z, labels, label_smoothing=0.1).backward()   # the kernels' self-checks
    z.grad = None
    standin.reset()
    loss = cross_entropy(z, labels, label_smoothing=0.1)
    assert standin.counts()["launches"] == 1
    standin.reset()
    loss.backward()
    counts = standin.counts()
    assert counts["launches"] == 3       # the seed gradient (ones), the kernel, into z.grad
    assert counts["reads"] == counts["copies"] == 0
    assert loss_module.CROSS_ENTROPY_FORWARD.status == "ok"
    assert loss_module.CROSS_ENTROPY_BACKWARD.status == "ok"


def test_loss_kernel_path_makes_a_bad_label_nan(standin, kernels_on):
    z = mv.tensor(np.zeros((3, 4), np.float32), device="cuda")
    assert np.isnan(cross_entropy(z, backend.to_device(np.array([0, 4, 1]), "cuda")).item())
    good = cross_entropy(z, backend.to_device(np.array([0, 3, 1]), "cuda"), label_smoothing=0.1)
    assert good.item() == pytest.approx(np.log(4), rel=1e-6)


def test_minivit_kernels_0_runs_the_loss_reference(standin, monkeypatch):
    monkeypatch.setenv("MINIVIT_KERNELS", "0")
    z, labels = _logits_and_labels(np.random.default_rng(2), 4, 5)
    standin.reset()
    cross_entropy(z, labels, label_smoothing=0.1)
    assert standin.counts()["launches"] > 5


@pytest.mark.parametrize("b, k", [(128, 10), (33, 100), (5, 1000)])
@pytest.mark.parametrize("s", [0.0, 0.1])
def test_loss_kernels_equal_their_references_on_a_gpu(kernels_on, b, k, s):
    require_cupy()
    if STANDIN:
        pytest.skip("runs the CUDA kernels themselves: needs a real GPU")
    rng = np.random.default_rng(3)
    z = backend.asarray(3 * rng.standard_normal((b, k)).astype(np.float32), device="cuda")
    labels = backend.to_device(rng.integers(0, k, b), "cuda")
    g = backend.asarray(np.float32(0.5), device="cuda")
    for got, want in ((loss_cuda.forward(z, labels, s),
                       loss_module._forward_reference(z, labels, s)),
                      (loss_cuda.backward(z, labels, s, g),
                       loss_module._backward_reference(z, labels, s, g))):
        np.testing.assert_allclose(backend.to_device(got, "cpu"),
                                   backend.to_device(want, "cpu"), rtol=1e-4, atol=1e-6)
