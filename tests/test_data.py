"""CIFAR-10: the file format, safe loading, download, augmentation, batching on the device.

The format.  A CIFAR-10 batch is a pickled dict whose b"data" is uint8 (n, 3072): row r
holds image r as [R plane | G plane | B plane], each plane 32 x 32 row-major, so

    data[r, c * 1024 + i * 32 + j] = pixel (row i, column j) of channel c of image r,

which is exactly data.reshape(n, 3, 32, 32)[r, c, i, j]: NCHW needs no transpose.

Two pickle dialects exist.  The original files were written by Python 2's cPickle
(protocol 2): text is a py2 str (opcode BINSTRING, read back as bytes with
encoding="bytes") and arrays are rebuilt by numpy.core.multiarray._reconstruct.
Python 3 writing protocol 2 (the converted copies) has no py2 str, so it stores bytes
as _codecs.encode(text, "latin1"), and numpy 2 names numpy._core.multiarray.  The
tests write both dialects by hand and load them.

Safety.  Unpickling calls whatever the file names; a file naming os.system runs a
shell.  The loader's find_class hands out four names only, so the os.system pickle
must fail before the command runs (the test checks the command really would run
under plain pickle, and did not under ours).  Archives are checked member by member
(no absolute paths, no "..", no links or devices) and against the MD5 before unpacking.

Augmentation.  For offsets (dy, dx) in 0..2p and a flip bit per image,

    out[n, c, i, j] = pad(x)[n, c, dy_n + i, dx_n + j']     j' = W-1-j if flipped else j,

checked against a loop over images, on both devices; the padding is never built: a
pixel outside the image reads a clipped index and is multiplied by 0.  Normalisation:
x = (pixel / 255 - mean) / std.

Batching.  Epoch e's order comes from default_rng([seed, e, 0, 0]) and batch b's
augmentation from default_rng([seed, e, 1, b]); so (seed, epoch, batch) fixes a batch
and a run resumed at epoch k, or mid-epoch, sees the batches an unbroken run saw.  The
images and labels go to the device once; an epoch's draws are made on the host and go
there in one copy; each batch is then device arithmetic, and equals, array for array,
the host recipe cutout(normalize(random_crop_flip(images[order[batch]], rng)), rng).
"""
import hashlib
import io
import os
import pickle
import pickletools
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from minivit import backend
from minivit.data import (CIFAR10_MEAN, CIFAR10_STD, CLASSES, ChecksumError, CifarFormatError,
                          CifarNotFoundError, DataError, DownloadError, Loader, UnsafeArchiveError,
                          UnsafePickleError, batches, channel_stats, crop_flip_at, cutout,
                          default_cache_dir, download_cifar10, find_or_download, load_cifar10,
                          normalize, random_crop_flip, read_batch, safe_extract)
from minivit.data.download import progress_line

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


# --- fixtures: tiny CIFAR folders in both pickle dialects ------------------------------

def py2_pickle(obj):
    """obj as Python 2's cPickle wrote the original files (protocol 2): bytes as py2 str
    (BINSTRING), arrays as numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') followed
    by __setstate__((1, shape, dtype, False, raw bytes)), dtype uint8 as
    numpy.dtype('u1', 0, 1) with state (3, '|', None, None, None, -1, -1, 0)."""
    out = [b"\x80\x02"]                                          # PROTO 2

    def emit(o):
        if isinstance(o, dict):
            out.append(b"}(")                                    # EMPTY_DICT, MARK
            for key, value in o.items():
                emit(key)
                emit(value)
            out.append(b"u")                                     # SETITEMS
        elif isinstance(o, (list, tuple)):
            out.append(b"](" if isinstance(o, list) else b"(")   # EMPTY_LIST, MARK
            for value in o:
                emit(value)
            out.append(b"e" if isinstance(o, list) else b"t")    # APPENDS / TUPLE
        elif o is None:
            out.append(b"N")
        elif isinstance(o, bool):
            out.append(b"\x88" if o else b"\x89")                # NEWTRUE / NEWFALSE
        elif isinstance(o, int):
            out.append(b"J" + struct.pack("<i", o))              # BININT
        elif isinstance(o, bytes):
            out.append(b"T" + struct.pack("<I", len(o)) + o)     # BINSTRING: a py2 str
        elif isinstance(o, np.dtype):
            assert o == np.uint8
            out.append(b"cnumpy\ndtype\n")                       # GLOBAL
            emit((b"u1", 0, 1))
            out.append(b"R")                                     # REDUCE
            emit((3, b"|", None, None, None, -1, -1, 0))
            out.append(b"b")                                     # BUILD (__setstate__)
        elif isinstance(o, np.ndarray):
            out.append(b"cnumpy.core.multiarray\n_reconstruct\n")
            out.append(b"cnumpy\nndarray\n")
            emit((0,))
            emit(b"b")
            out.append(b"\x87R")                                 # TUPLE3, REDUCE
            emit((1, tuple(o.shape), o.dtype, False, o.tobytes()))
            out.append(b"b")                                     # BUILD
        else:
            raise TypeError(type(o))
    emit(obj)
    return b"".join(out) + b"."                                  # STOP


def py3_pickle(obj):
    """obj as Python 3 writes protocol 2 (as the converted copies were written)."""
    return pickle.dumps(obj, protocol=2)


def globals_named(blob):
    return {arg for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}


def make_batch(n, seed, label):
    rng = np.random.default_rng(seed)
    return {b"batch_label": label.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def write_cifar(root, dump=py3_pickle, n=3):
    """root/cifar-10-batches-py with 5 training batches and a test batch of n images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for seed, name in enumerate(TRAIN_FILES + ["test_batch"]):
        written[name] = make_batch(n, seed, name)
        (folder / name).write_bytes(dump(written[name]))
    (folder / "batches.meta").write_bytes(dump({b"label_names": [c.encode() for c in CLASSES],
                                                 b"num_cases_per_batch": n, b"num_vis": 3072}))
    return folder, written


def test_py2_fixture_speaks_the_original_dialect():
    batch = make_batch(2, 0, "x")
    blob = py2_pickle(batch)
    assert globals_named(blob) == {"numpy.core.multiarray _reconstruct", "numpy ndarray",
                                   "numpy dtype"}
    assert "_codecs encode" in globals_named(py3_pickle(batch))
    loaded = pickle.loads(blob, encoding="bytes")    # plain pickle: the fixture is well formed
    assert loaded[b"labels"] == batch[b"labels"] and loaded[b"filenames"] == batch[b"filenames"]
    np.testing.assert_array_equal(loaded[b"data"], batch[b"data"])


@pytest.mark.parametrize("dump", [py2_pickle, py3_pickle], ids=["python2-numpy.core",
                                                                 "python3-codecs"])
def test_load_cifar10_reads_both_dialects(tmp_path, dump):
    folder, written = write_cifar(tmp_path, dump)
    for where in (tmp_path, folder):                 # the parent, or the folder itself
        train_x, train_y, test_x, test_y, class_names = load_cifar10(where)
        assert train_x.shape == (15, 3, 32, 32) and train_x.dtype == np.uint8
        assert test_x.shape == (3, 3, 32, 32) and test_y.dtype == train_y.dtype == np.int64
        expected = np.concatenate([written[f][b"data"] for f in TRAIN_FILES])
        np.testing.assert_array_equal(train_x.reshape(15, -1), expected)
        labels = [v for f in TRAIN_FILES for v in written[f][b"labels"]]
        np.testing.assert_array_equal(train_y, labels)
        np.testing.assert_array_equal(test_y, written["test_batch"][b"labels"])
        assert class_names == CLASSES


def test_channel_layout_red_plane_first(tmp_path):
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    red, green, blue = i, 100 + j, np.full((32, 32), 250)
    row = np.concatenate([red.ravel(), green.ravel(), blue.ravel()]).astype(np.uint8)
    batch = {b"data": np.stack([row, 255 - row]), b"labels": [3, 7]}
    (tmp_path / "b").write_bytes(py2_pickle(batch))
    images, labels = read_batch(tmp_path / "b")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 7]
    np.testing.assert_array_equal(images[0, 0], red)       # red plane first
    np.testing.assert_array_equal(images[0, 1], green)     # varies along columns
    np.testing.assert_array_equal(images[0, 2], blue)
    for n in range(2):                                       # data[n, c*1024 + i*32 + j]
        for c in range(3):
            for y in (0, 5, 31):
                for x in (0, 17, 31):
                    assert images[n, c, y, x] == batch[b"data"][n, c * 1024 + y * 32 + x]


# --- the restricted unpickler ----------------------------------------------------------

class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_unpickler_refuses_os_system_before_it_runs(tmp_path):
    live, marker = tmp_path / "plain_pickle_ran_it", tmp_path / "we_ran_it"
    pickle.loads(pickle.dumps(RunsACommand(f"touch {live}"), protocol=2))
    assert live.exists()                            # the payload is real under plain pickle
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": RunsACommand(f"touch {marker}"), b"labels": []}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refusing to load (os|posix|nt)\.system from "
                       r".*data_batch_1: CIFAR batch files contain only"):
        read_batch(tmp_path / "data_batch_1")
    assert not marker.exists()


def test_unpickler_refuses_other_globals_and_codecs(tmp_path):
    (tmp_path / "a").write_bytes(pickle.dumps(eval, protocol=2))
    # protocol 2 writes Python 2's module names: find_class sees __builtin__.eval
    with pytest.raises(UnsafePickleError, match=r"refusing to load __builtin__\.eval from .*a: "):
        read_batch(tmp_path / "a")
    # _codecs.encode is allowed, but only to turn latin1 text into bytes
    (tmp_path / "b").write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00"
                                 b"\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError, match=r"_codecs.encode\(str, 'rot13'\)"):
        read_batch(tmp_path / "b")


def test_bad_contents_and_missing_files_are_named(tmp_path):
    (tmp_path / "wrong").write_bytes(py3_pickle({b"data": np.zeros((2, 100), np.uint8),
                                                 b"labels": [0, 1]}))
    with pytest.raises(CifarFormatError, match=r"wrong: expected b'data' as uint8 of shape "
                       r"\(n, 3072\), got uint8 \(2, 100\)"):
        read_batch(tmp_path / "wrong")
    (tmp_path / "labels").write_bytes(py3_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                  b"labels": [0, 10]}))
    with pytest.raises(CifarFormatError, match=r"labels in 0\.\.9, got 0\.\.10"):
        read_batch(tmp_path / "labels")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CifarNotFoundError, match=rf"looked for data_batch_1, .*batches\.meta in "
                       rf"{empty}/cifar-10-batches-py and in {empty}\."):
        load_cifar10(empty)
    folder, _ = write_cifar(tmp_path / "partial")
    (folder / "test_batch").unlink()
    (folder / "data_batch_3").unlink()
    with pytest.raises(CifarNotFoundError, match=rf"incomplete in {folder}: missing data_batch_3, "
                       r"test_batch"):
        load_cifar10(tmp_path / "partial")
    with pytest.raises(CifarNotFoundError, match=r"Downloading is off"):
        find_or_download(empty, download=False)


# --- download, checksum, safe unpacking ------------------------------------------------

def make_archive(path, folder=None, extra=()):
    """A .tar.gz of `folder` as cifar-10-batches-py/ plus `extra` TarInfo members."""
    with tarfile.open(path, "w:gz") as tar:
        if folder is not None:
            tar.add(folder, arcname="cifar-10-batches-py")
        for info in extra:
            data = b"gotcha" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path, hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("tar_filter", [True, False], ids=["with-data-filter", "python<3.11.4"])
def test_download_checks_md5_and_unpacks(tmp_path, capsys, monkeypatch, tar_filter):
    if not tar_filter:                   # older Pythons: tarfile has no filter= at all
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    folder, written = write_cifar(tmp_path / "source")
    archive, md5 = make_archive(tmp_path / "cifar-10-python.tar.gz", folder)
    cache = tmp_path / "cache"
    got = download_cifar10(cache, url=archive.as_uri(), md5=md5)
    assert got == cache / "cifar-10-batches-py"
    assert "100%" in capsys.readouterr().err                  # the progress bar finished
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-batches-py",
                                                      "cifar-10-python.tar.gz"]
    train_x, *_ = load_cifar10(got)
    np.testing.assert_array_equal(train_x[:3].reshape(3, -1), written["data_batch_1"][b"data"])
    # once there, nothing is fetched again, and find_or_download finds and loads it
    assert download_cifar10(cache, url="file:///nonexistent", md5=md5) == got
    cifar = find_or_download(cache, download=False)
    np.testing.assert_array_equal(cifar.train_images, train_x)
    assert cifar.class_names == CLASSES


def test_find_or_download_downloads_into_data_dir_when_missing(tmp_path):
    folder, written = write_cifar(tmp_path / "source", dump=py2_pickle)
    archive, md5 = make_archive(tmp_path / "a.tar.gz", folder)
    cifar = find_or_download(tmp_path / "data", url=archive.as_uri(), md5=md5, progress=False)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "batches.meta").is_file()
    np.testing.assert_array_equal(cifar.test_images.reshape(3, -1), written["test_batch"][b"data"])
    np.testing.assert_array_equal(cifar.test_labels, written["test_batch"][b"labels"])


def test_wrong_md5_is_refused_before_unpacking(tmp_path):
    folder, _ = write_cifar(tmp_path / "source")
    archive, _ = make_archive(tmp_path / "a.tar.gz", folder)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=r"has MD5 [0-9a-f]{32}, expected 0{32}.*Deleted it; "
                       r"nothing was unpacked"):
        download_cifar10(cache, url=archive.as_uri(), md5="0" * 32, progress=False)
    assert list(cache.iterdir()) == []                       # no archive, no .part, no folder
    # an archive already in the cache (put there by hand) with a wrong MD5 is moved aside
    (cache / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ChecksumError, match=r"Moved it aside to .*cifar-10-python\.tar\.gz\.bad"):
        download_cifar10(cache, md5="0" * 32, progress=False)
    assert [p.name for p in cache.iterdir()] == ["cifar-10-python.tar.gz.bad"]


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("tar_filter", [True, False], ids=["with-data-filter", "python<3.11.4"])
@pytest.mark.parametrize("member, problem", [
    (_member("../x"), "has a '..' component"),
    (_member("cifar-10-batches-py/../../x"), "has a '..' component"),
    (_member("{tmp}/absolute-x"), "has an absolute path"),
    (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "is a symbolic link"),
    (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "/etc/passwd"), "is a hard link"),
    (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "is a device or FIFO"),
], ids=["dotdot", "inner-dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_members_are_refused(tmp_path, monkeypatch, member, problem, tar_filter):
    if not tar_filter:                   # the own check alone must refuse them
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    member.name = member.name.format(tmp=tmp_path)       # an absolute path into tmp_path
    archive, _ = make_archive(tmp_path / "evil.tar.gz", extra=[member])
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError, match=rf"member '{member.name}' {problem}"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "a" / "x").exists() and not (tmp_path / "absolute-x").exists()


def test_download_refuses_an_archive_escaping_its_folder(tmp_path):
    folder, _ = write_cifar(tmp_path / "source")
    archive, md5 = make_archive(tmp_path / "a.tar.gz", folder, extra=[_member("../x")])
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match=r"refusing to unpack .*'\.\./x'"):
        download_cifar10(cache, url=archive.as_uri(), md5=md5, progress=False)
    assert not (tmp_path / "x").exists() and not (cache / "cifar-10-batches-py").exists()


def test_without_network_the_error_says_where_to_put_the_data(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=rf"(?s)could not download https://www\.cs\.toronto\.edu"
                       rf".*name resolution.*{cache}/cifar-10-batches-py/data_batch_1.*"
                       rf"{cache}/cifar-10-python\.tar\.gz.*--data-dir"):
        find_or_download(cache, progress=False)
    assert list(cache.iterdir()) == []                       # no leftover .part file


def test_cache_folder_and_progress_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "minivit" / "cifar10"
    monkeypatch.setenv("MINIVIT_DATA", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert progress_line(50, 200, width=8) == "[##......]  25%  0.0/0.0 MB"
    assert progress_line(3_000_000, 0) == "3.0 MB"


# --- augmentation and normalisation ----------------------------------------------------

def padded_crop(image, dy, dx, flip, padding=4):
    """One image (C, H, W) padded with zeros, cropped at (dy, dx), maybe mirrored: a loop's way."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), image.dtype)
    padded[:, padding:padding + h, padding:padding + w] = image
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop[:, :, ::-1] if flip else crop


def test_crop_and_flip_match_a_loop_over_images(device):
    images = np.random.default_rng(1).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    out = backend.to_numpy(random_crop_flip(backend.asarray(images, device=device),
                                            np.random.default_rng(7), padding=4))
    rng = np.random.default_rng(7)                   # the same draws, in the documented order
    dy, dx, flips = rng.integers(0, 9, 64), rng.integers(0, 9, 64), rng.random(64) < 0.5
    assert 10 < flips.sum() < 54 and len(set(dy)) > 5
    for n in range(64):
        np.testing.assert_array_equal(out[n], padded_crop(images[n], dy[n], dx[n], flips[n]))
    assert out.dtype == np.uint8
    same = random_crop_flip(images, np.random.default_rng(7), padding=0, flip=False)
    np.testing.assert_array_equal(same, images)


def test_crop_flip_at_gathers_from_the_whole_set(device):
    # the Loader's gather: images[index] cropped and flipped, straight from the resident set
    images = np.random.default_rng(8).integers(0, 256, (10, 3, 6, 5), dtype=np.uint8)
    index, flips = np.array([3, 3, 0, 9, 7]), np.array([0, 1, 1, 0, 1])
    dy, dx = np.array([0, 6, 2, 3, 5]), np.array([6, 0, 1, 3, 4])       # padding 3: 0..6
    on_device = [backend.asarray(a, device=device) for a in (images, index, dy, dx, flips)]
    out = crop_flip_at(*on_device, padding=3)
    assert out.shape == (5, 3, 6, 5) and out.dtype == np.uint8
    for n in range(5):
        np.testing.assert_array_equal(backend.to_numpy(out[n]), padded_crop(
            images[index[n]], dy[n], dx[n], flips[n], padding=3))


def test_cutout_matches_a_loop_over_images(device):
    x = np.random.default_rng(2).standard_normal((40, 3, 32, 32)).astype(np.float32)
    out = backend.to_numpy(cutout(backend.asarray(x, device=device), np.random.default_rng(3),
                                  size=16))
    rng = np.random.default_rng(3)
    cy, cx = rng.integers(0, 32, 40), rng.integers(0, 32, 40)
    for n in range(40):
        want = x[n].copy()
        want[:, max(cy[n] - 8, 0):min(cy[n] + 8, 32), max(cx[n] - 8, 0):min(cx[n] + 8, 32)] = 0
        np.testing.assert_array_equal(out[n], want)
    assert out.dtype == np.float32


def test_normalisation_constants_and_channel_stats():
    mean, std = np.array(CIFAR10_MEAN), np.array(CIFAR10_STD)
    # the published CIFAR-10 training-set statistics, of pixel / 255
    np.testing.assert_allclose(mean, [0.49139968, 0.48215841, 0.44653091], atol=1e-4)
    np.testing.assert_allclose(std, [0.24703223, 0.24348513, 0.26158784], atol=1e-4)
    images = np.random.default_rng(4).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    x = normalize(images)
    assert x.dtype == np.float32
    want = (images / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    m, s = channel_stats(images)
    for c in range(3):
        values = images[:, c].astype(np.float64).ravel() / 255
        assert m[c] == pytest.approx(values.mean()) and s[c] == pytest.approx(values.std())
    z = normalize(images, m, s)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-5)
    with pytest.raises(ValueError, match=r"a mean and std per channel \(3 values each\), got 2"):
        normalize(images, (0.5, 0.5), (0.2, 0.2, 0.2))


def test_normalize_on_the_device_gives_the_host_values(device):
    images = np.random.default_rng(4).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    x = normalize(backend.asarray(images, device=device))
    assert backend.device_of(x) == device
    np.testing.assert_array_equal(backend.to_numpy(x), normalize(images))


# --- batching -------------------------------------------------------------------------

def dataset(n=37):
    images = np.random.default_rng(5).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return images, np.arange(n)                      # label = index, to trace every image


def as_numpy(batches_):
    return [(backend.to_numpy(x), backend.to_numpy(y)) for x, y in batches_]


def test_batches_are_normalised_shuffled_and_complete(device):
    images, labels = dataset()
    loader = Loader(images, labels, batch_size=8, seed=1, device=device)   # shuffles by default
    out = list(loader.epoch(0))
    assert len(out) == loader.num_batches() == 5 and loader.num_images() == 37
    assert [len(y) for _, y in out] == [8, 8, 8, 8, 5]
    assert all(backend.device_of(x) == device == backend.device_of(y) for x, y in out)
    x, y = map(np.concatenate, zip(*as_numpy(out)))
    assert x.dtype == np.float32 and x.shape == (37, 3, 32, 32) and y.dtype == np.int64
    assert sorted(y) == list(range(37)) and list(y) != list(range(37))   # a permutation
    np.testing.assert_array_equal(x, normalize(images[y]))               # images follow labels
    dropped = Loader(images, labels, batch_size=8, shuffle=False, drop_last=True, device=device)
    assert dropped.num_batches() == 4 and dropped.num_images() == 32
    assert [y.tolist() for _, y in as_numpy(dropped.epoch(0))] == \
        [list(range(b, b + 8)) for b in range(0, 32, 8)]


def test_same_seed_same_batches_and_resuming(device):
    images, labels = dataset()
    kwargs = dict(batch_size=8, augment="strong", device=device)
    run = Loader(images, labels, seed=3, **kwargs)
    uninterrupted = [as_numpy(run.epoch(e)) for e in range(4)]
    resumed = Loader(images, labels, seed=3, **kwargs)          # a fresh process at epoch 3
    for got, want in zip(as_numpy(resumed.epoch(3)), uninterrupted[3]):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    for got, want in zip(as_numpy(resumed.epoch(2, start=3)), uninterrupted[2][3:]):
        np.testing.assert_array_equal(got[0], want[0])
    assert len(as_numpy(resumed.epoch(2, start=3))) == 2
    # epochs differ from each other, and another seed gives other batches
    assert uninterrupted[0][0][1].tolist() != uninterrupted[1][0][1].tolist()
    other = as_numpy(Loader(images, labels, seed=4, **kwargs).epoch(0))
    assert other[0][1].tolist() != uninterrupted[0][0][1].tolist()
    # with augmentation, an image is not its normalised self (crop, flip, cutout happened)
    x, y = uninterrupted[0][0]
    assert not np.array_equal(x, normalize(images[y]))
    # the documented keys: order from [seed, e, 0, 0], batch b's draws from [seed, e, 1, b]
    order = np.random.default_rng([3, 2, 0, 0]).permutation(37)
    rng = np.random.default_rng([3, 2, 1, 4])
    want = cutout(normalize(random_crop_flip(images[order[32:]], rng)), rng)
    np.testing.assert_array_equal(uninterrupted[2][4][1], order[32:])
    np.testing.assert_array_equal(uninterrupted[2][4][0], want)


def host_recipe(images, seed, epoch, batch_size, augment):
    """Epoch `epoch` batch by batch as the host functions define it, one image array at a time."""
    order = np.random.default_rng([seed, epoch, 0, 0]).permutation(len(images))
    for b, start in enumerate(range(0, len(images), batch_size)):
        index = order[start:start + batch_size]
        rng = np.random.default_rng([seed, epoch, 1, b])
        x = images[index]
        if augment == "none":
            yield normalize(x), index
        elif augment == "flip":
            yield normalize(random_crop_flip(x, rng, padding=0)), index
        elif augment == "standard":
            yield normalize(random_crop_flip(x, rng)), index
        else:
            yield cutout(normalize(random_crop_flip(x, rng)), rng), index


@pytest.mark.parametrize("augment", ["none", "flip", "standard", "strong"])
def test_device_batches_equal_the_host_recipe(device, augment):
    images, labels = dataset()
    loader = Loader(images, labels, batch_size=8, seed=6, augment=augment, device=device)
    for epoch in (0, 3):
        got = as_numpy(loader.epoch(epoch))
        want = list(host_recipe(images, 6, epoch, 8, augment))
        assert len(got) == len(want) == 5
        for (x, y), (want_x, want_y) in zip(got, want):
            assert x.dtype == np.float32 and y.dtype == np.int64
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(y, want_y)          # label = index here
        # resuming mid-epoch yields the tail of the epoch, batch for batch
        tail = as_numpy(loader.epoch(epoch, start=2))
        assert len(tail) == 3
        for (x, y), (want_x, want_y) in zip(tail, want[2:]):
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(y, want_y)
        assert list(loader.epoch(epoch, start=5)) == []
        dropped = as_numpy(Loader(images, labels, 8, seed=6, augment=augment, device=device,
                                  drop_last=True).epoch(epoch))
        assert len(dropped) == 4
        for (x, _), (want_x, _) in zip(dropped, want):
            np.testing.assert_array_equal(x, want_x)
    # another epoch, other batches
    assert not np.array_equal(as_numpy(loader.epoch(0))[0][0], as_numpy(loader.epoch(1))[0][0])


def test_on_numpy_the_set_is_not_copied():
    images, labels = dataset()
    loader = Loader(images, labels, batch_size=8, device="cpu")
    assert loader.images is images and loader.labels is labels


def test_the_set_moves_once_and_an_epoch_in_one_copy(standin):
    images, labels = dataset()
    loader = Loader(images, labels, batch_size=8, augment="strong", device="cuda")
    # images, labels and the normalisation constants (scale and shift in one array)
    assert standin.counts()["copies"] == 3 and standin.counts()["reads"] == 0
    for epoch in range(2):
        standin.reset()
        batches_ = loader.epoch(epoch)                    # the epoch's draws, in one copy
        first = next(batches_)
        assert standin.counts()["copies"] == 1 and standin.counts()["reads"] == 0
        assert backend.device_of(first[0]) == backend.device_of(first[1]) == "cuda"
        per_batch = []
        standin.reset()
        for _ in batches_:                                # batches 1..4: device work only
            per_batch.append(standin.counts())
            standin.reset()
        assert len(per_batch) == 4
        assert all(c["copies"] == 0 and c["reads"] == 0 for c in per_batch), per_batch
        # the same few launches in every batch (index arithmetic, gather, normalise, Cutout)
        assert len({c["launches"] for c in per_batch}) == 1 and per_batch[0]["launches"] < 50


def test_labels_are_checked_once_against_num_classes():
    images, _ = dataset()
    labels = np.arange(37) % 10
    Loader(images, labels, 8, num_classes=10)               # all in [0, 10)
    labels[[5, 20]] = [10, -1]
    with pytest.raises(ValueError, match=r"Loader: expected labels in \[0, 10\), got 10 at "
                       r"index 5"):
        Loader(images, labels, 8, num_classes=10)
    labels[5] = 3
    with pytest.raises(ValueError, match=r"expected labels in \[0, 10\), got -1 at index 20"):
        Loader(images, labels, 8, num_classes=10)
    Loader(images, labels, 8)                               # unchecked without num_classes
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1, got 0"):
        Loader(images, labels, 8, num_classes=0)


def test_batches_function_and_errors():
    images, labels = dataset()
    a = as_numpy(batches(images, labels, 8, seed=2, epoch=5, augment="standard"))
    b = as_numpy(Loader(images, labels, 8, seed=2, augment=True).epoch(5))
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b))
    c = as_numpy(batches(images, labels, 8, rng=np.random.default_rng(0)))
    d = as_numpy(batches(images, labels, 8, rng=np.random.default_rng(0)))
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(c, d)) and len(c) == 5
    # with rng: the order, then batch after batch the draws of the host functions
    rng = np.random.default_rng(9)
    e = as_numpy(batches(images, labels, 8, augment="strong", rng=rng))
    rng = np.random.default_rng(9)
    order = rng.permutation(37)
    for b, (x, y) in enumerate(e):
        index = order[8 * b:8 * b + 8]
        np.testing.assert_array_equal(y, index)
        np.testing.assert_array_equal(x, cutout(normalize(random_crop_flip(images[index], rng)),
                                                rng))
    with pytest.raises(ValueError, match=r"augment must be 'none', 'flip', 'standard' \(crop and flip\) "
                       r"or 'strong' \(also Cutout\), or a bool; got 'cutout'"):
        Loader(images, labels, 8, augment="cutout")
    with pytest.raises(ValueError, match=r"expected images as a host uint8 array \(N, C, H, W\), "
                       r"got float64 of shape \(37, 3, 32, 32\)"):
        Loader(images.astype(float), labels, 8)
    with pytest.raises(ValueError, match=r"expected 37 integer labels, shape \(37,\), got int64 "
                       r"of shape \(36,\)"):
        Loader(images, labels[:-1], 8)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        Loader(images, labels, 0)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0, got -1"):
        Loader(images, labels, 8).epoch(-1)


def test_data_errors_share_one_base():
    for error in (CifarNotFoundError, CifarFormatError, UnsafePickleError, DownloadError,
                  ChecksumError, UnsafeArchiveError):
        assert issubclass(error, DataError)
    assert issubclass(CifarNotFoundError, FileNotFoundError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)
