"""Fast path (CPU): row-wise computations a cache-sized block of rows at a time.

NumPy runs an expression such as GELU's x * (1 + erf(x / sqrt 2)) / 2 one whole-array
operation at a time, each streaming the whole array from main memory and back.
`map_rows` runs the same chain on blocks of rows small enough (about 64K values, 256 KB
of float32) that every temporary stays in the core's cache, so only the first read and
the last write go to memory.

It needs `fn` to treat rows independently: elementwise functions, and reductions along
the other axes (softmax over keys, attention per image and head).  Then every row goes
through exactly the operations it would on the whole arrays, and the result is the same.
The reference is fn(*arrays) itself, which is what runs on CuPy (a GPU kernel streams
the data anyway; blocks would only multiply the launches) and with the "blocks" fast
path off.
"""
from minivit import backend, fast

BLOCK_VALUES = 1 << 16       # values of the largest input in one block (256 KB of float32)


def map_rows(fn, *arrays, block_values=None):
    """fn(*arrays), computed block of rows by block of rows on the CPU.

    Every array has the same length n on axis 0, and `fn` maps blocks of them (rows
    i0..i1 of each) to an array or a tuple of arrays with those rows on axis 0.  Returns
    what fn(*arrays) returns.  A block holds about `block_values` values of the largest
    input (at least one row), BLOCK_VALUES unless given.  On CuPy, or when one block
    holds everything, fn runs once.
    """
    block_values = block_values or BLOCK_VALUES
    if arrays[0].ndim == 0:
        return fn(*arrays)
    n = arrays[0].shape[0]
    if any(a.shape[:1] != (n,) for a in arrays):
        raise ValueError(f"map_rows: every array needs the same length on axis 0, got shapes "
                         f"{[tuple(a.shape) for a in arrays]}")
    rows = max(block_values // max(max(a.size for a in arrays) // max(n, 1), 1), 1)
    if rows >= n or not fast.enabled("blocks") or any(backend.device_of(a) != "cpu"
                                                      for a in arrays):
        return fn(*arrays)
    outs = None
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        results = fn(*(a[block] for a in arrays))
        single = not isinstance(results, tuple)
        results = (results,) if single else results
        if outs is None:                                     # the first block fixes the
            np = backend.module_for("cpu")                    # shapes
            outs = tuple(np.empty((n,) + r.shape[1:], r.dtype) for r in results)
        for out, r in zip(outs, results):
            out[block] = r
    return outs[0] if single else outs
