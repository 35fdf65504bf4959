"""What minivit's programs share on the command line: checked flags, one-line errors,
progress lines, Ctrl-C, a locked output folder.

    from minivit import cli
    cli.install()          # first thing in a program's `if __name__ == "__main__":`

A missing or damaged file, a backend that is not there, a full disk, an exhausted
memory or Ctrl-C then ends the program with one line on stderr that says what
happened (and the error's own message names the file or flag), and a non-zero exit
status: 1 for errors, 130 for Ctrl-C.  Output piped into a program that stops reading
(`| head`) ends it quietly, as it ends Unix tools.  Anything else is a bug in minivit
and keeps its full traceback.  MINIVIT_DEBUG=1 shows the traceback of every error.

Flags: `number(...)` and the types made from it (positive_int, positive, probability,
...) refuse anything but a finite number in range, and `path` expands `~` and refuses
an empty path, all at parse time with argparse's one-line usage error (exit status 2).
"""
import argparse
import atexit
import contextlib
import math
import os
import pathlib
import sys
import time

from minivit import backend
from minivit.backend import BackendError
from minivit.checkpoint import CheckpointError
from minivit.data.cifar import DataError

USER_ERRORS = (BackendError, CheckpointError, DataError, OSError, MemoryError)
INTERRUPTED = 130           # the shell's status for Ctrl-C (128 + SIGINT)
BROKEN_PIPE = 141           # and for a reader that went away (128 + SIGPIPE), as `yes | head`


def message(error):
    """The one line for an error a user can fix."""
    if isinstance(error, MemoryError):
        return (f"error: out of memory ({error or 'MemoryError'}); try a smaller --batch-size "
                "(or --accumulate) or a smaller model")
    if isinstance(error, OSError) and error.filename is not None:
        return f"error: {error.filename}: {error.strerror or error}"
    return f"error: {error}"


def _quiet_exit_on_broken_pipe():
    """stdout's reader is gone: end now, saying nothing (os._exit flushes nothing more)."""
    os._exit(BROKEN_PIPE)


def _flush_stdout():
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_exit_on_broken_pipe()
    except (OSError, ValueError):     # closed or unwritable: nothing more to say there
        pass


def _hook(kind, error, traceback):
    if os.environ.get("MINIVIT_DEBUG") == "1":
        return sys.__excepthook__(kind, error, traceback)
    if issubclass(kind, BrokenPipeError):
        _quiet_exit_on_broken_pipe()
    _flush_stdout()
    if issubclass(kind, KeyboardInterrupt):
        say_interrupted(str(error) or None)
        os._exit(INTERRUPTED)
    if issubclass(kind, USER_ERRORS):
        end_line()
        sys.stderr.write(message(error) + "\n")
        sys.stderr.flush()
        os._exit(1)
    end_line()
    return sys.__excepthook__(kind, error, traceback)


def install():
    """Make errors a user can fix end the program with one line (see the module docstring)."""
    sys.excepthook = _hook
    atexit.register(_flush_stdout)     # a pipe that closed after the last print: quiet too


def say_interrupted(what=None):
    """The Ctrl-C line on stderr, on a line of its own: "interrupted" and what exists."""
    end_line()
    sys.stderr.write(f"interrupted: {what}\n" if what else "interrupted\n")
    sys.stderr.flush()


def use_backend(name, local_rank=None):
    """Make `name` ("numpy" or "cupy") the default backend and return its device ("cpu" or
    "cuda"); exit with one line when it cannot be used here (CuPy or the GPU missing).
    `local_rank`: this process's rank on its machine, which picks its GPU (see backend.use)."""
    try:
        backend.use(name, local_rank)
    except BackendError as e:
        sys.exit(f"error: {e}")
    return backend.default_device()


def backend_text(name):
    """A backend's name as the programs print it: the CuPy stand-in (MINIVIT_FAKE_CUPY=1) is
    named, never passed off as a GPU."""
    if backend.device_name(name) == "cuda" and backend.uses_standin():
        return f"{name} (the CuPy stand-in, MINIVIT_FAKE_CUPY=1: NumPy underneath, no GPU)"
    return name


# --- flags -----------------------------------------------------------------------------------

def number(kind, low, low_ok=True, high=None, high_ok=False, expected=None):
    """An argparse type: a finite number of `kind` (int or float) from `low` (excluded if not
    low_ok) up to `high` (excluded unless high_ok).  Anything else -- text, NaN, an
    infinity, a value out of range -- is argparse's usage error naming what was expected
    (`expected`, e.g. "a positive number")."""
    if expected is None:
        expected = (f"{'an integer' if kind is int else 'a number'} "
                    f"{'>=' if low_ok else '>'} {low}"
                    + (f" and {'<=' if high_ok else '<'} {high}" if high is not None else ""))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or value < low
                or (value == low and not low_ok)
                or (high is not None and (value > high or (value == high and not high_ok)))):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.expected = expected
    return parse


positive_int = number(int, 1, expected="a positive integer")
count = number(int, 0, expected="an integer >= 0")
seed = number(int, 0, high=2 ** 32, expected="an integer from 0 to 4294967295")
positive = number(float, 0.0, low_ok=False, expected="a positive number")
non_negative = number(float, 0.0, expected="a number >= 0")
probability = number(float, 0.0, high=1.0, expected="a number >= 0 and < 1")


def path(text):
    """An argparse type for a file or folder: `~` expanded (as the shell would have done
    outside quotes or after `=`), an empty path refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return os.path.expanduser(text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show (None, a
    switch's False) or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def plural(n, word):
    """ "1 epoch", "2 epochs", "10,000 images", "3 classes"."""
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


# --- progress lines and the end of a program -----------------------------------------------

_open_line = False          # a progress line is on stderr, not yet ended


def end_line():
    """End an open progress line, so that what comes next starts on a line of its own."""
    global _open_line
    if _open_line:
        _open_line = False
        sys.stderr.write("\n")
        sys.stderr.flush()


class Progress:
    """A one-line progress bar on stderr, redrawn with `\\r`, only on a terminal: a log
    file or a pipe gets none of it (the programs print one line per epoch there).
    `due()` says when to read running totals from the device: at most 10 times a second
    (each read makes the host wait for the GPU), whether or not the bar is shown."""

    def __init__(self, total, label, enabled=True, unit="img"):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.update(0)                           # something shows before the first step

    def due(self):
        return time.perf_counter() - self.last >= 0.1

    def update(self, done, text=""):
        global _open_line
        now = self.last = time.perf_counter()
        if not self.enabled:
            return
        filled = int(30 * done / max(self.total, 1))
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}"
                         f" {rate:,.0f} {self.unit}/s {text}  ")
        sys.stderr.flush()
        _open_line = True

    def close(self):
        global _open_line
        if self.enabled and _open_line:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
            _open_line = False


# --- the output folder -----------------------------------------------------------------------

LOCK_NAME = ".minivit.lock"

try:
    import fcntl

    def _try_lock(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:                   # EWOULDBLOCK: another process holds it
            return False
except ImportError:                       # Windows
    import msvcrt

    def _try_lock(fd):
        os.lseek(fd, 64, os.SEEK_SET)     # a byte past the PID, which stays readable
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False


@contextlib.contextmanager
def lock_folder(folder, flag="--out"):
    """Hold an exclusive OS lock on `folder` (the file .minivit.lock in it, which holds the
    holder's process id) while the block runs.  Another process asking for it meanwhile
    exits with one line naming the folder and that process.  The OS releases the lock when
    its process ends, however it ends, so a killed run never leaves a stale lock."""
    lock = pathlib.Path(folder) / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            sys.exit(f"error: {flag} {folder} is in use by another run (process {holder}); "
                     f"wait for it to end, or choose another {flag}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        os.close(fd)                      # closing it releases the lock


@contextlib.contextmanager
def writing(path):
    """Name `path` in an OSError raised without a file name inside the block: a full disk's
    "No space left on device" then says which file it was."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def limit_threads(n):
    """Run the BLAS library under NumPy (OpenBLAS, MKL, ...) on n threads until the returned
    object's restore_original_limits() (threadpoolctl's threadpool_limits)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        sys.exit("error: --threads needs the threadpoolctl package: pip install threadpoolctl")
    return threadpool_limits(limits=n, user_api="blas")


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
