"""The strict CuPy stand-in (tests/fake_cupy, MINIVIT_FAKE_CUPY=1) behaves like CuPy where
NumPy code goes wrong on a GPU, and counts what costs time there.

Why a stand-in: GPUs are rare on our machines, so most runs would skip every CuPy test.
The stand-in is NumPy underneath, but its arrays are not NumPy arrays: the mistakes
that pass on NumPy and fail on CuPy -- a NumPy function fed a device array, a host
array mixed into device arithmetic, a NumPy-only name (numpy.errstate,
Generator.permutation), a Python int given to unravel_index -- fail here too.  On a
GPU the same tests run on the real CuPy instead.

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
    assert set(dir(cp)) <= set(MANIFEST["cupy"])
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
    assert counts == {"reads": 1, "copies": 1, "launches": 3}
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
