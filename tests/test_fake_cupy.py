"""The strict CuPy stand-in (tests/fake_cupy, MINIVIT_FAKE_CUPY=1) behaves like CuPy where
NumPy code goes wrong on a GPU, and counts what costs time there.

Why a stand-in: GPUs are rare on our machines, so most runs would skip every CuPy test.
The stand-in is NumPy underneath, but its arrays are not NumPy arrays: the mistakes
that pass on NumPy and fail on CuPy -- a NumPy function fed a device array, a host
array mixed into device arithmetic, a NumPy-only name (numpy.errstate,
Generator.permutation), a Python int given to unravel_index -- fail here too.  On a
GPU the same tests run on the real CuPy instead.

It also counts what a GPU step spends: device reads, host copies, kernel launches and
the bytes they move, and the copies real CuPy makes unasked -- matmul operands that are
not contiguous enough for cuBLAS, reshapes that cannot be views
(test_matmul_copies_operands_as_cupy_does, test_a_reshape_that_cannot_be_a_view_copies).
A hand-written kernel runs its NumPy reference inside `_standin.one_launch`, counted as
the one launch it is on a GPU (test_one_launch_counts_a_fused_kernel_once).

These checks need the stand-in in this process, so they run in the CI pass with
MINIVIT_FAKE_CUPY=1 (and skip in the plain NumPy pass); the last two run in both.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import minivit as mv
from minivit import backend
from conftest import STANDIN

MANIFEST = json.loads((pathlib.Path(__file__).parent / "fake_cupy" / "manifest.json").read_text())
needs_standin = pytest.mark.skipif(not STANDIN, reason="checks the CuPy stand-in: set "
                                                       "MINIVIT_FAKE_CUPY=1")


@pytest.fixture
def cp(standin):
    return backend.module_for("cuda")


def _here():
    """file:line of the caller, as the counters record call sites."""
    frame = sys._getframe(1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


@needs_standin
def test_the_backend_uses_the_standin(cp):
    assert cp._IS_STANDIN and backend.cupy_unavailable_reason() is None
    x = mv.tensor([1.0, 2.0], device="cuda")
    assert backend.array_module(x.data) is cp and x.device == "cuda"


@needs_standin
def test_its_array_is_not_a_numpy_array_and_refuses_implicit_conversion(cp):
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert not issubclass(cp.ndarray, np.ndarray) and not isinstance(x, np.ndarray)
    message = "Implicit conversion to a NumPy array is not allowed"
    with pytest.raises(TypeError, match=message):
        np.asarray(x)
    with pytest.raises(TypeError, match=message):
        np.testing.assert_allclose(x, np.zeros((2, 3)))
    with pytest.raises(TypeError, match=message):
        np.array([x, x])
    np.testing.assert_array_equal(cp.asnumpy(x), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(x.get(), np.arange(6.0).reshape(2, 3))


@needs_standin
def test_numpy_functions_dispatch_only_to_functions_cupy_has(cp):
    x = cp.asarray(np.array([1.0, 4.0]))
    assert type(np.exp(x)) is cp.ndarray and type(np.concatenate([x, x])) is cp.ndarray
    assert "spacing" not in MANIFEST["cupy"]
    with pytest.raises(TypeError):
        np.spacing(x)                       # a NumPy ufunc CuPy lacks


@needs_standin
def test_cupy_refuses_numpy_operands(cp):
    x = cp.zeros((2, 3))
    host = np.ones((2, 3))
    for mix in (lambda: x + host, lambda: host + x, lambda: cp.add(x, host),
                lambda: cp.maximum(host, x), lambda: x @ host.T, lambda: cp.concatenate([x, host])):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mix()
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        x[...] = host
    x[...] = 2.0                            # Python and NumPy scalars are fine
    assert float((x * np.float32(2)).sum()) == 24.0


@needs_standin
def test_only_names_real_cupy_has_exist(cp):
    assert not hasattr(cp, "errstate")                      # cupyx.errstate, not cupy's
    with pytest.raises(AttributeError):
        cp.random.default_rng(0).permutation(5)            # CuPy's Generator has none
    with pytest.raises(AttributeError):
        cp.random.default_rng(0).normal(size=3)
    assert set(dir(cp)) - {"fake_stats"} <= set(MANIFEST["cupy"])   # the stand-in's own
    assert "fake_stats" in dir(cp) and "fake_stats" not in MANIFEST["cupy"]
    methods = {n for n in dir(cp.ndarray) if not n.startswith("_")}
    assert methods <= set(MANIFEST["cupy.ndarray"]) and "tobytes" in methods
    assert not hasattr(cp.zeros(2), "newbyteorder")


@needs_standin
def test_unravel_index_takes_a_device_array_as_in_cupy(cp):
    with pytest.raises(TypeError, match="can_cast"):
        cp.unravel_index(7, (2, 5))
    rows, cols = cp.unravel_index(cp.asarray(np.array([7, 3])), (2, 5))
    assert cp.asnumpy(rows).tolist() == [1, 0] and cp.asnumpy(cols).tolist() == [2, 3]


@needs_standin
def test_reductions_and_indexing_give_0d_device_arrays(cp):
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    for value in (x.sum(), x.max(), cp.mean(x), x[1, 2], x.argmax(), cp.allclose(x, x)):
        assert type(value) is cp.ndarray and value.ndim == 0
    assert float(x[1, 2]) == 5.0 and x.sum().item() == 15.0


@needs_standin
def test_the_cupy_api_minivit_needs_is_there(cp):
    assert cp.cuda.runtime.getDeviceCount() == 1
    cp.cuda.Device().synchronize()
    cp.cuda.Stream.null.synchronize()
    target = cp.zeros(3)
    import cupyx
    cupyx.scatter_add(target, cp.asarray(np.array([0, 0, 2])), cp.asarray(np.array([1.0, 2.0, 5.0])))
    assert target.get().tolist() == [3.0, 0.0, 5.0]
    a = cp.random.default_rng(3).standard_normal((4,), dtype="float32")
    b = cp.random.default_rng(3).standard_normal((4,), dtype="float32")
    assert a.dtype == np.float32 and cp.asnumpy(a).tolist() == cp.asnumpy(b).tolist()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    end.record()
    end.synchronize()
    assert cp.cuda.get_elapsed_time(start, end) >= 0


@needs_standin
def test_it_counts_reads_copies_and_launches_with_their_call_sites(cp, standin):
    x = cp.asarray(np.ones((4, 4), dtype=np.float32)); copy_site = _here()
    y = (x * 2 + 1).reshape(16)                      # two launches; reshape is a view
    total = float(y.sum()); read_site = _here()
    assert total == 48.0
    counts = standin.counts()
    assert counts == {"reads": 1, "copies": 1, "launches": 3, "bytes": 128 + 128 + 68,
                      "hidden_copies": 0}
    assert standin.counters.reads[0][0] == "float"
    assert standin.counters.reads[0][1].startswith(read_site)
    assert standin.counters.copies[0][1].startswith(copy_site)
    for read in (lambda: y[0].item(), lambda: int(y[0]), lambda: bool(y[0] > 0),
                 lambda: cp.asnumpy(y), lambda: y.get(), lambda: y.tolist(), lambda: repr(y),
                 lambda: y[y > 2]):                  # a boolean mask reads its count back
        standin.reset()
        read()
        assert standin.counts()["reads"] == 1
    standin.reset()
    y[np.array([0, 1])]                              # host indices are copied up first
    assert standin.counts()["copies"] == 1


@needs_standin
def test_each_launch_counts_the_bytes_it_moves(cp, standin):
    """Inputs plus outputs, in bytes: a GPU step at this size is bound by traffic."""
    x = cp.asarray(np.ones((4, 4), dtype=np.float32))        # 64 bytes
    w = cp.asarray(np.ones((4, 8), dtype=np.float32))        # 128 bytes
    idx = cp.asarray(np.array([0, 2]))                       # 16 bytes
    y = cp.zeros((4, 4), dtype=np.float32)
    for op, launches, nbytes in ((lambda: x + x, 1, 64 + 64 + 64),
                                 (lambda: x * 2.0, 1, 64 + 64),          # scalars move 0
                                 (lambda: x.sum(), 1, 64 + 4),
                                 (lambda: cp.sum(x, axis=0), 1, 64 + 16),
                                 (lambda: x @ w, 1, 64 + 128 + 128),
                                 (lambda: cp.matmul(x, w), 1, 64 + 128 + 128),
                                 (lambda: x.astype(np.float64), 1, 64 + 128),
                                 (lambda: x.copy(), 1, 128),
                                 (lambda: x.fill(0.5), 1, 64),
                                 (lambda: x[idx], 1, 16 + 2 * 32),
                                 (lambda: x.__setitem__(0, 1.0), 1, 16),
                                 (lambda: x.__setitem__(slice(0, 2), x[2:]), 1, 32 + 32),
                                 (lambda: cp.concatenate([x, x]), 1, 128 + 128),
                                 (lambda: x.T.ravel(), 1, 64 + 64),
                                 (lambda: x.ravel(), 0, 0),
                                 (lambda: cp.transpose(x), 0, 0),
                                 (lambda: cp.copyto(y, x), 1, 64 + 64),
                                 (lambda: cp.empty((4, 4)), 0, 0),
                                 (lambda: cp.ascontiguousarray(x), 0, 0)):
        standin.reset()
        op()
        counts = standin.counts()
        assert (counts["launches"], counts["bytes"]) == (launches, nbytes)


@needs_standin
def test_matmul_copies_operands_as_cupy_does(cp, standin):
    """CuPy's matmul makes every operand of a product with more than two axes
    C-contiguous first (a copy: one more launch, its bytes read and written); cuBLAS takes
    2-D operands C- or F-contiguous, so only a 2-D operand that is neither is copied."""
    a = cp.asarray(np.ones((2, 3, 4), dtype=np.float32))        # 96 bytes
    b = cp.asarray(np.ones((2, 4, 5), dtype=np.float32))        # 160 bytes, result 120
    b_t = cp.asarray(np.ones((2, 5, 4), dtype=np.float32)).swapaxes(1, 2)
    a @ b
    assert standin.counts()["launches"] == 1 and standin.counts()["hidden_copies"] == 0
    assert standin.counts()["bytes"] == 96 + 160 + 120
    standin.reset()
    a @ b_t; site = _here()
    assert standin.counts()["launches"] == 2 and standin.counts()["hidden_copies"] == 1
    assert standin.counts()["bytes"] == 96 + 160 + 120 + 2 * 160
    assert standin.counters.hidden_copies[0][1].startswith(site)
    standin.reset()
    a @ (b_t * 2.0)                 # CuPy's ufuncs write C-contiguous results: no copy
    assert standin.counts()["launches"] == 2 and standin.counts()["hidden_copies"] == 0
    standin.reset()
    cp.matmul(a, cp.asarray(np.ones((5, 4), dtype=np.float32)).T)  # 2-D, broadcast: copied
    assert standin.counts()["hidden_copies"] == 1
    m = cp.asarray(np.ones((4, 6), dtype=np.float32))
    standin.reset()
    m.T @ m                                                     # F-contiguous: cuBLAS takes it
    assert standin.counts()["launches"] == 1 and standin.counts()["hidden_copies"] == 0
    m[:, ::2] @ m[:3]                                           # neither: copied
    assert standin.counts()["launches"] == 3 and standin.counts()["hidden_copies"] == 1
    out = cp.zeros((6, 6), dtype=np.float32).T
    standin.reset()
    cp.matmul(m.T, m, out=out)                      # out not C-contiguous: written via a copy
    assert standin.counts()["launches"] == 2 and standin.counts()["hidden_copies"] == 1
    half = a.astype(np.float16)
    standin.reset()
    half @ half.swapaxes(1, 2)      # batched float16 computes in float32: 2 casts, 1 back
    assert standin.counts()["launches"] == 4 and standin.counts()["hidden_copies"] == 3


@needs_standin
def test_a_reshape_that_cannot_be_a_view_copies(cp, standin):
    x = cp.asarray(np.arange(24.0, dtype=np.float32).reshape(4, 6))   # 96 bytes
    standin.reset()
    x.reshape(6, 4)
    cp.reshape(x, (24,))
    x.T.reshape(6, 2, 2)                                        # views all along
    assert standin.counts() == {"reads": 0, "copies": 0, "launches": 0, "bytes": 0,
                                "hidden_copies": 0}
    y = x.T.reshape(24); site = _here()
    z = cp.reshape(x.T, (2, 12))
    assert standin.counts()["launches"] == 2 and standin.counts()["hidden_copies"] == 2
    assert standin.counts()["bytes"] == 2 * (96 + 96)
    assert standin.counters.hidden_copies[0][1].startswith(site)
    assert cp.asnumpy(y).tolist() == np.arange(24.0).reshape(4, 6).T.ravel().tolist()
    assert z.shape == (2, 12)


@needs_standin
def test_fake_stats_counts_since_its_last_reset(cp, standin):
    x = cp.asarray(np.ones((2, 8), dtype=np.float32))         # 64 bytes
    x.T.reshape(16)
    float(x.sum())
    first = cp.fake_stats(reset=True)
    assert first == {"d2h": 1, "h2d": 1, "launches": 2, "bytes": 128 + 64 + 4,
                     "hidden_copies": 1}
    assert cp.fake_stats() == {"d2h": 0, "h2d": 0, "launches": 0, "bytes": 0,
                               "hidden_copies": 0}
    x + x
    assert cp.fake_stats()["launches"] == 1 and cp.fake_stats()["launches"] == 1
    assert cp.fake_stats(reset=True)["bytes"] == 192 and cp.fake_stats()["bytes"] == 0


@needs_standin
def test_one_launch_counts_a_fused_kernel_once(cp, standin):
    """A hand-written kernel runs its NumPy reference on the stand-in: one launch, its
    inputs plus outputs in bytes; reads inside still count (they are bugs there too)."""
    x = cp.asarray(np.ones((4, 4), dtype=np.float32))           # 64 bytes
    g = cp.asarray(np.ones(4, dtype=np.float32))                # 16 bytes
    standin.reset()

    def layer_norm(x, gain, eps=1e-5):
        centred = x - x.mean(axis=-1, keepdims=True)
        centred = centred.T.reshape(16).reshape(4, 4).T         # a hidden copy, uncounted
        return centred / cp.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + eps) * gain
    y = standin.one_launch(layer_norm, x, g, eps=1e-6)
    assert standin.counts() == {"reads": 0, "copies": 0, "launches": 1,
                                "bytes": 64 + 16 + 64, "hidden_copies": 0}
    standin.reset()
    standin.one_launch(lambda parts: (parts[0] + 1, parts[1] * 2), [x, g])
    assert standin.counts()["launches"] == 1 and standin.counts()["bytes"] == 2 * (64 + 16)
    standin.reset()
    standin.one_launch(lambda: standin.one_launch(layer_norm, x, g) + 1, nbytes=1000)
    assert standin.counts()["launches"] == 1 and standin.counts()["bytes"] == 1000

    def fails(x):
        x + 1
        raise ValueError("no")
    with pytest.raises(ValueError):
        standin.one_launch(fails, x)
    x + 1                                                       # counting is back
    assert standin.counts()["launches"] == 2 and standin.counts()["bytes"] == 1000 + 128
    standin.reset()
    standin.one_launch(lambda x: float(x.sum()), x); site = _here()
    assert standin.counts()["reads"] == 1 and standin.counts()["launches"] == 1
    assert standin.counters.reads[0][1].startswith(site)


def test_the_standin_is_used_only_when_asked_for():
    """Without MINIVIT_FAKE_CUPY=1 the stand-in is never imported, whatever is installed."""
    code = ("import sys, minivit; minivit.backend.cupy_unavailable_reason(); "
            "m = sys.modules.get('cupy'); print(bool(m and getattr(m, '_IS_STANDIN', False)))")
    env = {k: v for k, v in os.environ.items() if k != "MINIVIT_FAKE_CUPY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.strip() == "False"
    env["MINIVIT_FAKE_CUPY"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.strip() == "True"


def test_the_manifest_matches_the_installed_cupy():
    """Regenerate manifest.json with tests/fake_cupy/make_manifest.py when CuPy changes."""
    env = {k: v for k, v in os.environ.items() if k != "MINIVIT_FAKE_CUPY"}
    code = "import cupy, json; print(json.dumps(sorted(n for n in dir(cupy) if n[0] != '_')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        pytest.skip("the real CuPy is not importable here")
    names = set(json.loads(run.stdout.splitlines()[-1]))
    assert set(MANIFEST["cupy"]) - names == set(), "the manifest lists names CuPy lacks"
