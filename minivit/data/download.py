"""Fetching CIFAR-10 once into a cache folder, checked before it is unpacked.

    cifar = find_or_download(data_dir)   # looks in data_dir (default: the cache folder),
                                         # downloads there if missing, loads
    cifar.train_images, cifar.train_labels, cifar.test_images, ..., cifar.class_names

download_cifar10(cache_dir):
  1. returns at once when cache_dir already holds the batch files;
  2. downloads the archive into a temporary file in cache_dir, showing a progress bar
     on stderr, and renames it to cifar-10-python.tar.gz only after its MD5 matched
     the published one: an interrupted or corrupt download never sits under the
     final name (an archive already there, e.g. copied by hand, is checked the same
     way and used);
  3. checks every member of the archive before unpacking any: no absolute paths, no
     "..", nothing but regular files and folders (no links, devices or FIFOs);
  4. unpacks into a temporary folder and renames cifar-10-batches-py into place.

The cache folder: the `cache_dir` argument, else $MINIVIT_DATA, else
$XDG_CACHE_HOME/minivit/cifar10 with XDG_CACHE_HOME defaulting to ~/.cache.
"""
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from minivit.data.cifar import (ALL_FILES, CifarNotFoundError, DataError, is_cifar10_dir,
                                load_cifar10, locate_cifar10)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"     # published on the CIFAR-10 page
ARCHIVE_NAME = "cifar-10-python.tar.gz"
_CHUNK = 1 << 20


class DownloadError(DataError, OSError):
    """CIFAR-10 could not be fetched or unpacked."""


class ChecksumError(DownloadError):
    """The archive's MD5 is not the published one."""


class UnsafeArchiveError(DownloadError):
    """The archive has a member that could write outside its folder."""


def default_cache_dir():
    """$MINIVIT_DATA if set, else $XDG_CACHE_HOME (or ~/.cache) / minivit / cifar10."""
    if os.environ.get("MINIVIT_DATA"):
        return Path(os.environ["MINIVIT_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "minivit" / "cifar10"


# --- downloading -----------------------------------------------------------------------

def progress_line(done, total, width=30):
    """'[#########.....]  45%  73.9/162.6 MB', or '73.9 MB' when the size is unknown."""
    if not total:
        return f"{done / 1e6:.1f} MB"
    filled = width * done // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}%  " \
           f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"


def _fetch(url, folder, progress):
    """Stream `url` into a new temporary file in `folder`; return (its path, its MD5)."""
    digest = hashlib.md5(usedforsecurity=False)
    fd, part = tempfile.mkstemp(prefix=ARCHIVE_NAME + ".", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total, done, shown = int(response.headers.get("Content-Length") or 0), 0, None
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                line = progress_line(done, total)
                if progress and line != shown:
                    print("\r" + line, end="", file=sys.stderr, flush=True)
                    shown = line
        if progress:
            print(file=sys.stderr)
    except BaseException:
        os.unlink(part)              # an interrupted download leaves nothing behind
        raise
    return Path(part), digest.hexdigest()


def md5_of(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _offline_help(url, folder, error):
    return (f"could not download {url} ({error}).\n"
            f"Without network access, fetch cifar-10-python.tar.gz (the CIFAR-10 'python "
            f"version') elsewhere and either\n"
            f"  - unpack it so that {folder / 'cifar-10-batches-py' / 'data_batch_1'} (and "
            f"data_batch_2..5, test_batch, batches.meta) exist, or\n"
            f"  - copy the archive itself to {folder / ARCHIVE_NAME} (it is checked and "
            f"unpacked on the next run),\n"
            f"or point --data-dir (or the MINIVIT_DATA variable) at a folder that holds "
            f"cifar-10-batches-py/.")


# --- unpacking -------------------------------------------------------------------------

def check_members(tar, source="<archive>"):
    """The members of `tar`, after making sure none can write outside the target folder:
    no absolute path, no '..' component, only regular files and folders."""
    members = tar.getmembers()
    for m in members:
        parts = m.name.replace("\\", "/").split("/")
        if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ":" in parts[0]:
            problem = "has an absolute path"
        elif ".." in parts:
            problem = "has a '..' component"
        elif not (m.isfile() or m.isdir()):
            problem = ("is a symbolic link" if m.issym() else "is a hard link" if m.islnk()
                       else "is a device or FIFO")
        else:
            continue
        raise UnsafeArchiveError(f"refusing to unpack {source}: member {m.name!r} {problem}; "
                                 "CIFAR-10 holds only plain files in cifar-10-batches-py/")
    return members


def safe_extract(archive, dest):
    """Unpack the .tar.gz `archive` into `dest` after check_members approved every member
    (and, where tarfile has it, with its own 'data' filter as a second guard)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = check_members(tar, archive)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def extract_cifar10(archive, folder):
    """Unpack `archive` into `folder`/cifar-10-batches-py, through a temporary folder."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=folder))
    try:
        safe_extract(archive, staging)
        try:
            unpacked = locate_cifar10(staging)
        except CifarNotFoundError as e:
            raise DownloadError(f"{archive} is not the CIFAR-10 python version: {e}") from None
        target = folder / "cifar-10-batches-py"
        if not target.exists():
            os.replace(unpacked, target)
        else:                            # an incomplete copy is there: complete it file by file
            for name in ALL_FILES:
                os.replace(unpacked / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- the entry points ------------------------------------------------------------------

def download_cifar10(cache_dir=None, url=CIFAR10_URL, progress=True, md5=CIFAR10_MD5):
    """Make sure `cache_dir` (default: default_cache_dir()) holds cifar-10-batches-py/,
    downloading, checking and unpacking the archive when it does not; return that folder."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_cifar10_dir(folder):
        return locate_cifar10(folder)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / ARCHIVE_NAME
    if archive.is_file():                # from an earlier run, or copied here by hand
        got = md5_of(archive)
        if got != md5:
            aside = archive.with_name(ARCHIVE_NAME + ".bad")
            os.replace(archive, aside)
            raise ChecksumError(f"{archive} has MD5 {got}, expected {md5}: it is damaged or "
                                f"not the CIFAR-10 python version. Moved it aside to {aside} "
                                "(delete it); run again to download a fresh copy.")
    else:
        if progress:
            print(f"downloading {url} to {folder}", file=sys.stderr)
        try:
            part, got = _fetch(url, folder, progress)
        except OSError as e:            # URLError, HTTPError, timeouts, refused connections
            raise DownloadError(_offline_help(url, folder, e)) from e
        if got != md5:
            part.unlink()
            raise ChecksumError(f"the file downloaded from {url} has MD5 {got}, expected "
                                f"{md5}: it is damaged or not the CIFAR-10 python version. "
                                "Deleted it; nothing was unpacked. Run again, or put a good "
                                f"copy at {archive}.")
        os.replace(part, archive)       # only a checked archive gets the final name
    return extract_cifar10(archive, folder)


def find_or_download(data_dir=None, download=True, progress=True, url=CIFAR10_URL,
                     md5=CIFAR10_MD5):
    """CIFAR-10 loaded (a Cifar10 tuple, see load_cifar10), for the training program.

    Looks in `data_dir` (a folder holding cifar-10-batches-py/, or that folder itself;
    default: default_cache_dir()).  When the files are not there, downloads them there
    if `download`, else raises CifarNotFoundError saying where it looked.
    """
    folder = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    try:
        found = locate_cifar10(folder)
    except CifarNotFoundError as e:
        if not download:
            raise CifarNotFoundError(f"{e} Downloading is off; allow it, or pass --data-dir "
                                     "with the folder that holds the data.") from None
        found = download_cifar10(folder, url=url, progress=progress, md5=md5)
    return load_cifar10(found)
