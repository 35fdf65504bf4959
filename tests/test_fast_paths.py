"""Every fast path computes what its reference computes (minivit/fast.py).

The reference of each equation is the spec; a fast path is a second way to compute the
same values, taken unless MINIVIT_REFERENCE=1 or minivit.use_reference(True) turns it
off.  The claims, each with the test that checks it:

1. The whole model: cifar-tiny (with dropout) forward and backward in float64 give the
   same logits and the same gradient of every parameter with every fast path on and
   with every one off, to 1e-12 of each array's largest entry
   (test_the_model_is_the_same_on_the_fast_and_the_reference_paths).
2. affine: x W + b as one node equals matmul(x, W) + b, values and gradients
   (test_affine_equals_matmul_plus_bias).
3. fused_attention: FusedSelfAttention equals split_heads -> attention -> merge_heads,
   with and without a dropout mask, weights included
   (test_fused_self_attention_equals_the_composition).
4. blocks: covered in test_blocks.py, which runs GELU and attention one row at a time.
5. blas_sums: row and column sums as BLAS products equal NumPy's sums
   (test_blas_sums_equal_sums).
6. float32_erf: within 5e-7 of erf computed in float64
   (test_float32_erf_is_within_5e_7_of_erf).
7. flat_optimizer: whole-buffer SGD and AdamW updates equal the textbook per-tensor
   update, step after step, with weight decay, no_decay, momentum and Nesterov
   (test_whole_buffer_updates_equal_the_per_tensor_reference), and clipping over the
   buffers equals clipping tensor by tensor (test_clipping_over_buffers_equals_per_tensor).
8. The switch: MINIVIT_REFERENCE=1 turns every fast path off, use_reference turns them
   off and on by name, and an unknown name is refused
   (test_the_switch_by_environment_and_by_name).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import minivit as mv
from minivit import backend, fast
from minivit.nn import VisionTransformer
from minivit.ops.basic import column_sum, row_sum
from minivit.ops.special import erf, erf_float32
from minivit.optim import SGD, AdamW, clip_grad_norm

pytestmark = pytest.mark.usefixtures("fast_paths")


def both_paths(fn):
    """fn() with every fast path on, then with every one off."""
    on = fn()
    fast.use_reference(True)
    try:
        off = fn()
    finally:
        fast.use_reference(False)
    return on, off


def assert_close(a, b, what, rel=1e-12):
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    assert a.shape == b.shape, what
    assert np.abs(a - b).max() <= rel * max(np.abs(b).max(), 1e-300), what


def test_the_model_is_the_same_on_the_fast_and_the_reference_paths(device):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, 32, 32))
    labels = backend.asarray(rng.integers(0, 10, 4), device=device)

    def forward_backward():
        model = VisionTransformer("cifar-tiny", seed=1, dropout=0.1,
                                  attention_dropout=0.1).to(device).astype("float64")
        for i, p in enumerate(model.parameters()):     # the head starts at zero: nudge all
            noise = np.random.default_rng(i).standard_normal(p.shape)
            p.data = p.data + backend.asarray(0.02 * noise, device=device)
        model.train()
        logits = model(mv.tensor(images, device=device))
        mv.cross_entropy(logits, labels, label_smoothing=0.1).backward()
        return logits.data, {name: p.grad for name, p in model.named_parameters()}
    (logits, grads), (ref_logits, ref_grads) = both_paths(forward_backward)
    assert_close(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], name)
    assert np.abs(backend.to_numpy(ref_grads["patch_embed.kernel"])).max() > 0


@pytest.mark.parametrize("with_bias", [True, False])
def test_affine_equals_matmul_plus_bias(device, rng, with_bias):
    x = mv.tensor(rng.standard_normal((2, 5, 4)), device=device, requires_grad=True)
    w = mv.tensor(rng.standard_normal((4, 3)), device=device, requires_grad=True)
    b = mv.tensor(rng.standard_normal(3), device=device, requires_grad=True) if with_bias else None
    g = mv.tensor(rng.standard_normal((2, 5, 3)), device=device)

    def run():
        for t in (x, w, b):
            if t is not None:
                t.grad = None
        y = mv.affine(x, w, b)
        (y * g).sum().backward()
        return [y.data] + [t.grad for t in (x, w, b) if t is not None]
    for got, want in zip(*both_paths(run)):
        assert_close(got, want, "affine")


@pytest.mark.parametrize("masked", [False, True])
def test_fused_self_attention_equals_the_composition(device, rng, masked):
    B, T, D, heads = 2, 5, 12, 3
    qkv = mv.tensor(rng.standard_normal((B, T, 3 * D)), device=device, requires_grad=True)
    mask = None
    if masked:
        mask = backend.asarray((rng.random((B, heads, T, T)) >= 0.3) / 0.7, device=device)
    g = mv.tensor(rng.standard_normal((B, T, D)), device=device)

    def run():
        qkv.grad = None
        out, weights = mv.self_attention(qkv, heads, mask, return_weights=True)
        (out * g).sum().backward()
        return out.data, weights.data, qkv.grad
    for got, want, what in zip(*both_paths(run), ("out", "weights", "dqkv")):
        assert_close(got, want, what)


@pytest.mark.parametrize("shape", [(7,), (3, 65), (2, 4, 192)])
def test_blas_sums_equal_sums(device, rng, shape):
    x = backend.asarray(rng.standard_normal(shape), device=device)
    (rows, columns), (ref_rows, ref_columns) = both_paths(lambda: (row_sum(x), column_sum(x)))
    assert_close(rows, ref_rows, "row_sum", rel=1e-13)
    assert_close(columns, ref_columns, "column_sum", rel=1e-13)
    assert row_sum(x, keepdims=True).shape == shape[:-1] + (1,)


def test_float32_erf_is_within_5e_7_of_erf(device):
    x = backend.asarray(np.linspace(-6, 6, 4001), device=device)
    exact = backend.to_numpy(erf(x))
    fast32 = backend.to_numpy(erf_float32(x.astype("float32")))
    assert fast32.dtype == np.float32
    assert np.abs(fast32 - exact).max() < 5e-7
    with_switch, reference = both_paths(lambda: erf(x.astype("float32")))
    np.testing.assert_array_equal(backend.to_numpy(with_switch), fast32)
    assert np.abs(backend.to_numpy(reference) - exact).max() < 6e-8   # exact, rounded


def params(device, rng):
    shapes = [(4, 3), (3,), (1, 1, 3), (2, 3), (5,)]
    return [mv.nn.Parameter(backend.asarray(rng.standard_normal(s), device=device))
            for s in shapes]


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, no_decay=[p[2]]),
    lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: SGD(p, lr=0.1, momentum=0.0),
    lambda p: AdamW(p, lr=0.01, weight_decay=0.05, no_decay=[p[2]]),
    lambda p: AdamW(p, lr=0.01, weight_decay=0.05, decay_matrices_only=False),
], ids=["sgd", "sgd-nesterov", "sgd-plain", "adamw", "adamw-all-decayed"])
def test_whole_buffer_updates_equal_the_per_tensor_reference(device, make):
    def run():
        ps = params(device, np.random.default_rng(0))
        optimizer = make(ps)
        rng = np.random.default_rng(1)
        for _ in range(4):
            for p in ps:
                p.grad = backend.asarray(rng.standard_normal(p.shape), device=device)
            optimizer.step()
        return [p.data for p in ps]
    for got, want in zip(*both_paths(run)):
        assert_close(got, want, "parameter after 4 steps", rel=1e-13)


def test_clipping_over_buffers_equals_per_tensor(device, rng):
    def run():
        ps = params(device, np.random.default_rng(0))
        AdamW(ps, lr=0.01)                             # puts them into a flat buffer
        for p in ps:
            p.grad = backend.asarray(3 * np.random.default_rng(2).standard_normal(p.shape),
                                     device=device)
        norm = clip_grad_norm(ps, 1.0)
        return [norm] + [p.grad for p in ps]
    for got, want in zip(*both_paths(run)):
        assert_close(got, want, "clipped gradient", rel=1e-14)


def test_the_switch_by_environment_and_by_name():
    env = {**os.environ, "MINIVIT_REFERENCE": "1"}
    code = "from minivit import fast; print(fast.disabled() == sorted(fast.PATHS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr
    assert fast.disabled() == []
    mv.use_reference(True, paths=["blocks", "affine"])
    assert fast.disabled() == ["affine", "blocks"] and not fast.enabled("blocks")
    mv.use_reference(False, paths=["blocks"])
    assert fast.disabled() == ["affine"] and fast.enabled("blocks")
    with pytest.raises(ValueError, match="unknown fast path.*'?nope'?.*the fast paths are"):
        mv.use_reference(True, paths=["nope"])
