"""What the stand-in counts: the things that cost time on a GPU but not on a CPU.

    reads     device-to-host reads: item(), float(), int(), bool(), get(), asnumpy(),
              tolist(), printing, and boolean-mask indexing (its size is read back).
              Each one waits for every kernel queued before it.
    copies    host-to-device copies: asarray/array of host data, NumPy or list indices,
              ndarray.set().
    launches  kernel launches: one per ufunc, function or computing method called on
              device arrays (views such as reshape and basic slicing launch nothing).

Reads and copies are recorded with the call site (the first frame outside the stand-in),
so a failing budget test can say where they happen; launches are only counted, and
also attributed to call sites while `trace_launches` is on.

    from cupy import _standin
    _standin.reset()
    ...                                  # the code under test
    _standin.counts()                    # {"reads": 1, "copies": 0, "launches": 812}
    _standin.counters.reads              # [("item", "examples/train_cifar.py:240 in ..."), ...]
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
        self.launches = 0
        self.launch_sites = collections.Counter()


counters = Counters()
trace_launches = False


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


def launch(n=1):
    require("nvrtc")
    counters.launches += n
    if trace_launches:
        counters.launch_sites[call_site()] += n


def reset():
    counters.reset()


def counts():
    return {"reads": len(counters.reads), "copies": len(counters.copies),
            "launches": counters.launches}
