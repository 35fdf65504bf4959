"""cupy.linalg in the stand-in: CuPy's names, computed by numpy.linalg.  Each needs
cuSOLVER (MINIVIT_FAKE_CUPY_MISSING=cusolver makes every call fail as CuPy then does)."""
import numpy

import cupy
from cupy import _standin

_PUBLIC = frozenset(cupy._MANIFEST["cupy.linalg"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupy.linalg' has no attribute {name!r}")
    np_obj = getattr(numpy.linalg, name, None)
    if not callable(np_obj):
        raise NotImplementedError(f"cupy.linalg.{name}: not in the stand-in")
    if isinstance(np_obj, type):
        return np_obj
    function = cupy._function(name, np_obj)

    def needs_cusolver(*args, **kwargs):
        _standin.require("cusolver")
        return function(*args, **kwargs)
    needs_cusolver.__name__ = name
    globals()[name] = needs_cusolver
    return needs_cusolver
