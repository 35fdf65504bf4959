"""Optimisers, the learning-rate schedule and gradient clipping, against their formulas.

Each update rule has one home, the docstring of its optimiser in minivit/optim.py (SGD,
AdamW, clip_grad_norm, warmup_cosine).  These tests check, in order:

1. SGD with heavy-ball momentum and decoupled weight decay lambda:
   b_t = mu b_{t-1} + g_t, w_t = w_{t-1} - lr (b_t + lambda w_{t-1})
   (test_sgd_momentum_and_weight_decay).
2. AdamW, t = 1, 2, ...: m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2,
   m_hat = m_t / (1 - b1^t), v_hat = v_t / (1 - b2^t),
   w_t = w - lr m_hat / (sqrt(v_hat) + eps) - lr lambda w, biases not decayed
   (test_adamw_matches_its_formula).
3. The decay is decoupled: it shrinks w whatever g is
   (test_adamw_decay_is_decoupled_from_the_gradient); the parameters listed in
   no_decay (ViT's [CLS] token and position embeddings) are left alone
   (test_adamw_leaves_no_decay_parameters_alone), and so are parameters without a
   gradient (test_parameters_without_grad_are_skipped).
4. Global-norm clipping rescales every gradient by max_norm / ||g|| when ||g|| is larger
   (test_clip_grad_norm), and reports a non-finite norm without clipping
   (test_clip_grad_norm_reports_non_finite_norms).
5. The schedule warms up linearly, then follows a cosine down to final_lr
   (test_warmup_then_cosine).
6. An optimiser's state round-trips through state_dict and resumes exactly
   (test_optimizer_state_round_trip_resumes_exactly).
7. Parameters and their gradients are views of one flat buffer
   (test_parameters_and_gradients_are_views_of_one_buffer).

Then the errors, and the fast path: the whole-buffer updates equal the per-tensor loop
exactly, and cost a fixed number of GPU launches and no read.  Clipping inside the step
(optimizer.clip_grad_norm) updates exactly as clipping the gradients first does, and
leaves p.grad alone (test_clipping_inside_the_step_equals_clipping_first).  On a GPU each
update is one CUDA kernel: on the stand-in it equals the whole-buffer reference and the
textbook per-tensor rule (test_the_update_kernels_equal_the_reference), and norm, clip
and AdamW are two launches, no read and no copy, whatever the number of parameters
(test_clipping_and_the_update_kernel_cost_two_launches_and_no_read).
"""
import math

import numpy as np
import pytest

import minivit as mv
from minivit.nn import Parameter
from minivit.optim import SGD, AdamW, clip_grad_norm, warmup_cosine

from conftest import numpy_grad


def params_and_grads(device, seed=0):
    rng = np.random.default_rng(seed)
    w0 = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    grads = [[rng.standard_normal(w.shape) for w in w0] for _ in range(4)]
    params = [Parameter(mv.backend.to_device(w.copy(), device)) for w in w0]
    return params, w0, grads


def run(optimizer, params, grads, device):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = mv.backend.to_device(g.copy(), device)
        optimizer.step()
    return [p.numpy() for p in params]


def many_params(device, seed=1):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (1, 5, 2), (2, 2), (6,)]
    w0 = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    return [Parameter(mv.backend.to_device(w.copy(), device)) for w in w0], w0, grads


# --- the update rules -------------------------------------------------------------------

def test_sgd_momentum_and_weight_decay(device):
    params, w0, grads = params_and_grads(device)
    got = run(SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01), params, grads, device)
    for i, w in enumerate(w0):
        w, b = w.copy(), np.zeros_like(w)
        for step_grads in grads:
            b = 0.9 * b + step_grads[i]
            w = w - 0.1 * (b + 0.01 * w)
        np.testing.assert_allclose(got[i], w, rtol=1e-12)


def test_adamw_matches_its_formula(device):
    params, w0, grads = params_and_grads(device)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.1
    got = run(AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), params, grads,
              device)
    for i, w in enumerate(w0):
        w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[i]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            decay = lr * wd * w if w.ndim >= 2 else 0.0      # biases are not decayed
            w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) - decay
        np.testing.assert_allclose(got[i], w, rtol=1e-10)


def test_adamw_decay_is_decoupled_from_the_gradient(device):
    p = Parameter(mv.backend.to_device(np.full((2, 2), 2.0), device))
    p.grad = mv.backend.to_device(np.zeros((2, 2)), device)
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(p.numpy(), 2.0 * (1 - 0.1 * 0.5))   # only the decay acted


def test_adamw_leaves_no_decay_parameters_alone(device):
    from minivit.nn import VisionTransformer
    model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=1,
                              num_heads=2, mlp_dim=16).to(device)
    assert model.no_weight_decay() == [model.cls_token, model.pos_embed]
    for p in model.parameters():
        p.grad = mv.backend.to_device(np.zeros(p.shape, np.float32), device)
    before = {name: p.numpy().copy() for name, p in model.named_parameters()}
    AdamW(model.parameters(), lr=0.1, weight_decay=0.5, no_decay=model.no_weight_decay()).step()
    after = dict(model.named_parameters())
    np.testing.assert_array_equal(after["pos_embed"].numpy(), before["pos_embed"])
    np.testing.assert_allclose(after["blocks.0.mlp.fc1.weight"].numpy(),
                               before["blocks.0.mlp.fc1.weight"] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_parameters_without_grad_are_skipped(device):
    params, w0, _ = params_and_grads(device)
    params[0].grad = mv.backend.to_device(np.ones((3, 4)), device)
    SGD(params, lr=1.0, momentum=0.0).step()
    np.testing.assert_allclose(params[0].numpy(), w0[0] - 1)
    np.testing.assert_array_equal(params[1].numpy(), w0[1])


# --- clipping and the schedule ----------------------------------------------------------

def test_clip_grad_norm(device):
    params, _, grads = params_and_grads(device)
    for p, g in zip(params, grads[0]):
        p.grad = mv.backend.to_device(g.copy(), device)
    norm = math.sqrt(sum((g ** 2).sum() for g in grads[0]))
    assert float(clip_grad_norm(params, max_norm=1e9)) == pytest.approx(norm, rel=1e-12)
    np.testing.assert_array_equal(numpy_grad(params[0]), grads[0][0])  # untouched
    assert float(clip_grad_norm(params, max_norm=1.0)) == pytest.approx(norm, rel=1e-12)
    clipped = math.sqrt(sum(float((numpy_grad(p) ** 2).sum()) for p in params))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(numpy_grad(params[0]), grads[0][0] / norm, rtol=1e-5)


def test_clip_grad_norm_reports_non_finite_norms(device):
    p = Parameter(mv.backend.to_device(np.zeros(2), device))
    p.grad = mv.backend.to_device(np.array([1.0, np.inf]), device)
    assert math.isinf(float(clip_grad_norm([p], 1.0)))
    np.testing.assert_array_equal(numpy_grad(p), [1.0, np.inf])   # not clipped


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=1.0) for s in range(110)]
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10)         # linear warm-up
    assert lr[10] == 1.0                                                # peak
    assert lr[60] == pytest.approx(0.5)                                 # halfway down
    assert lr[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))                # never rises again
    assert warmup_cosine(500, 110, 10, 1.0, final_lr=0.1) == pytest.approx(0.1)


# --- state and buffers ------------------------------------------------------------------

def test_optimizer_state_round_trip_resumes_exactly(device):
    params_a, _, grads = params_and_grads(device)
    params_b, _, _ = params_and_grads(device)
    opt_a = AdamW(params_a, lr=0.01, weight_decay=0.1)
    run(opt_a, params_a, grads[:2], device)
    state = opt_a.state_dict()
    for pa, pb in zip(params_a, params_b):
        pb.data = pb.data * 0 + pa.data
    opt_b = AdamW(params_b, lr=0.01, weight_decay=0.1)
    opt_b.load_state_dict(state)
    assert opt_b.steps == 2
    np.testing.assert_array_equal(run(opt_a, params_a, grads[2:], device)[0],
                                  run(opt_b, params_b, grads[2:], device)[0])
    with pytest.raises(ValueError, match="state for 2 parameters, optimiser has 1"):
        AdamW(params_b[:1], lr=0.1).load_state_dict(state)


def test_parameters_and_gradients_are_views_of_one_buffer(device):
    params, w0, _ = many_params(device)
    opt = SGD(params, lr=0.1, momentum=0.0)
    (buffer,) = opt.buffers
    assert buffer.data.shape == (sum(w.size for w in w0),)
    buffer.data[...] = 7.0                                   # writes reach every parameter
    assert all((p.numpy() == 7.0).all() for p in params)
    y = (params[0] * params[0]).sum() + params[1].sum()
    y.backward()                                             # gradients land in the buffer
    grad = numpy_grad(buffer)
    o = buffer.offsets[buffer.params.index(params[0])]
    np.testing.assert_array_equal(grad[o:o + 12], np.full(12, 14.0))
    params[0].grad = mv.backend.to_device(np.ones((3, 4)), device)    # assigning copies in
    assert params[0].grad is not None and numpy_grad(buffer)[o] == 1.0
    opt.zero_grad()
    assert all(p.grad is None for p in params) and not numpy_grad(buffer).any()
    with pytest.raises(ValueError, match=r"expected an array of shape \(4,\)"):
        params[1].grad = mv.backend.to_device(np.ones(3), device)


# --- errors, dtypes and devices ---------------------------------------------------------

def test_bad_arguments():
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW([p], lr=-1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        SGD([p], lr=0.1, momentum=1.5)


def test_an_optimiser_refuses_parameters_moved_after_it_was_made(device):
    from minivit.nn import VisionTransformer
    model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=1,
                              num_heads=2, mlp_dim=16).to(device)
    opt = AdamW(model.parameters(), lr=0.1)
    state = model.state_dict()
    model.load_state_dict(state)                             # same shapes: copied in place
    opt.step()
    model.astype("float64")
    with pytest.raises(RuntimeError, match="create the optimiser after model.to"):
        opt.step()
    AdamW(model.parameters(), lr=0.1).step()                 # a new optimiser is fine


# --- the fast path: whole-buffer updates ------------------------------------------------

def per_tensor_adamw(params, grads, lr, betas, eps, wd, decays):
    """AdamW one tensor at a time with the bias corrections folded into two scalars, as the
    whole-buffer update computes it: step_size m / (sqrt(v) + eps_hat)."""
    b1, b2 = betas
    w = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            m[i] *= b1
            m[i] += (1 - b1) * g
            v[i] *= b2
            v[i] += (1 - b2) * (g * g)
            step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            eps_hat = eps * math.sqrt(1 - b2 ** t)
            if wd and decays[i]:
                w[i] -= (lr * wd) * w[i]
            w[i] -= step_size * m[i] / (np.sqrt(v[i]) + eps_hat)
    return w


def per_tensor_sgd(params, grads, lr, momentum, wd, nesterov, decays):
    w = [p.copy() for p in params]
    b = [None] * len(params)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            if b[i] is None:
                b[i] = g.copy()
            else:
                b[i] *= momentum
                b[i] += g
            d = g + momentum * b[i] if nesterov else b[i]
            if wd and decays[i]:
                d = d + wd * w[i]
            w[i] -= lr * d
    return w


def test_fused_adamw_equals_the_per_tensor_loop_exactly(device, fast_paths):
    params, w0, grads = many_params(device)
    no_decay = [params[2]]                 # like ViT's position embeddings: 3 axes, not decayed
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                no_decay=no_decay)
    got = run(opt, params, grads, device)
    decays = [w.ndim >= 2 and i != 2 for i, w in enumerate(w0)]
    want = per_tensor_adamw(w0, grads, 0.01, (0.9, 0.99), 1e-8, 0.1, decays)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_equals_the_per_tensor_loop_exactly(device, nesterov, fast_paths):
    params, w0, grads = many_params(device)
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov,
              no_decay=[params[1]])
    got = run(opt, params, grads, device)
    want = per_tensor_sgd(w0, grads, 0.1, 0.9, 0.01, nesterov, [i != 1 for i in range(5)])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_a_step_and_clipping_cost_a_fixed_number_of_launches_and_no_read(standin, fast_paths):
    """On the GPU each array operation is a kernel launch: the fused update is a dozen,
    whatever the number of parameters, and clipping never waits for the device."""
    launches = []
    for n in (5, 50):
        params = [Parameter(mv.backend.to_device(np.ones((2, 3)), "cuda")) for _ in range(n)]
        opt = AdamW(params, lr=0.1, weight_decay=0.1)
        for p in params:
            p.grad = mv.backend.to_device(np.ones((2, 3)), "cuda")
        standin.reset()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad()
        counts = standin.counts()
        assert counts["reads"] == 0 and counts["copies"] == 0
        launches.append(counts["launches"])
    assert launches[0] == launches[1] <= 30, launches        # 11 clipping, 14 AdamW, 1 fill


@pytest.mark.parametrize("make", [
    lambda ps: AdamW(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, no_decay=[ps[2]]),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, no_decay=[ps[1]]),
])
def test_clipping_inside_the_step_equals_clipping_first(device, make):
    def train(inside):
        params, w0, grads = many_params(device)
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = mv.backend.to_device(3 * g, device)
            if inside:
                norm = opt.clip_grad_norm(1.0)
                np.testing.assert_array_equal(numpy_grad(params[0]), 3 * step_grads[0])
            else:
                norm = clip_grad_norm(params, 1.0)
            opt.step()
            assert float(norm) > 1.0                                   # so it did clip
        return [p.numpy() for p in params]
    for got, want in zip(train(True), train(False)):
        np.testing.assert_array_equal(got, want)


def float32_params(n_params=5, seed=1, size=3000):
    """Parameters of float32 on the GPU, big enough for the kernels' self-check slice."""
    rng = np.random.default_rng(seed)
    shapes = [(size // 10, 10), (7,), (1, 5, 2), (2, 2), (6,)][:n_params]
    w0 = [rng.standard_normal(s).astype("float32") for s in shapes]
    grads = [[(3 * rng.standard_normal(s)).astype("float32") for s in shapes] for _ in range(3)]
    return w0, grads


@pytest.mark.parametrize("which", ["adamw", "sgd", "sgd-nesterov", "sgd-no-momentum"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_the_update_kernels_equal_the_reference(standin, monkeypatch, which, clip, fast_paths):
    from minivit import kernels, optim
    make = {"adamw": lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1, no_decay=[ps[2]]),
            "sgd": lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
            "sgd-nesterov": lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
            "sgd-no-momentum": lambda ps: SGD(ps, lr=0.1, momentum=0.0)}[which]
    w0, grads = float32_params()

    def train(kernels_on):
        monkeypatch.setenv("MINIVIT_KERNELS", "1" if kernels_on else "0")
        params = [Parameter(mv.backend.to_device(w.copy(), "cuda")) for w in w0]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = mv.backend.to_device(g, "cuda")
            opt.clip_grad_norm(clip)
            opt.step()
        return [p.numpy() for p in params]
    kernels.reset()
    got, want = train(True), train(False)
    kernel = optim.ADAMW_KERNEL if which == "adamw" else optim.SGD_KERNEL
    assert kernel.status == "ok" and (clip is None or optim.GRAD_NORM_KERNEL.status == "ok")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    if which == "adamw":             # and the textbook rule, clipped by hand, in float64
        w64 = [w.astype("float64") for w in w0]
        clipped = []
        for step_grads in grads:
            norm = math.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in step_grads))
            f = clip / (norm + 1e-6) if clip is not None and norm > clip else 1.0
            clipped.append([g.astype("float64") * f for g in step_grads])
        decays = [w.ndim >= 2 and i != 2 for i, w in enumerate(w0)]
        textbook = per_tensor_adamw(w64, clipped, 0.01, (0.9, 0.999), 1e-8, 0.1, decays)
        for g, w in zip(got, textbook):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_clipping_and_the_update_kernel_cost_two_launches_and_no_read(standin, fast_paths,
                                                                      monkeypatch):
    """The norm kernel leaves the clip factor on the device and the AdamW kernel scales
    each gradient as it reads it: one launch each, for any number of parameters."""
    monkeypatch.delenv("MINIVIT_KERNELS", raising=False)     # the kernels' path, always
    counts = []
    for n in (2, 20):
        params = [Parameter(mv.backend.to_device(np.ones((100, 50), "float32"), "cuda"))
                  for _ in range(n)]
        opt = AdamW(params, lr=0.1, weight_decay=0.1)
        for p in params:
            p.grad = mv.backend.to_device(np.ones((100, 50), "float32"), "cuda")
        opt.clip_grad_norm(1.0)          # the first call checks the kernels themselves
        opt.step()
        standin.reset()
        opt.clip_grad_norm(1.0)
        opt.step()
        counts.append(standin.counts())
    for c in counts:
        assert c["reads"] == 0 and c["copies"] == 0 and c["launches"] == 2, counts
