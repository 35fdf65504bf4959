"""A strict CuPy stand-in, backed by NumPy, for proving the CuPy path without a GPU.

minivit.backend imports this in place of CuPy when MINIVIT_FAKE_CUPY=1 (and only then).
It behaves like CuPy exactly where NumPy code usually goes wrong on a GPU:

- `cupy.ndarray` is its own type, not a NumPy subclass.  `numpy.asarray(x)` raises
  CuPy's TypeError ("Implicit conversion to a NumPy array is not allowed..."); a NumPy
  function called on it runs CuPy's function of the same name, or fails if CuPy has
  none; CuPy functions and operators refuse NumPy arrays ("Unsupported type").
- Only the names the real CuPy exports exist (manifest.json, written from the installed
  cupy-cuda12x by make_manifest.py); functions whose signature differs from NumPy's
  follow CuPy's (unravel_index takes a device array; Generator has no permutation).
- Reductions and indexing return 0-d arrays, never NumPy scalars.
- It counts device-to-host reads, host-to-device copies, kernel launches and their bytes,
  and the copies real CuPy makes unasked (matmul operands, reshapes that cannot be
  views), with call sites (see _standin.py), so tests can budget them.
  `cupy.fake_stats(reset=False)`, the one name CuPy lacks, returns these counts.

Prior art: GPAW's cpupy (GPAW_CPUPY=1) and array-api-strict's fake devices.
"""
import builtins
import json
import os

import numpy

from cupy import _standin

_IS_STANDIN = True
_MANIFEST = json.loads(open(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                         "manifest.json")).read())
_PUBLIC = frozenset(_MANIFEST["cupy"])
_STANDIN_NAMES = frozenset({"fake_stats"})            # the stand-in's own, not CuPy's
_UFUNCS = frozenset(_MANIFEST["ufuncs"])
__version__ = _MANIFEST["cupy_version"] + "+standin"

_SCALARS = (bool, int, float, complex, numpy.generic)
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


# --- moving between the wrapped array and raw NumPy -------------------------------------

def _wrap(a):
    """A device array around NumPy array `a` (NumPy scalars become 0-d arrays)."""
    out = ndarray.__new__(ndarray)
    out._a = a if isinstance(a, numpy.ndarray) else numpy.asarray(a)
    return out


def _wrap_result(r):
    if isinstance(r, (numpy.ndarray, numpy.generic)):
        return _wrap(r)
    if isinstance(r, tuple):
        return tuple(_wrap_result(x) for x in r)
    if isinstance(r, list):
        return [_wrap_result(x) for x in r]
    return r


def _c_order(r):
    """r with its arrays C-contiguous: CuPy allocates the outputs of its ufuncs and
    reductions C-contiguous, where NumPy follows the inputs' layout."""
    if isinstance(r, numpy.ndarray) and not r.flags.c_contiguous:
        return numpy.ascontiguousarray(r)
    if isinstance(r, tuple):
        return tuple(_c_order(x) for x in r)
    return r


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


def _operand(x):
    """The NumPy array behind a device array; scalars pass; host arrays are refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise _unsupported(x)
    return x


def _unwrap(x):
    """Device arrays inside (nested) arguments replaced by their NumPy arrays; host arrays
    refused, as CuPy refuses them (it never copies a NumPy operand to the device)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _has_device_array(x):
    if isinstance(x, ndarray):
        return True
    if isinstance(x, (list, tuple)):
        return builtins.any(_has_device_array(v) for v in x)
    return False


def _traffic(args, kwargs, result):
    """Bytes a launch moves: the device arrays among its inputs (`out` aside) and its
    result (or `out`)."""
    inputs = _standin.device_bytes(args) + builtins.sum(
        _standin.device_bytes(v) for k, v in kwargs.items() if k != "out")
    return inputs + _standin.device_bytes(result)


def _index_bytes(raw_key):
    """Bytes of the index arrays in an unwrapped index."""
    keys = raw_key if isinstance(raw_key, tuple) else (raw_key,)
    return builtins.sum(k.nbytes for k in keys if isinstance(k, numpy.ndarray))


def _is_view(r, inputs):
    """Whether every array in result r shares memory with one of the NumPy arrays
    `inputs` (a view: no kernel ran).  Results that are no arrays (shapes) count too."""
    parts = r if isinstance(r, (tuple, list)) else (r,)
    return builtins.all(not isinstance(p, (numpy.ndarray, numpy.generic)) or
                        isinstance(p, numpy.ndarray) and inputs and
                        (p.size == 0 or builtins.any(numpy.may_share_memory(p, a)
                                                     for a in inputs))
                        for p in parts)


def _inputs(x):
    """The NumPy arrays behind the device arrays in (nested) arguments."""
    if isinstance(x, ndarray):
        return [x._a]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _inputs(v)]
    if isinstance(x, dict):
        return [a for v in x.values() for a in _inputs(v)]
    return []


def _matmul_copies(a, b, out):
    """The operand copies CuPy's matmul makes before calling cuBLAS; the dtype it
    computes in if it then copies the result into `out` (or casts it back from float32
    for float16), else None."""
    if not (isinstance(a, ndarray) and isinstance(b, ndarray)) or not (a.ndim and b.ndim):
        return None
    dtype = result_dtype = numpy.promote_types(a.dtype, b.dtype)
    if builtins.max(a.ndim, b.ndim) <= 2:    # cuBLAS takes C- or F-contiguous matrices
        for x in (a, b):
            if x.dtype != dtype:
                _standin.hidden_copy("matmul operand cast", x.nbytes + x.size * dtype.itemsize)
            elif not (x._a.flags.c_contiguous or x._a.flags.f_contiguous):
                _standin.hidden_copy("matmul operand neither C- nor F-contiguous", 2 * x.nbytes)
    else:                                    # batched: C-contiguous in the compute dtype
        if dtype == numpy.float16:
            dtype = numpy.dtype(numpy.float32)
        for x in (a, b):
            if x.dtype != dtype:
                _standin.hidden_copy("matmul operand cast (batched)",
                                     x.nbytes + x.size * dtype.itemsize)
            elif not x._a.flags.c_contiguous:
                _standin.hidden_copy("matmul operand not C-contiguous (batched)", 2 * x.nbytes)
    if out is None:
        return dtype if dtype != result_dtype else None
    direct = (out._a.flags.c_contiguous and out.dtype == dtype and
              not numpy.may_share_memory(out._a, a._a) and
              not numpy.may_share_memory(out._a, b._a))
    return None if direct else dtype


def _host_copy(data, dtype=None, what="asarray"):
    """A new device array with the values of host data (a counted host-to-device copy)."""
    if isinstance(data, ndarray):
        raise TypeError("internal: not host data")
    if _has_device_array(data):
        raise ValueError("Unsupported dtype object")        # a list mixing device arrays
    a = numpy.array(data, dtype=dtype, copy=True)
    if a.dtype == object:
        raise ValueError(f"Unsupported dtype {a.dtype}")
    _standin.copy(what)
    return _wrap(a)


# --- functions and ufuncs ---------------------------------------------------------------

class _Ufunc:
    """A CuPy ufunc: calls NumPy's on the arrays behind device arrays, one launch each."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    def _run(self, method, args, kwargs):
        out = kwargs.get("out")
        if isinstance(out, tuple) and len(out) == 1:
            out = kwargs["out"] = out[0]
        for x in args:
            if not isinstance(x, (ndarray,) + _SCALARS):
                raise _unsupported(x)
        raw = [_operand(x) for x in args]
        kw = {k: _operand(v) if isinstance(v, (ndarray, numpy.ndarray)) else v
              for k, v in kwargs.items()}
        if self.__name__ in _standin.BLAS_FUNCTIONS:
            _standin.require("cublas")
        _standin.require("nvrtc")
        copy_from = _matmul_copies(*args, out if isinstance(out, ndarray) else None) \
            if self.__name__ == "matmul" and not method and len(args) == 2 else None
        r = getattr(self._u, method)(*raw, **kw) if method else self._u(*raw, **kw)
        result = out if isinstance(out, ndarray) else _wrap_result(_c_order(r))
        if copy_from is not None:
            _standin.hidden_copy("matmul result copied to out or cast",
                                 result.size * copy_from.itemsize + result.nbytes)
        _standin.launch(nbytes=_traffic(args, kwargs, result))
        return result

    def __call__(self, *args, **kwargs):
        return self._run(None, args, kwargs)

    def reduce(self, *args, **kwargs):
        return self._run("reduce", args, kwargs)

    def accumulate(self, *args, **kwargs):
        return self._run("accumulate", args, kwargs)

    def outer(self, *args, **kwargs):
        return self._run("outer", args, kwargs)

    def at(self, a, indices, b=None):
        if not isinstance(a, ndarray):
            raise _unsupported(a)
        args = (_unwrap(indices),) if b is None else (_unwrap(indices), _operand(b))
        _standin.launch(nbytes=_scatter_bytes(a._a, args[0], b))
        self._u.at(a._a, *args)

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


def _scatter_bytes(a, raw_key, value):
    """Bytes of a scatter into NumPy array a: index arrays and value, and the touched
    elements read and written."""
    return _index_bytes(raw_key) + _standin.device_bytes(value) + 2 * a[raw_key].nbytes


_ALLOCATING = frozenset({"empty", "empty_like"})     # memory only, no kernel


def _function(name, np_func):
    """CuPy's function `name`, computed by NumPy's: device arrays in, device arrays out;
    a result that is a view of an input (reshape, transpose, ...) launches nothing."""
    def function(*args, **kwargs):
        if name in _standin.BLAS_FUNCTIONS:
            _standin.require("cublas")
        out = kwargs.get("out")
        r = np_func(*_unwrap(args), **_unwrap(kwargs))
        result = out if isinstance(out, ndarray) else _wrap_result(r)
        inputs = _inputs((args, kwargs))
        if r is None and inputs:                   # in place (copyto, ...): a kernel
            _standin.launch(nbytes=_traffic(args, kwargs, None))
        elif out is None and _is_view(r, inputs) or name in _ALLOCATING:
            pass
        elif name == "reshape":
            _standin.hidden_copy("reshape that cannot be a view", 2 * result.nbytes)
        else:
            _standin.launch(nbytes=_traffic(args, kwargs, result))
        return result
    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"cupy.{name} (stand-in: numpy.{name} on the device arrays' data)"
    return function


def __getattr__(name):
    """Names CuPy has and NumPy computes are made on first use; others do not exist."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupy' has no attribute {name!r}")
    np_obj = getattr(numpy, name, None)
    if isinstance(np_obj, numpy.ufunc):
        obj = _Ufunc(np_obj)
    elif isinstance(np_obj, (type, float, int)) or np_obj is None and name == "newaxis":
        obj = np_obj                  # dtypes (float32, ...), finfo, constants (pi, inf, ...)
    elif callable(np_obj):
        obj = _function(name, np_obj)
    else:
        raise NotImplementedError(f"cupy.{name} exists in CuPy, but the stand-in does not "
                                  "implement it (tests/fake_cupy/cupy/__init__.py)")
    globals()[name] = obj
    return obj


def __dir__():
    return sorted(_PUBLIC | _STANDIN_NAMES)


def fake_stats(reset=False):
    """The stand-in's counts since the last fake_stats(reset=True): {"d2h", "h2d",
    "launches", "bytes", "hidden_copies"}; reset=True then zeroes them (not a CuPy name)."""
    return _standin.fake_stats(reset)


# --- creating arrays and moving them between host and device -----------------------------

def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        if dtype is None or numpy.dtype(dtype) == a.dtype:
            return a
        out = _wrap(a._a.astype(dtype))
        _standin.launch(nbytes=a.nbytes + out.nbytes)
        return out
    return _host_copy(a, dtype)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or numpy.dtype(dtype) == obj.dtype):
            return obj
        out = _wrap(numpy.array(obj._a, dtype=dtype, copy=True, ndmin=ndmin))
        _standin.launch(nbytes=obj.nbytes + out.nbytes)
        return out
    out = _host_copy(obj, dtype, what="array")
    if ndmin > out.ndim:
        out._a = out._a.reshape((1,) * (ndmin - out.ndim) + out.shape)
    return out


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        return _host_copy(a, dtype)
    if a.ndim and a._a.flags.c_contiguous and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a                                   # CuPy returns it as it is
    out = _wrap(numpy.ascontiguousarray(a._a, dtype=dtype))
    _standin.launch(nbytes=a.nbytes + out.nbytes)
    return out


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """The values of a device array in a new NumPy array: a device-to-host read."""
    if isinstance(a, ndarray):
        _standin.read("asnumpy")
        result = numpy.array(a._a, order=order, copy=True)
        if out is not None:
            out[...] = result
            return out
        return result
    return numpy.asarray(a, order=order)


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else numpy


def unravel_index(indices, dims, order="C"):
    """CuPy's signature: `indices` is a device array (a Python int fails, as in CuPy,
    where numpy.can_cast refuses Python ints)."""
    if not isinstance(indices, ndarray):
        raise TypeError("can_cast() does not support Python ints, floats, and complex "
                        "because the result used to depend on the value.\nThis change was "
                        "part of adopting NEP 50, we may explicitly allow them again in "
                        f"the future. (cupy.unravel_index got {type(indices).__name__})")
    _standin.read("unravel_index")      # `(indices < 0).any()` in CuPy synchronises
    result = _wrap_result(numpy.unravel_index(indices._a, dims, order=order))
    _standin.launch(nbytes=_traffic((indices,), {}, result))
    return result


def allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    result = _wrap(numpy.asarray(numpy.allclose(_operand(a), _operand(b), rtol, atol, equal_nan)))
    _standin.launch(nbytes=_traffic((a, b), {}, result))
    return result


def array_equal(a1, a2, equal_nan=False):
    result = _wrap(numpy.asarray(numpy.array_equal(_operand(a1), _operand(a2), equal_nan)))
    _standin.launch(nbytes=_traffic((a1, a2), {}, result))
    return result


def is_available():
    return True


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


_memory_pool = _MemoryPool()


def get_default_memory_pool():
    return _memory_pool


def get_default_pinned_memory_pool():
    return _memory_pool


# --- the array ---------------------------------------------------------------------------

_VIEW_METHODS = {"reshape", "transpose", "swapaxes", "squeeze", "view", "diagonal"}
_READ_METHODS = {"tolist", "tobytes", "tofile", "dump", "dumps"}


def _is_basic(key):
    """Whether an index is basic (ints, slices, None, Ellipsis): a view, no launch."""
    key = key if isinstance(key, tuple) else (key,)
    return builtins.all(k is None or k is Ellipsis or
                        isinstance(k, (slice, int, numpy.integer)) and
                        not isinstance(k, (bool, numpy.bool_)) for k in key)


def _index(key):
    """An index with device arrays unwrapped; host arrays and lists are copied to the
    device first, as CuPy does; a boolean device mask is a read (CuPy reads its count)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        if key.dtype == numpy.bool_:
            _standin.read("boolean mask index")
        return key._a
    if isinstance(key, (numpy.ndarray, list)):
        _standin.copy("host index")
        return numpy.asarray(key)
    return key


class ndarray:
    """A device array: the values live in `_a` (NumPy), out of reach of NumPy itself."""

    __array_priority__ = 100.0        # CuPy's: a Tensor (priority 1000) handles `x * t`
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = numpy.empty(shape, dtype=dtype, order=order)

    # facts
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(self._a.mT))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))

    @property
    def device(self):
        from cupy import cuda
        return cuda.Device(0)

    # no implicit trip to the host
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method not in ("__call__", "outer", "at", "reduce", "accumulate", "reduceat"):
            return NotImplemented
        try:
            func = globals()["__getattr__"](ufunc.__name__) if ufunc.__name__ not in globals() \
                else globals()[ufunc.__name__]
        except (AttributeError, NotImplementedError):
            return NotImplemented
        if method != "__call__":
            func = getattr(func, method)
        for x in inputs + tuple(kwargs.get("out", ())):
            if not isinstance(x, (ndarray, numpy.ndarray) + _SCALARS):
                return NotImplemented
        return func(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        import sys
        module = sys.modules[__name__]
        try:
            for part in func.__module__.split(".")[1:]:
                module = getattr(module, part)
            cupy_func = getattr(module, func.__name__)
        except (AttributeError, NotImplementedError):
            return NotImplemented
        if not builtins.all(issubclass(t, (ndarray, numpy.ndarray)) for t in types):
            return NotImplemented
        return cupy_func(*args, **kwargs)

    # reads: each one waits for the device
    def get(self, stream=None, order="C", out=None, blocking=True):
        return asnumpy(self, order=order, out=out)

    def item(self, *args):
        _standin.read("item")
        return self._a.item(*args)

    def __float__(self):
        _standin.read("float")
        return float(self._a)

    def __int__(self):
        _standin.read("int")
        return int(self._a)

    def __complex__(self):
        _standin.read("complex")
        return complex(self._a)

    def __bool__(self):
        if self.size != 1:
            return bool(self._a)          # NumPy's errors for ambiguous truth values
        _standin.read("bool")
        return bool(self._a)

    def __repr__(self):
        _standin.read("repr")
        return repr(self._a)

    def __str__(self):
        _standin.read("str")
        return str(self._a)

    def __format__(self, spec):
        _standin.read("format")
        return format(self._a, spec)

    def __reduce__(self):
        _standin.read("pickle")
        return (_wrap, (self._a.copy(),))

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("Shape or dtype mismatch")
        _standin.copy("set")
        self._a[...] = arr

    # containers
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key):
        basic = _is_basic(key)
        raw_key = _index(key)
        r = self._a[raw_key]
        if not basic:
            _standin.launch(nbytes=_index_bytes(raw_key) + 2 * r.nbytes)
        return _wrap(r)

    def __setitem__(self, key, value):
        basic = _is_basic(key)
        raw_key = _index(key)
        if isinstance(value, numpy.ndarray):
            if basic:
                if value.ndim != 0:
                    raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
                value = value.item()
            else:
                _standin.copy("host value")
        elif isinstance(value, ndarray):
            value = value._a
        elif not isinstance(value, _SCALARS):
            raise _unsupported(value)
        _standin.launch(nbytes=_index_bytes(raw_key) + self._a[raw_key].nbytes +
                        (value.nbytes if isinstance(value, numpy.ndarray) else 0))
        self._a[raw_key] = value

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and numpy.dtype(dtype) == self.dtype:
            return self
        out = _wrap(self._a.astype(dtype, order=order, copy=True))
        _standin.launch(nbytes=self.nbytes + out.nbytes)
        return out

    def copy(self, order="C"):
        _standin.launch(nbytes=2 * self.nbytes)
        return _wrap(self._a.copy(order=order))

    def fill(self, value):
        if isinstance(value, numpy.ndarray):
            if value.ndim:
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        _standin.launch(nbytes=self.nbytes)
        self._a.fill(_operand(value))

    def ravel(self, order="C"):
        r = self._a.ravel(order)
        if not _is_view(r, [self._a]):
            _standin.launch(nbytes=self.nbytes + r.nbytes)
        return _wrap(r)

    def scatter_add(self, slices, value):
        import cupyx
        cupyx.scatter_add(self, slices, value)

    def __dir__(self):
        return sorted(set(_MANIFEST["cupy.ndarray"]) | {n for n in vars(ndarray)
                                                        if n.startswith("__")})


def _method(name):
    np_method = getattr(numpy.ndarray, name)

    def method(self, *args, **kwargs):
        if name in _READ_METHODS:
            _standin.read(name)
            return _wrap_result(np_method(self._a, *_unwrap(args), **_unwrap(kwargs)))
        r = np_method(self._a, *_unwrap(args), **_unwrap(kwargs))
        if name == "reshape":
            result = _wrap_result(r)
            if not _is_view(r, [self._a]):
                _standin.hidden_copy("reshape that cannot be a view", 2 * result.nbytes)
        elif name in _VIEW_METHODS:
            result = _wrap_result(r)
        else:
            result = _wrap_result(r if "out" in kwargs else _c_order(r))
            _standin.launch(nbytes=_traffic((self,) + args, kwargs, result))
        return result
    method.__name__ = name
    return method


for _name in _MANIFEST["cupy.ndarray"]:
    if _name not in vars(ndarray) and callable(getattr(numpy.ndarray, _name, None)):
        setattr(ndarray, _name, _method(_name))


def _operator(ufunc_name, reflected=False, inplace=False):
    def op(self, other):
        if not inplace and (getattr(other, "__array_ufunc__", 0) is None or
                            getattr(other, "__array_priority__", 0) > self.__array_priority__
                            and not isinstance(other, (ndarray, numpy.ndarray))):
            return NotImplemented
        func = __getattr__(ufunc_name) if ufunc_name not in globals() else globals()[ufunc_name]
        if inplace:
            return func(self, other, out=self)
        return func(other, self) if reflected else func(self, other)
    return op


for _op, _ufunc in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                    ("truediv", "true_divide"), ("floordiv", "floor_divide"),
                    ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
                    ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"),
                    ("lshift", "left_shift"), ("rshift", "right_shift")):
    setattr(ndarray, f"__{_op}__", _operator(_ufunc))
    setattr(ndarray, f"__r{_op}__", _operator(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_op}__", _operator(_ufunc, inplace=True))
for _op, _ufunc in (("lt", "less"), ("le", "less_equal"), ("eq", "equal"),
                    ("ne", "not_equal"), ("gt", "greater"), ("ge", "greater_equal")):
    setattr(ndarray, f"__{_op}__", _operator(_ufunc))
for _op, _ufunc in (("neg", "negative"), ("pos", "positive"), ("abs", "absolute"),
                    ("invert", "invert")):
    setattr(ndarray, f"__{_op}__", (lambda u: lambda self: __getattr__(u)(self))(_ufunc))

import importlib  # noqa: E402  (the subpackages use ndarray)

cuda = importlib.import_module("cupy.cuda")
linalg = importlib.import_module("cupy.linalg")
random = importlib.import_module("cupy.random")
