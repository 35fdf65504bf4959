"""Reading CIFAR-10 in its official "python version" layout, without running any code.

The archive cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)
unpacks to

    cifar-10-batches-py/
        data_batch_1 .. data_batch_5     50,000 training images, 10,000 per file
        test_batch                       10,000 test images
        batches.meta                     {b"label_names": [b"airplane", ...], ...}

Each batch is a pickled dict with
    b"data"         uint8 array (10000, 3072): the red plane, then green, then blue,
                    each 32x32 row-major, so data.reshape(-1, 3, 32, 32) is NCHW;
    b"labels"       10000 ints in 0..9;
    b"filenames", b"batch_label"   bytes, unused here.

A pickle is a small program: loading one may call any function it names
(os.system included).  `RestrictedUnpickler` therefore lets a file name only the
few functions these files need to rebuild their arrays and bytes, and refuses
everything else before it can run.
"""
import codecs
import io
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

from minivit import backend

np = backend.module_for("cpu")     # NumPy: everything in minivit.data runs on the host

BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
ALL_FILES = TRAIN_FILES + (TEST_FILE, META_FILE)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")


class DataError(Exception):
    """Base of every error minivit.data raises: catch this one in a program."""


class CifarNotFoundError(DataError, FileNotFoundError):
    """The CIFAR-10 files are not where we looked."""


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle asked for a function that a CIFAR batch file never needs."""


class CifarFormatError(DataError, ValueError):
    """A file unpickled safely but does not hold what a CIFAR-10 batch holds."""


# --- the restricted unpickler ----------------------------------------------------------

def _numpy_reconstruct():
    """numpy's array-rebuilding function, numpy._core.multiarray._reconstruct (numpy 2)
    or numpy.core.multiarray._reconstruct (numpy 1): the same function, moved."""
    for core in ("_core", "core"):
        multiarray = getattr(getattr(np, core, None), "multiarray", None)
        if hasattr(multiarray, "_reconstruct"):
            return multiarray._reconstruct
    raise ImportError("numpy.core.multiarray._reconstruct not found in this numpy")


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as Python 3 uses it in protocol-2 pickles: bytes written as
    encode(bytes.decode("latin1"), "latin1").  Only that codec is let through."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): "
                                "CIFAR batch files only encode text as 'latin1'")
    return codecs.encode(text, "latin1")


def _allowed_globals():
    reconstruct = _numpy_reconstruct()
    return {
        # The original files are Python 2 pickles made with numpy 1 ...
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        # ... copies written by numpy 2 name the module it moved to.
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes into protocol-2 pickles through _codecs.encode.
        ("_codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class hands out only what CIFAR batch files contain:
    numpy's _reconstruct, numpy.ndarray, numpy.dtype and _codecs.encode.  Any other
    name (os.system, builtins.eval, ...) raises UnsafePickleError before it is called.
    `source` names the file in error messages."""

    def __init__(self, file, source="<pickle>"):
        super().__init__(file, encoding="bytes")    # Python 2 str -> bytes, as the files expect
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.allowed)
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from {self.source}: CIFAR batch files "
                f"contain only numpy arrays, lists, ints and bytes (allowed: {allowed})") from None


def read_pickle(path):
    """Unpickle `path` with RestrictedUnpickler (encoding="bytes").

    A file that is empty, truncated or not a pickle raises CifarFormatError naming it,
    and so does one that declares an object larger than itself (a 14-byte pickle can ask
    for a terabyte: the reader would try to allocate it)."""
    data = Path(path).read_bytes()
    if not data:
        raise CifarFormatError(f"{path} is empty: not a CIFAR-10 batch file (an interrupted "
                               "download or copy?); re-download or re-copy it")
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=str(path)).load()
    except UnsafePickleError:
        raise
    except MemoryError:
        raise CifarFormatError(f"{path} is not a CIFAR-10 batch file: it declares an object "
                               f"larger than memory in a file of {len(data):,} bytes") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, struct.error) as e:
        raise CifarFormatError(f"{path} is not a readable CIFAR-10 batch file ({e or type(e).__name__}); "
                               "it may be truncated or damaged: "
                               "re-download or re-copy it") from None


# --- reading the batches ---------------------------------------------------------------

def read_batch(path):
    """(images, labels) of one batch file: uint8 (n, 3, 32, 32) NCHW and int64 (n,)."""
    batch = read_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CifarFormatError(f"{path}: expected a dict with b'data' and b'labels' "
                               f"(a CIFAR-10 batch), got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarFormatError(f"{path}: expected b'data' as uint8 of shape (n, 3072), got {got}")
    if labels.shape != (len(data),):
        raise CifarFormatError(f"{path}: expected {len(data)} labels, got shape {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < 10:
        raise CifarFormatError(f"{path}: expected labels in 0..9, "
                               f"got {labels.min()}..{labels.max()}")
    # Row r = [R plane | G plane | B plane], each 32x32 row-major: a reshape gives NCHW.
    return data.reshape(-1, 3, 32, 32), labels


def read_class_names(path):
    meta = read_pickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise CifarFormatError(f"{path}: expected b'label_names', a list of 10 class names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def locate_cifar10(data_dir):
    """The folder that holds the batch files: `data_dir`/cifar-10-batches-py, or
    `data_dir` itself.  Raises CifarNotFoundError naming what is missing and where."""
    data_dir = Path(data_dir).expanduser()
    candidates = [data_dir / BATCHES_FOLDER, data_dir]
    for folder in candidates:
        missing = [name for name in ALL_FILES if not (folder / name).is_file()]
        if not missing:
            return folder
        if len(missing) < len(ALL_FILES):           # a partial copy: say exactly what it lacks
            raise CifarNotFoundError(
                f"CIFAR-10 is incomplete in {folder}: missing {', '.join(missing)} "
                f"(expected {', '.join(ALL_FILES)})")
    raise CifarNotFoundError(
        f"CIFAR-10 not found: looked for {', '.join(ALL_FILES)} in "
        f"{' and in '.join(str(c) for c in candidates)}. Unpack cifar-10-python.tar.gz "
        f"(the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html) so that "
        f"{candidates[0] / TRAIN_FILES[0]} exists, or let minivit.data.download_cifar10 do it.")


class Cifar10(NamedTuple):
    train_images: object      # uint8 (50000, 3, 32, 32), NCHW, RGB
    train_labels: object      # int64 (50000,)
    test_images: object       # uint8 (10000, 3, 32, 32)
    test_labels: object       # int64 (10000,)
    class_names: tuple        # ("airplane", ..., "truck")


def load_cifar10(data_dir):
    """Load CIFAR-10 from `data_dir` (a folder holding cifar-10-batches-py/, or that
    folder itself) as host NumPy arrays:

        train_images, train_labels, test_images, test_labels, class_names = load_cifar10(path)

    or cifar = load_cifar10(path); cifar.train_images, ..., cifar.class_names.
    """
    folder = locate_cifar10(data_dir)
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILE)
    return Cifar10(np.concatenate([images for images, _ in train]),
                   np.concatenate([labels for _, labels in train]),
                   test_images, test_labels, read_class_names(folder / META_FILE))


def is_cifar10_dir(path):
    """True when `path` (or `path`/cifar-10-batches-py) holds all the CIFAR-10 files."""
    try:
        locate_cifar10(path)
    except CifarNotFoundError:
        return False
    return True


__all__ = ["BATCHES_FOLDER", "CLASSES", "Cifar10", "CifarFormatError", "CifarNotFoundError",
           "DataError", "RestrictedUnpickler", "UnsafePickleError", "is_cifar10_dir",
           "load_cifar10", "locate_cifar10", "read_batch", "read_class_names", "read_pickle"]
