"""What the stand-in counts: the things that cost time on a GPU but not on a CPU.

    reads          device-to-host reads (d2h): item(), float(), int(), bool(), get(),
                   asnumpy(), tolist(), printing, and boolean-mask indexing (its size is
                   read back).  Each one waits for every kernel queued before it.
    copies         host-to-device copies (h2d): asarray/array of host data, NumPy or list
                   indices, ndarray.set().
    launches       kernel launches: one per ufunc, function or computing method called on
                   device arrays (views such as reshape and basic slicing launch nothing),
                   plus the hidden copies below.
    bytes          device memory traffic of those launches (the rule below).
    hidden_copies  copies real CuPy makes that the code does not ask for, each also a
                   launch: `matmul`/`@` makes every operand of a product with more than
                   two axes C-contiguous in the compute dtype (float16 computes in
                   float32, and the result is then cast back: one more copy), and gives
                   cuBLAS 2-D operands that are C- or F-contiguous (others are copied);
                   a result that cannot be written into `out` directly is copied there;
                   a reshape (method or `cupy.reshape`) that cannot be a view copies.
                   As in CuPy, ufunc and reduction results are C-contiguous (NumPy's
                   follow their inputs' layout), so `(x.T * 2) @ y` copies nothing.

The byte rule: each launch moves the nbytes of its device-array inputs plus its outputs;
scalars count 0.  Ufuncs and functions: inputs + result (or `out`); reductions: input +
result; in-place functions (copyto): their device arguments; matmul: a + b + result;
copy, astype, ascontiguousarray, a ravel that copies: input + output; fill: output;
fancy indexing `x[i]`: the index arrays + the result twice (gathered, then written);
`x[key] = v`: the value and index arrays + the bytes written; scatter_add and ufunc.at:
the index arrays and value + the touched elements twice (read, then written); random
numbers: output; a hidden copy: its input + output.

`one_launch(fn, *args, nbytes=None, **kwargs)` runs a fused kernel's reference
computation as one launch: the launches, bytes and hidden copies inside are not counted
(reads and copies are: they are bugs in a kernel too); then one launch is counted with
`nbytes`, or by default the device arrays among the arguments (inside lists and tuples
too) plus those in the result.  One inside another counts as the outer one only.

Reads, copies and hidden copies are recorded with the call site (the first frame outside
the stand-in), so a failing budget test can say where they happen; launches and bytes
are only counted, and also attributed to call sites while `trace_launches` is on.

    from cupy import _standin
    _standin.reset()
    ...                                  # the code under test
    _standin.counts()                    # {"reads": 1, "copies": 0, "launches": 812, ...}
    _standin.counters.reads              # [("item", "examples/train_cifar.py:240 in ..."), ...]
    cupy.fake_stats(reset=True)          # {"d2h": 1, "h2d": 0, "launches": 812, ...}
"""
import collections
import os
import sys

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/fake_cupy


class Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.reads = []            # (what, call site)
        self.copies = []           # (what, call site)
        self.hidden_copies = []    # (what, call site)
        self.launches = 0
        self.bytes = 0
        self.launch_sites = collections.Counter()
        self.byte_sites = collections.Counter()


counters = Counters()
trace_launches = False
_inside_kernel = 0               # depth of one_launch calls under way


def call_site():
    """file:line in function of the innermost frame outside the stand-in."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_HERE):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def read(what):
    counters.reads.append((what, call_site()))


def copy(what):
    counters.copies.append((what, call_site()))


# The CUDA libraries CuPy loads on first use.  A machine with the driver and only some of
# NVIDIA's library wheels lacks the others; MINIVIT_FAKE_CUPY_MISSING=cusolver,cublas
# makes the stand-in fail the way CuPy then does, at the first call that needs one:
# every kernel needs NVRTC, matrix products cuBLAS, cupy.linalg cuSOLVER.
LIBRARIES = {"nvrtc": "libnvrtc.so.12", "cublas": "libcublas.so.12",
             "cusolver": "libcusolver.so.11"}
BLAS_FUNCTIONS = frozenset({"matmul", "dot", "vdot", "inner", "tensordot", "einsum"})


def require(library):
    missing = os.environ.get("MINIVIT_FAKE_CUPY_MISSING", "").replace(" ", "").split(",")
    if library in missing:
        name = LIBRARIES[library]
        raise RuntimeError(f"CuPy failed to load {name}: OSError: {name}: cannot open shared "
                           "object file: No such file or directory")


def launch(n=1, nbytes=0):
    require("nvrtc")
    if _inside_kernel:
        return
    counters.launches += n
    counters.bytes += int(nbytes)
    if trace_launches:
        site = call_site()
        counters.launch_sites[site] += n
        counters.byte_sites[site] += int(nbytes)


def hidden_copy(what, nbytes):
    """A copy real CuPy makes on its own: one launch moving `nbytes`."""
    launch(1, nbytes)
    if not _inside_kernel:
        counters.hidden_copies.append((what, call_site()))


def device_bytes(x):
    """nbytes of the device arrays in x (inside lists, tuples and dicts too)."""
    import cupy
    if isinstance(x, cupy.ndarray):
        return x.nbytes
    if isinstance(x, (list, tuple)):
        return sum(device_bytes(v) for v in x)
    if isinstance(x, dict):
        return sum(device_bytes(v) for v in x.values())
    return 0


def one_launch(fn, *args, nbytes=None, **kwargs):
    """fn(*args, **kwargs), counted as one kernel launch (see the module docstring)."""
    global _inside_kernel
    _inside_kernel += 1
    try:
        result = fn(*args, **kwargs)
    finally:
        _inside_kernel -= 1
    if nbytes is None:
        nbytes = device_bytes(args) + device_bytes(kwargs) + device_bytes(result)
    launch(1, nbytes)
    return result


def reset():
    counters.reset()


def counts():
    return {"reads": len(counters.reads), "copies": len(counters.copies),
            "launches": counters.launches, "bytes": counters.bytes,
            "hidden_copies": len(counters.hidden_copies)}


def fake_stats(reset=False):
    """cupy.fake_stats: the counts since the last fake_stats(reset=True) (or reset())."""
    c = counts()
    stats = {"d2h": c["reads"], "h2d": c["copies"], "launches": c["launches"],
             "bytes": c["bytes"], "hidden_copies": c["hidden_copies"]}
    if reset:
        counters.reset()
    return stats
