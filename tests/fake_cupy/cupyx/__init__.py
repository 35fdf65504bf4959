"""cupyx in the stand-in: scatter_add/max/min, rsqrt, errstate; CuPy's names only."""
import contextlib
import importlib

import numpy

import cupy
from cupy import _standin

scipy = importlib.import_module("cupyx.scipy")

_PUBLIC = frozenset(cupy._MANIFEST["cupyx"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupyx' has no attribute {name!r}")
    raise NotImplementedError(f"cupyx.{name} exists in CuPy, but not in the stand-in")


def _scatter(ufunc, a, slices, value):
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    index = cupy._index(slices)
    _standin.launch(nbytes=cupy._scatter_bytes(a._a, index, value))
    ufunc.at(a._a, index, cupy._operand(value))


def scatter_add(a, slices, value):
    """a[slices] += value, where repeated indices add up (unbuffered)."""
    _scatter(numpy.add, a, slices, value)


def scatter_max(a, slices, value):
    _scatter(numpy.maximum, a, slices, value)


def scatter_min(a, slices, value):
    _scatter(numpy.minimum, a, slices, value)


def rsqrt(x, out=None):
    result = cupy._wrap(1 / numpy.sqrt(cupy._operand(x)))
    _standin.launch(nbytes=cupy._traffic((x,), {}, result))
    return result


@contextlib.contextmanager
def errstate(**kwargs):
    yield


def seterr(**kwargs):
    return {}


def geterr():
    return {}
