"""Row-wise computations in cache-sized blocks (minivit/blocks.py).

map_rows(fn, *arrays) cuts the arrays' rows (axis 0) into blocks, runs fn on each block
and writes the blocks' results into whole outputs.  When fn treats rows independently
this is fn on the whole arrays, computed a block at a time.  Checked here: the results
equal one call on the whole arrays for every block size down to one row; the number of
calls; one call on CuPy whatever the size; the errors.  Then every operation that runs
through map_rows (GELU, attention, self-attention) is checked with blocks of a few values:
the same values and gradients as in one block, and float64 gradient checks.
"""
import numpy as np
import pytest

import minivit as mv
from conftest import require_cupy
from minivit import backend, blocks
from minivit.ops.attention import attention, self_attention

pytestmark = pytest.mark.usefixtures("fast_paths")     # the blocks are a fast path


def rowwise(x, y):
    """Elementwise, a reduction within each row, and a second output: what GELU,
    LayerNorm and attention do."""
    centred = x - x.mean(axis=(1, 2), keepdims=True)
    return np.exp(-centred * centred) * 3, y.max(axis=1) + x[:, 0, 0]


@pytest.mark.parametrize("block_values", [1, 15, 16, 40, 10 ** 9])
def test_map_rows_equals_one_call(rng, block_values):
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


def test_map_rows_single_output_and_default_block(rng, monkeypatch):
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


def test_map_rows_rejects_arrays_of_different_lengths(rng):
    with pytest.raises(ValueError, match=r"same length on axis 0, got shapes \[\(3, 2\), "
                                         r"\(4, 2\)\]"):
        blocks.map_rows(lambda a, b: a, np.ones((3, 2)), np.ones((4, 2)))


# --- the operations that run in blocks ----------------------------------------------------

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
def test_blocked_operations_equal_one_block(rng, monkeypatch, dtype):
    whole = _values_and_gradients(np.random.default_rng(1), dtype)
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 30)    # one image (row) per block
    blocked = _values_and_gradients(np.random.default_rng(1), dtype)
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    for got, want in zip(blocked, whole):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance)


def test_gradcheck_in_blocks(rng, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_VALUES", 30)
    q, k, v, qkv, mask = _attention_inputs(rng, np.float64)
    x = rng.standard_normal((5, 6, 7))
    for fn, inputs in ((mv.gelu, [x]), (lambda q, k, v: attention(q, k, v, mask), [q, k, v]),
                       (lambda qkv: self_attention(qkv, 2, mask), [qkv])):
        assert mv.gradcheck(fn, *(mv.tensor(a, requires_grad=True) for a in inputs)) < 1e-6
