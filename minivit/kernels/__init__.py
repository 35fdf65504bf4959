"""Hand-written CUDA kernels: the GPU's fast paths for the passes that stream most.

On a GPU, a training step of a small ViT is bound by memory traffic and kernel launches,
not by its FLOPs.  The reference GELU, for example, is a dozen elementwise array
operations: a dozen launches, each reading and writing the whole activation.  A kernel
here does such a chain in one pass.  Each one is a fast path beside the reference it
replaces (minivit/fast.py), defined where that reference lives:

    gelu_kernel = kernels.Kernel("gelu_erf_forward", "gelu.cu", launch=..., reference=gelu_erf)

- Its CUDA C source is a file in this folder (`extern "C" __global__` functions, no
  headers), compiled by NVRTC through CuPy on first use.  `python -m minivit.kernels
  --compile-only` compiles every source for sm_80, sm_90 and sm_100 on a machine with no
  GPU.
- The first call in a process checks the kernel against its reference on a small slice of
  the real input, on the device.  If they disagree beyond the kernel's tolerance, or the
  kernel fails to compile or launch, one warning line names the kernel and the error, and
  the reference runs from then on: a kernel bug never crashes a run or changes its numbers.
- On the CuPy stand-in (MINIVIT_FAKE_CUPY=1) a kernel runs its reference, counted as the
  one launch it would be, with its inputs plus outputs as its bytes.
- Kernels take float32 CUDA arrays, what training runs in.  For anything else, and with
  MINIVIT_KERNELS=0 or MINIVIT_REFERENCE=1, the reference runs.
- Each kernel has an example input at a training-like size (`example(xp) -> args`), on
  which the GPU tests compare it with its reference and benchmarks/gpu_report.py times it.
"""
import os
import pathlib
import sys

from minivit import backend, fast

FOLDER = pathlib.Path(__file__).resolve().parent
OPTIONS = ("--std=c++14",)            # NVRTC's options, on the GPU and in --compile-only
BLOCK = 256                           # threads per block of the elementwise kernels
KERNELS = {}                          # name -> Kernel: every kernel defined so far


def on():
    """Whether kernels may run at all (MINIVIT_KERNELS=0 or the reference switch: no)."""
    return os.environ.get("MINIVIT_KERNELS", "1") != "0" and fast.enabled("kernels")


def usable(*arrays):
    """Whether a kernel may take these arrays: kernels on, each a float32 CUDA array."""
    return on() and all(backend.device_of(a) == "cuda" and a.dtype.name == "float32"
                        for a in arrays)


def blocks(n, block=BLOCK):
    """The grid that covers n items with `block` threads each."""
    return ((n + block - 1) // block,)


def source(path):
    """The CUDA source of a .cu file with each `#include "NAME"` replaced by the file NAME
    of this folder (warp.cuh), so NVRTC (and CuPy's cache of compiled kernels, keyed by
    the source) sees the whole program."""
    lines = []
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith('#include "'):
            line = (FOLDER / line.split('"')[1]).read_text()
        lines.append(line)
    return "\n".join(lines) + "\n"


_modules = {}


def function(file, name):
    """The compiled kernel `name` from source `file` (CuPy compiles a file once, lazily)."""
    module = _modules.get(file)
    if module is None:
        cupy = backend.module_for("cuda")
        module = cupy.RawModule(code=source(FOLDER / file), options=OPTIONS)
        _modules[file] = module
    return module.get_function(name)


def leading(*positions, n=8):
    """A `sample` for a kernel's self-check: the first n rows of the arguments at
    `positions`, the other arrays whole; all copied, so a kernel that writes in place
    leaves the real input alone."""
    def sample(args):
        return tuple(a[:n].copy() if i in positions else
                     a.copy() if backend.is_array(a) else a for i, a in enumerate(args))
    return sample


def normal(xp, *shapes, seed=0):
    """An `example` helper: float32 standard normal arrays of these shapes on xp's device,
    the same every time (a fixed seed)."""
    rng = xp.random.default_rng(seed)
    return tuple(rng.standard_normal(shape, dtype="float32") for shape in shapes)


def _arrays(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


class Kernel:
    """One CUDA kernel, beside the reference computation it must equal.

    launch(*args) and reference(*args) take the same arguments and return the same
    arrays (a tuple if several; a kernel that writes in place returns what it wrote).
    sample(args) -> a small copy of args for the self-check; rtol/atol: how closely the
    kernel must match the reference there (float32 arithmetic in another order).
    example(xp) -> args: an input at a training-like size on xp's device, for the GPU
    tests and benchmarks/gpu_report.py."""

    def __init__(self, name, file, launch, reference, sample=None, rtol=1e-4, atol=1e-5,
                 example=None):
        self.name, self.file = name, file
        self.launch, self.reference = launch, reference
        self.sample = sample or leading(0)
        self.rtol, self.atol = rtol, atol
        self.example = example
        self.status = None            # None: not checked yet; "ok"; or why it is off
        KERNELS[name] = self

    def __call__(self, *args):
        if self.status is None:
            self.check(args)
        if self.status == "ok":
            try:
                return self.run(*args)
            except Exception as e:  # a launch that fails later: say so once, go on
                self._turn_off(f"{type(e).__name__}: {e}")
        return self.reference(*args)

    def run(self, *args):
        """The kernel itself; on the CuPy stand-in, its reference counted as one launch."""
        if backend.uses_standin():
            return backend.as_one_kernel(self.reference, *args)
        return self.launch(*args)

    def compare(self, args):
        """Kernel and reference on `args`: None when they agree within rtol/atol, else what
        differs.  One device read when they agree, whatever the number of outputs; a
        kernel that fails to compile or launch raises."""
        got = _arrays(self.run(*args))
        want = _arrays(self.reference(*args))
        if len(got) != len(want):
            return f"{len(got)} outputs, the reference gives {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape:
                return f"output {i} has shape {g.shape}, the reference's {w.shape}"
        xp = backend.array_module(want[0])
        close = [xp.allclose(g, w, rtol=self.rtol, atol=self.atol) for g, w in zip(got, want)]
        agree = close[0]
        for c in close[1:]:
            agree = agree & c
        if bool(agree):
            return None
        for i, (g, w, c) in enumerate(zip(got, want, close)):
            if not bool(c):
                worst = float(xp.max(xp.abs(g.astype("float64") - w)))
                return (f"output {i} differs from the reference by up to {worst:.3g} "
                        f"(tolerance rtol {self.rtol:g}, atol {self.atol:g})")
        return "the outputs differ from the reference"

    def check(self, args):
        """The self-check: kernel and reference on a small slice of `args`, on the device.
        Sets status to "ok", or turns the kernel off with one warning line."""
        try:
            problem = self.compare(self.sample(args))
        except Exception as e:  # compile errors, launch errors alike
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            self.status = "ok"
        else:
            self._turn_off(problem)

    def _turn_off(self, reason):
        self.status = reason.splitlines()[0] if reason else "failed"
        print(f"minivit: CUDA kernel {self.name} is off, the reference runs instead: "
              f"{self.status}", file=sys.stderr, flush=True)


def reset():
    """Forget every kernel's self-check (the next call checks again)."""
    for kernel in KERNELS.values():
        kernel.status = None
