"""Row-wise computations in cache-sized blocks (minivit/blocks.py: map_rows).

map_rows(fn, *arrays) cuts the arrays' rows (axis 0) into blocks, runs fn on each block
and writes the blocks' results into whole outputs; when fn treats rows independently
this is fn on the whole arrays, computed a block at a time.  It is a fast path ("blocks"
in minivit/fast.py), so the tests of blocks run with the fast paths on (the fast_paths
fixture) whatever MINIVIT_REFERENCE says.  These tests check, in order:

1. The results equal one call on the whole arrays for every block size down to one row
   (test_map_rows_equals_one_call), with one output and the default block size too
   (test_map_rows_single_output_and_default_block).
2. A scalar, and any array on CuPy, is one call whatever its size
   (test_map_rows_of_a_scalar_calls_once, test_map_rows_calls_once_on_the_gpu).
3. Every operation that runs through map_rows (GELU, attention, self-attention) gives
   the same values and gradients in blocks of one row as in one block
   (test_blocked_operations_equal_one_block), and passes float64 gradient checks in
   blocks (test_gradcheck_in_blocks).

Then the errors, and rows whose scores lie far below the others' (softmax shifted by
each row's own maximum stays finite).
"""
import numpy as np
import pytest

import minivit as mv
from minivit import backend, blocks
from minivit.ops.attention import attention, self_attention

from conftest import require_cupy
from reference import loop_attention


def rowwise(x, y):
    """Elementwise, a reduction within each row, and a second output: what GELU,
    LayerNorm and attention do."""
    centred = x - x.mean(axis=(1, 2), keepdims=True)
    return np.exp(-centred * centred) * 3, y.max(axis=1) + x[:, 0, 0]


# --- map_rows ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_values", [1, 15, 16, 40, 10 ** 9])
def test_map_rows_equals_one_call(rng, block_values, fast_paths):
    x, y = rng.standard_normal((7, 3, 5)), rng.standard_normal((7, 4))
    calls = []

    def counted(*arrays):
        calls.append(arrays[0].shape[0])
        return rowwise(*arrays)
    got = blocks.map_rows(counted, x, y, block_values=block_values)
    want = rowwise(x, y)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    rows = max(block_values // 15, 1)                  # 15 values per row of x, the largest
    assert calls == [min(rows, 7 - i) for i in range(0, 7, rows)]


def test_map_rows_single_output_and_default_block(rng, monkeypatch, fast_paths):
    x = rng.standard_normal((6, 10)).astype(np.float32)
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 20)    # 2 rows a block
    calls = []

    def double(x):
        calls.append(len(x))
        return x * 2
    np.testing.assert_array_equal(blocks.map_rows(double, x), x * 2)
    assert calls == [2, 2, 2]
    assert blocks.map_rows(double, x).dtype == np.float32


def test_map_rows_of_a_scalar_calls_once():
    assert blocks.map_rows(lambda a: a + 1, np.asarray(2.0), block_values=1) == 3.0


def test_map_rows_calls_once_on_the_gpu(rng):
    require_cupy()
    cuda = backend.asarray(rng.standard_normal((64, 8)), device="cuda")
    calls = []

    def f(a):
        calls.append(a.shape)
        return a * 2
    out = blocks.map_rows(f, cuda, block_values=8)
    assert calls == [(64, 8)] and backend.device_of(out) == "cuda"


# --- the operations that run in blocks --------------------------------------------------

def _attention_inputs(rng, dtype):
    q, k, v = (rng.standard_normal((5, 2, 6, 4)).astype(dtype) for _ in range(3))
    qkv = rng.standard_normal((5, 6, 24)).astype(dtype)
    mask = (rng.random((5, 2, 6, 6)) >= 0.25) / 0.75
    return q, k, v, qkv, mask


def _values_and_gradients(rng, dtype):
    """Forward values and input gradients of GELU, attention and self-attention."""
    q, k, v, qkv, mask = _attention_inputs(rng, dtype)
    x = rng.standard_normal((5, 6, 7)).astype(dtype)
    results = []
    for fn, inputs in ((lambda x: mv.gelu(x), [x]),
                       (lambda x: mv.gelu(x, approximate="tanh"), [x]),
                       (lambda q, k, v: attention(q, k, v, mask), [q, k, v]),
                       (lambda qkv: self_attention(qkv, 2, mask), [qkv])):
        tensors = [mv.tensor(a, requires_grad=True) for a in inputs]
        y = fn(*tensors)
        y.backward(backend.asarray(np.cos(np.arange(y.size)).reshape(y.shape), dtype=dtype))
        results.append([y.numpy()] + [t.grad for t in tensors])
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_operations_equal_one_block(rng, monkeypatch, dtype, fast_paths):
    whole = _values_and_gradients(np.random.default_rng(1), dtype)
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 30)    # one image (row) per block
    blocked = _values_and_gradients(np.random.default_rng(1), dtype)
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    for got, want in zip(blocked, whole):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance)


def test_gradcheck_in_blocks(rng, monkeypatch, fast_paths):
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 30)
    q, k, v, qkv, mask = _attention_inputs(rng, np.float64)
    x = rng.standard_normal((5, 6, 7))
    for fn, inputs in ((mv.gelu, [x]), (lambda q, k, v: attention(q, k, v, mask), [q, k, v]),
                       (lambda qkv: self_attention(qkv, 2, mask), [qkv])):
        assert mv.gradcheck(fn, *(mv.tensor(a, requires_grad=True) for a in inputs)) < 1e-6


# --- errors, dtypes and devices ---------------------------------------------------------

def test_map_rows_rejects_arrays_of_different_lengths(rng):
    with pytest.raises(ValueError, match=r"same length on axis 0, got shapes \[\(3, 2\), "
                                         r"\(4, 2\)\]"):
        blocks.map_rows(lambda a, b: a, np.ones((3, 2)), np.ones((4, 2)))


def test_rows_far_below_their_heads_largest_score_do_not_underflow(device, rng, fast_paths):
    """A row whose scores all lie 300 below its head's largest score would underflow to
    exp = 0 in float32 (weights 0 / 0) under any shift but its own maximum: attention and
    the fused self_attention, in blocks, stay finite and exact in float32 as in float64."""
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    q[:, :, 0] = 0.0                                   # row 0: every score 0
    q[:, :, 1] = k[:, :, 0] * (600 / (k[:, :, 0] ** 2).sum(axis=-1))[..., None]   # row 1:
    # its score for key 0 is c q . k = 300 (c = 1/2): each head's largest is 300 or more
    for dtype, rtol in ((np.float32, 2e-5), (np.float64, 1e-10)):
        inputs = [mv.tensor(x.astype(dtype), device=device) for x in (q, k, v)]
        out, weights = attention(*inputs, return_weights=True)
        want_out, want_weights = loop_attention(q.astype(dtype), k.astype(dtype),
                                                v.astype(dtype))
        assert np.isfinite(out.numpy()).all()
        np.testing.assert_allclose(weights.numpy()[:, :, 0], 0.2, rtol=rtol)   # uniform
        np.testing.assert_allclose(out.numpy(), want_out, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(weights.numpy(), want_weights, rtol=rtol, atol=rtol)
        qkv = np.concatenate([x.swapaxes(1, 2).reshape(2, 5, 12) for x in (q, k, v)], -1)
        out, weights = self_attention(mv.tensor(qkv.astype(dtype), device=device), 3,
                                      return_weights=True)
        assert np.isfinite(out.numpy()).all()
        np.testing.assert_allclose(out.numpy(), want_out.swapaxes(1, 2).reshape(2, 5, 12),
                                   rtol=rtol, atol=rtol)
        np.testing.assert_allclose(weights.numpy(), want_weights, rtol=rtol, atol=rtol)
