"""cupy.cuda in the stand-in: pretend devices (runtime.py), streams that count their
synchronisations, and events that keep time."""
import time

import cupy
from cupy.cuda import runtime

_PUBLIC = frozenset(cupy._MANIFEST["cupy.cuda"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cupy.cuda' has no attribute {name!r}")
    raise NotImplementedError(f"cupy.cuda.{name} exists in CuPy, but not in the stand-in")


def is_available():
    return True


def get_device_id():
    return runtime.getDevice()


def get_local_runtime_version():
    return runtime.runtimeGetVersion()


class Device:
    def __init__(self, device=None):
        device = runtime.getDevice() if device is None else device
        if not 0 <= device < runtime.getDeviceCount():
            raise runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.id = device

    compute_capability = "90"
    mem_info = property(lambda self: runtime.memGetInfo())

    def synchronize(self):
        pass

    def use(self):
        runtime.setDevice(self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    """Work on the stand-in is done when a call returns; a stream only counts how often it
    was synchronised, so tests can check that timing code waits on the right one."""
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.synchronized = 0
        self._outer = []

    def synchronize(self):
        self.synchronized += 1

    def __enter__(self):
        global _current
        self._outer.append(_current)
        _current = self
        return self

    def __exit__(self, *exc):
        global _current
        _current = self._outer.pop()
        return False


Stream.null = _current = Stream(null=True)


def get_current_stream(device_id=-1):
    return _current


class Event:
    """Records the host clock: on the stand-in every kernel has finished when it returns."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        pass

    done = property(lambda self: True)


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events."""
    return (end_event._time - start_event._time) * 1000.0
