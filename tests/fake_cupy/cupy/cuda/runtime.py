"""cupy.cuda.runtime in the stand-in: pretend devices, one unless
MINIVIT_FAKE_CUPY_DEVICES=N asks for N (to test how processes share GPUs)."""
import os

import cupy

_PUBLIC = frozenset(cupy._MANIFEST["cupy.cuda.runtime"])
_TOTAL = 80 * 2 ** 30


class CUDARuntimeError(RuntimeError):
    pass


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupy.cuda.runtime' has no attribute {name!r}")
    raise NotImplementedError(f"cupy.cuda.runtime.{name} exists in CuPy, but not in the stand-in")


def getDeviceCount():
    return int(os.environ.get("MINIVIT_FAKE_CUPY_DEVICES", "1"))


def getDevice():
    return current_device


def setDevice(device):
    if not 0 <= device < getDeviceCount():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    global current_device
    current_device = device


current_device = 0


def deviceSynchronize():
    pass


def runtimeGetVersion():
    return 12080


def driverGetVersion():
    return 12080


def memGetInfo():
    return (_TOTAL, _TOTAL)


def getDeviceProperties(device):
    if not 0 <= device < getDeviceCount():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return {"name": b"CuPy stand-in (NumPy on the CPU)", "totalGlobalMem": _TOTAL,
            "major": 9, "minor": 0, "multiProcessorCount": 1}
