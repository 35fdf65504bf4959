"""cupy.cuda in the stand-in: one pretend device, streams and events that keep time."""
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
    return 0


def get_local_runtime_version():
    return runtime.runtimeGetVersion()


class Device:
    def __init__(self, device=None):
        if device not in (None, 0):
            raise runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.id = 0

    compute_capability = "90"
    mem_info = property(lambda self: runtime.memGetInfo())

    def synchronize(self):
        pass

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return "<CUDA Device 0>"


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=None):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


def get_current_stream(device_id=-1):
    return Stream.null


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
