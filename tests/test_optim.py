"""Optimisers, the learning-rate schedule and gradient clipping, against their formulas.

SGD with momentum (heavy ball), decoupled weight decay lambda:
    b_t = mu b_{t-1} + g_t,     w_t = w_{t-1} - lr (b_t + lambda w_{t-1})
AdamW (Loshchilov & Hutter), t = 1, 2, ...:
    m_t = b1 m + (1 - b1) g,   v_t = b2 v + (1 - b2) g^2,
    w_t = w - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps) - lr lambda w.
The decay is "decoupled": it shrinks w directly instead of being added to g, so Adam's
per-coordinate scaling does not weaken it for coordinates with large gradients.
Global-norm clipping rescales every gradient by the same factor max_norm / ||g||,
keeping the direction of the whole update.
"""
import math

import numpy as np
import pytest

import minivit as mv
from minivit.nn import Parameter
from minivit.optim import SGD, AdamW, clip_grad_norm, warmup_cosine


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


def test_parameters_without_grad_are_skipped(device):
    params, w0, _ = params_and_grads(device)
    params[0].grad = mv.backend.to_device(np.ones((3, 4)), device)
    SGD(params, lr=1.0, momentum=0.0).step()
    np.testing.assert_allclose(params[0].numpy(), w0[0] - 1)
    np.testing.assert_array_equal(params[1].numpy(), w0[1])


def test_clip_grad_norm(device):
    params, _, grads = params_and_grads(device)
    for p, g in zip(params, grads[0]):
        p.grad = mv.backend.to_device(g.copy(), device)
    norm = math.sqrt(sum((g ** 2).sum() for g in grads[0]))
    assert clip_grad_norm(params, max_norm=1e9) == pytest.approx(norm, rel=1e-12)
    np.testing.assert_array_equal(mv.backend.to_numpy(params[0].grad), grads[0][0])  # untouched
    assert clip_grad_norm(params, max_norm=1.0) == pytest.approx(norm, rel=1e-12)
    clipped = math.sqrt(sum(float((mv.backend.to_numpy(p.grad) ** 2).sum()) for p in params))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(mv.backend.to_numpy(params[0].grad), grads[0][0] / norm, rtol=1e-5)


def test_clip_grad_norm_reports_non_finite_norms(device):
    p = Parameter(mv.backend.to_device(np.zeros(2), device))
    p.grad = mv.backend.to_device(np.array([1.0, np.inf]), device)
    assert math.isinf(clip_grad_norm([p], 1.0))


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=1.0) for s in range(110)]
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10)         # linear warm-up
    assert lr[10] == 1.0                                                # peak
    assert lr[60] == pytest.approx(0.5)                                 # halfway down
    assert lr[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))                # never rises again
    assert warmup_cosine(500, 110, 10, 1.0, final_lr=0.1) == pytest.approx(0.1)


def test_bad_arguments():
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW([p], lr=-1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        SGD([p], lr=0.1, momentum=1.5)


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
