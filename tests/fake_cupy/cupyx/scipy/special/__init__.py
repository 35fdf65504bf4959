"""cupyx.scipy.special in the stand-in: erf (through math.erf), CuPy's names only."""
import math

import numpy

import cupy

_PUBLIC = frozenset(cupy._MANIFEST["cupyx.scipy.special"])
_erf = numpy.vectorize(math.erf, otypes=[numpy.float64])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupyx.scipy.special' has no attribute {name!r}")
    raise NotImplementedError(f"cupyx.scipy.special.{name}: not in the stand-in")


def erf(x):
    a = cupy._operand(x)
    result = cupy._wrap(_erf(a).astype(a.dtype if a.dtype.kind == "f" else numpy.float64))
    cupy._standin.launch(nbytes=cupy._traffic((x,), {}, result))
    return result
