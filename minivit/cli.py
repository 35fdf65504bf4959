"""How minivit's programs end when something a user can fix goes wrong: one line.

    from minivit import cli
    cli.install()          # first thing in a program's `if __name__ == "__main__":`

A missing or damaged file, a backend that is not there, a full disk, an exhausted
memory or Ctrl-C then ends the program with one line on stderr that says what
happened (and the error's own message names the file or flag), and a non-zero exit
status: 1 for errors, 130 for Ctrl-C.  Anything else is a bug in minivit and keeps its
full traceback.  MINIVIT_DEBUG=1 shows the traceback of every error.
"""
import argparse
import os
import sys

from minivit import backend
from minivit.backend import BackendError
from minivit.checkpoint import CheckpointError
from minivit.data.cifar import DataError

USER_ERRORS = (BackendError, CheckpointError, DataError, OSError, MemoryError)


def message(error):
    """The one line for an error a user can fix."""
    if isinstance(error, MemoryError):
        return (f"error: out of memory ({error or 'MemoryError'}); try a smaller --batch-size "
                "(or --accumulate) or a smaller model")
    if isinstance(error, OSError) and error.filename is not None:
        return f"error: {error.filename}: {error.strerror or error}"
    return f"error: {error}"


def _hook(kind, error, traceback):
    if os.environ.get("MINIVIT_DEBUG") == "1":
        return sys.__excepthook__(kind, error, traceback)
    sys.stdout.flush()
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)                       # the shell's status for Ctrl-C
    if issubclass(kind, USER_ERRORS):
        sys.stderr.write(message(error) + "\n")
        sys.stderr.flush()
        os._exit(1)
    return sys.__excepthook__(kind, error, traceback)


def install():
    """Make errors a user can fix end the program with one line (see the module docstring)."""
    sys.excepthook = _hook


def use_backend(name, local_rank=None):
    """Make `name` ("numpy" or "cupy") the default backend and return its device ("cpu" or
    "cuda"); exit with one line when it cannot be used here (CuPy or the GPU missing).
    `local_rank`: this process's rank on its machine, which picks its GPU (see backend.use)."""
    try:
        backend.use(name, local_rank)
    except BackendError as e:
        sys.exit(f"error: {e}")
    return backend.default_device()


def number(kind, low, low_ok=True, high=None):
    """An argparse type: a number of `kind` in [low, high) (or (low, ...) if not low_ok)."""
    def parse(text):
        value = kind(text)
        if value < low or (value == low and not low_ok) or (high is not None and value >= high):
            bounds = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high else "")
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value
    return parse


positive_int, count = number(int, 1), number(int, 0)
non_negative, probability = number(float, 0.0), number(float, 0.0, high=1.0)


def find_cifar10(data_dir, no_download=False):
    """CIFAR-10 from `data_dir` (--data-dir), or found in or downloaded to the cache folder
    when it is None; exit with one line when it is missing.  A --data-dir is where the
    data is, never a download target: a mistyped folder gives an error, not a fresh
    170 MB download there."""
    from minivit import data
    try:
        return data.find_or_download(data_dir, download=not no_download and data_dir is None)
    except (FileNotFoundError, DataError) as e:
        hint = (f" (--data-dir must hold the data; leave it out to find or download CIFAR-10 "
                f"in the cache folder {data.default_cache_dir()})"
                if data_dir and isinstance(e, FileNotFoundError) else "")
        sys.exit(f"error: {e}{hint}")
