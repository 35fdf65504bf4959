"""cupy.random in the stand-in: default_rng and Generator with CuPy's method set only.

CuPy's Generator has random, standard_normal, integers, uniform and a few
distributions, but no permutation, shuffle, choice or normal: NumPy code that calls
those fails on a GPU, and fails here too.  The numbers come from NumPy's generator
(CuPy's differ), so tests compare statistics or seeds, never values across devices.
"""
import inspect

import numpy

import cupy
from cupy import _standin

_PUBLIC = frozenset(cupy._MANIFEST["cupy.random"])
_GENERATOR = cupy._MANIFEST["cupy.random.Generator"]


class Generator:
    """CuPy's Generator API over a NumPy generator; results are device arrays."""

    def __init__(self, bit_generator):
        self._g = numpy.random.Generator(bit_generator)

    def __dir__(self):
        return list(_GENERATOR)


def _generator_method(name):
    np_method = getattr(numpy.random.Generator, name)
    takes_dtype = "dtype" in inspect.signature(np_method).parameters

    def method(self, *args, dtype=None, **kwargs):
        if any(isinstance(a, numpy.ndarray) for a in list(args) + list(kwargs.values())):
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")
        out = kwargs.get("out")
        args, kwargs = cupy._unwrap(args), cupy._unwrap(kwargs)
        if dtype is not None and takes_dtype:
            kwargs["dtype"] = dtype
        r = np_method(self._g, *args, **kwargs)
        if dtype is not None and not takes_dtype:
            r = numpy.asarray(r).astype(dtype)
        result = cupy._wrap(r) if out is None else out
        cupy._standin.launch(nbytes=cupy._standin.device_bytes(result))
        return result
    method.__name__ = name
    return method


for _name in _GENERATOR:
    if hasattr(numpy.random.Generator, _name):
        setattr(Generator, _name, _generator_method(_name))


def default_rng(seed=None):
    if isinstance(seed, Generator):
        return seed
    if isinstance(seed, cupy.ndarray):
        raise TypeError("default_rng: seed must be an int, a sequence of ints or None")
    return Generator(numpy.random.PCG64(seed))


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupy.random' has no attribute {name!r}")
    np_func = getattr(numpy.random, name, None)
    if not callable(np_func) or isinstance(np_func, type):
        raise NotImplementedError(f"cupy.random.{name} exists in CuPy, but the stand-in does "
                                  "not implement it")

    def function(*args, **kwargs):
        result = cupy._wrap_result(np_func(*cupy._unwrap(args), **cupy._unwrap(kwargs)))
        _standin.launch(nbytes=_standin.device_bytes(result))
        return result
    function.__name__ = name
    globals()[name] = function
    return function
