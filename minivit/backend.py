"""The array backend: the one module in minivit that imports NumPy or CuPy.

Everything else asks this module for the array module of the arrays it holds,

    xp = backend.array_module(x)      # numpy or cupy
    y = xp.exp(x)

so a single code path serves the CPU (NumPy) and the GPU (CuPy).

The scheme, in one sentence: the *default backend* decides where new tensors
are created, and `Tensor.to(device)` moves one explicitly.  The default is
NumPy; choose CuPy for a whole program with the environment variable
``MINIVIT_BACKEND=cupy`` or, in code, ``minivit.backend.use("cupy")``.
Devices are named ``"cpu"`` (NumPy) and ``"cuda"`` (CuPy); the backend names
``"numpy"`` and ``"cupy"`` are accepted as synonyms everywhere.
"""
import os
import pathlib
import sys

import numpy

# Device names and their synonyms.
_DEVICE_NAMES = {"cpu": "cpu", "numpy": "cpu", "np": "cpu",
                 "cuda": "cuda", "cupy": "cuda", "gpu": "cuda", "cp": "cuda"}

CUPY_INSTALL_HINT = ('install it with: pip install -e ".[cuda12]" for CUDA 12 '
                     '(cupy-cuda12x) or pip install -e ".[cuda13]" for CUDA 13 (cupy-cuda13x); '
                     "both bring the CUDA libraries from PyPI and need only the NVIDIA driver")

# The CUDA libraries minivit runs on, beyond the driver: NVRTC compiles CuPy's kernels,
# cuBLAS multiplies matrices.  (CuPy's random numbers are its own kernels; nothing here
# needs cuSOLVER, cuFFT or cuRAND.)  Each is one extra of NVIDIA's cuda-toolkit wheel.
CUDA_LIBRARIES = {"NVRTC": "nvrtc", "cuBLAS": "cublas"}


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


class DeviceMismatchError(RuntimeError):
    """An operation was given arrays that live on different devices."""


def device_name(name):
    """Normalise a device or backend name to "cpu" or "cuda"."""
    key, _, index = str(name).lower().partition(":")
    if key not in _DEVICE_NAMES:
        raise ValueError(f"unknown device {name!r}: expected 'cpu' (NumPy) or 'cuda' (CuPy)")
    if index not in ("", "0"):
        raise ValueError(f"device {name!r}: minivit uses one GPU, CuPy's current device; choose "
                         f"it with CUDA_VISIBLE_DEVICES={index} and ask for 'cuda'")
    return _DEVICE_NAMES[key]


# --- CuPy, imported only when asked for ------------------------------------------------

STANDIN = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fake_cupy"


def _use_standin():
    """MINIVIT_FAKE_CUPY=1: `import cupy` finds the strict NumPy-backed CuPy stand-in of
    tests/fake_cupy (a source checkout's), which proves the CuPy path without a GPU."""
    if not (STANDIN / "cupy" / "__init__.py").is_file():
        raise BackendError(f"MINIVIT_FAKE_CUPY=1 asks for the CuPy stand-in, which lives in "
                           f"a source checkout of minivit ({STANDIN} is missing)")
    loaded = sys.modules.get("cupy")
    if loaded is not None and not getattr(loaded, "_IS_STANDIN", False):
        raise BackendError("MINIVIT_FAKE_CUPY=1, but the real CuPy was imported first")
    if str(STANDIN) not in sys.path:
        sys.path.insert(0, str(STANDIN))


_checked = (None, None)     # (the CuPy module checked, None or the BackendError it gave)


def _check_cupy(cupy):
    """A CuPy that imports can still lack a device, or the CUDA libraries it compiles and
    multiplies with (NVRTC, cuBLAS): try each once and say which is missing."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing, or no device visible
        return BackendError(f"CuPy is installed but no CUDA device is present ({e}); the CuPy "
                            "backend needs an NVIDIA GPU with its driver. Use the NumPy "
                            "backend (MINIVIT_BACKEND=numpy) on this machine.")
    if count < 1:
        return BackendError("CuPy is installed but no CUDA device is present (0 devices "
                            "found); the CuPy backend needs an NVIDIA GPU. Use the NumPy "
                            "backend (MINIVIT_BACKEND=numpy) on this machine.")
    for what, library, probe in (
            ("compile a kernel", "NVRTC", lambda: cupy.arange(4, dtype="float32") * 2),
            ("multiply matrices", "cuBLAS", lambda: cupy.ones((2, 2), dtype="float32")
             @ cupy.ones((2, 2), dtype="float32"))):
        try:
            probe()
            cupy.cuda.Device().synchronize()
        except Exception as e:
            return BackendError(
                f"CuPy {getattr(cupy, '__version__', '?')} found a GPU but cannot {what}: "
                f"the CUDA {library} library is missing or does not match ({type(e).__name__}: "
                f"{e}). Install it with: {_library_install_command(cupy, library)}")
    return None


def _library_install_command(cupy, library):
    """The pip command that brings one CUDA library for this CuPy's CUDA major version."""
    try:
        major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception:  # the runtime itself unreadable: name the common case
        major = 12
    return f'pip install "cuda-toolkit[{CUDA_LIBRARIES[library]}]=={major}.*"'


def _load_cupy():
    """Import CuPy (the stand-in under MINIVIT_FAKE_CUPY=1), without checking the GPU."""
    if os.environ.get("MINIVIT_FAKE_CUPY") == "1":
        _use_standin()
    try:
        import cupy
    except ImportError as e:
        raise BackendError(f"the CuPy backend needs CuPy, which is not installed ({e}); "
                           f"{CUPY_INSTALL_HINT}") from None
    return cupy


def _import_cupy():
    """Import CuPy and make sure it can run on a CUDA device; say what is missing."""
    cupy = _load_cupy()
    global _checked
    if _checked[0] is not cupy:
        _checked = (cupy, _check_cupy(cupy))
    if _checked[1] is not None:
        raise _checked[1]
    return cupy


def uses_standin():
    """Whether the CuPy backend is the NumPy-backed stand-in of tests/fake_cupy
    (MINIVIT_FAKE_CUPY=1) rather than a GPU."""
    return os.environ.get("MINIVIT_FAKE_CUPY") == "1"


def cupy_unavailable_reason():
    """None when the CuPy backend works here, else the reason it does not (for test skips)."""
    try:
        _import_cupy()
    except BackendError as e:
        return str(e)
    return None


def _cupy_if_loaded():
    # An array can only be a CuPy array if CuPy has been imported by someone.
    return sys.modules.get("cupy")


def module_for(device):
    """The array module (numpy or cupy) that serves a device name."""
    return numpy if device_name(device) == "cpu" else _import_cupy()


# --- the default backend ---------------------------------------------------------------

_default_device = None      # resolved from MINIVIT_BACKEND on first use


def _device_from_environment():
    value = os.environ.get("MINIVIT_BACKEND") or "numpy"      # unset or empty: NumPy
    try:
        return device_name(value)
    except ValueError:
        raise BackendError(f"MINIVIT_BACKEND={value!r} is not a backend: set it to 'numpy' "
                           "(CPU) or 'cupy' (GPU), or leave it unset for NumPy") from None


def use(name, local_rank=None):
    """Make `name` ("numpy"/"cpu" or "cupy"/"cuda") the default backend for new tensors.

    `local_rank`, for one of several processes on a machine (MPI ranks): with CuPy this
    process takes GPU local_rank % (the GPUs it sees), so the ranks spread over the GPUs
    instead of all using GPU 0."""
    global _default_device
    device = device_name(name)
    if device == "cuda" and local_rank is not None:
        _select_gpu(_load_cupy(), local_rank)
    module_for(device)           # fails here, clearly, if CuPy or the GPU is missing
    _default_device = device


def _select_gpu(cupy, local_rank):
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver or no device: the check that follows says so
        return
    if count > 0:
        cupy.cuda.Device(local_rank % count).use()


def default_device():
    """ "cpu" or "cuda": where new tensors go (MINIVIT_BACKEND until use() says otherwise)."""
    global _default_device
    if _default_device is None:
        _default_device = _device_from_environment()
    return _default_device


def default_backend_name():
    """ "numpy" or "cupy": the default backend's name (for command-line defaults)."""
    return "numpy" if default_device() == "cpu" else "cupy"


def default_module():
    return module_for(default_device())


def synchronize(device=None):
    """Wait until the device has finished the work queued so far (for timing).  On CuPy
    that is the current stream's work: the null stream, or the stream a `with Stream():`
    block made current.  NumPy has nothing queued."""
    if device_name(device or default_device()) == "cuda":
        module_for("cuda").cuda.get_current_stream().synchronize()


def as_one_kernel(fn, *args, nbytes=None):
    """fn(*args), the reference computation of one hand-written kernel (minivit/kernels).
    On a GPU this is never called for speed; on the CuPy stand-in it is how a kernel runs:
    the stand-in counts it as the one launch it is, with its inputs and outputs as its
    bytes, instead of the reference's many."""
    cupy = _cupy_if_loaded()
    standin = getattr(cupy, "_standin", None) if getattr(cupy, "_IS_STANDIN", False) else None
    if standin is None or not hasattr(standin, "one_launch"):
        return fn(*args)
    return standin.one_launch(fn, *args, nbytes=nbytes)


# --- asking arrays about themselves ----------------------------------------------------

def is_array(x):
    if isinstance(x, numpy.ndarray):
        return True
    cupy = _cupy_if_loaded()
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_module(x):
    """numpy or cupy, whichever owns array `x` (NumPy for anything that is not CuPy)."""
    cupy = _cupy_if_loaded()
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    return numpy


def device_of(x):
    """ "cpu" for NumPy arrays, "cuda" for CuPy arrays."""
    return "cpu" if array_module(x) is numpy else "cuda"


def check_same_device(op_name, arrays):
    """Raise DeviceMismatchError if `arrays` do not all live on one device."""
    devices = [device_of(a) for a in arrays]
    if len(set(devices)) > 1:
        where = ", ".join(f"input {i} on {d} ({type(a).__module__.split('.')[0]}.ndarray)"
                          for i, (a, d) in enumerate(zip(arrays, devices)))
        raise DeviceMismatchError(
            f"{op_name}: inputs live on different devices: {where}. "
            "Move them to one device first, e.g. with tensor.to('cuda') or tensor.to('cpu').")


# --- creating and moving arrays --------------------------------------------------------

def asarray(data, dtype=None, device=None):
    """An array of `data` on `device` (default: the default backend's device)."""
    device = device or default_device()
    xp = module_for(device)
    if is_array(data) and array_module(data) is not xp:
        data = to_device(data, device)
    return xp.asarray(data, dtype=dtype)


def to_numpy(x):
    """A NumPy array with the values of `x` (copied from the GPU when it is a CuPy array)."""
    cupy = _cupy_if_loaded()
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy.asnumpy(x)
    return numpy.asarray(x)


def to_device(x, device):
    """`x` moved to `device` ("cpu" or "cuda"); returned unchanged when it is already there."""
    device = device_name(device)
    if device_of(x) == device:
        return x
    if device == "cpu":
        return to_numpy(x)
    return _import_cupy().asarray(x)


def scatter_add(target, index, values):
    """target[index] += values, where repeated indices add up (unbuffered), in place."""
    xp = array_module(target)
    if xp is numpy:
        numpy.add.at(target, index, values)
    else:
        import cupyx    # found next to cupy (the stand-in's, under MINIVIT_FAKE_CUPY=1)
        cupyx.scatter_add(target, index, values)
    return target


def random_normal(shape, seed, like):
    """Standard normal float64 samples of `shape` from a seeded host generator, on `like`'s device."""
    sample = numpy.random.default_rng(seed).standard_normal(shape)
    return to_device(sample, device_of(like))


def is_floating(x):
    return numpy.dtype(x.dtype).kind == "f"


def result_dtype(*dtypes_or_arrays):
    return numpy.result_type(*dtypes_or_arrays)


def generator(seed=None, device=None):
    """A seeded random generator on `device`: numpy's or cupy's default_rng(seed).

    Both have .random(size, dtype=...) and .standard_normal(size, dtype=...), so code
    that draws dropout masks or initial weights is the same on either backend."""
    return module_for(device or default_device()).random.default_rng(seed)


def keep_host_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A NumPy training step allocates and frees many temporaries of a few MB; by default
    glibc hands each one back to the OS (mmap/munmap) and the next allocation pays page
    faults for fresh zeroed pages (docs/performance.md has what that costs).  This raises the
    mmap threshold to its 32 MB maximum and stops trimming the heap, the same effect as
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 in the environment.
    Returns True when applied (Linux with glibc), False elsewhere.  Process-wide, so only
    programs call it (examples/train_cifar.py, the benchmarks), never the library itself.
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
