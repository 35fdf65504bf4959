"""cupy.linalg in the stand-in: CuPy's names, computed by numpy.linalg."""
import numpy

import cupy

_PUBLIC = frozenset(cupy._MANIFEST["cupy.linalg"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupy.linalg' has no attribute {name!r}")
    np_obj = getattr(numpy.linalg, name, None)
    if not callable(np_obj):
        raise NotImplementedError(f"cupy.linalg.{name}: not in the stand-in")
    obj = np_obj if isinstance(np_obj, type) else cupy._function(name, np_obj)
    globals()[name] = obj
    return obj
