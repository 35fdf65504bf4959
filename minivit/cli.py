"""How minivit's programs end when something a user can fix goes wrong: one line.

    from minivit import cli
    cli.install()          # first thing in a program's `if __name__ == "__main__":`

A missing or damaged file, a backend that is not there, a full disk, an exhausted
memory or Ctrl-C then ends the program with one line on stderr that says what
happened (and the error's own message names the file or flag), and a non-zero exit
status: 1 for errors, 130 for Ctrl-C.  Anything else is a bug in minivit and keeps its
full traceback.  MINIVIT_DEBUG=1 shows the traceback of every error.
"""
import os
import sys

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
