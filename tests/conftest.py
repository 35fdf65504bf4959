"""Shared fixtures: every test that takes `device` runs once on NumPy ("cpu") and once
on CuPy ("cuda").

Where the CuPy run happens:
- on a machine with an NVIDIA GPU and CuPy: on the GPU;
- with MINIVIT_FAKE_CUPY=1: on the strict CuPy stand-in of tests/fake_cupy (NumPy
  underneath, CuPy's rules on top), so the CuPy path is proven on every machine;
- elsewhere it is skipped, with the reason -- unless MINIVIT_REQUIRE_CUDA=1 (set it on
  GPU runners), which turns "CuPy unavailable" into a failure.
"""
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from minivit import backend
from minivit.autograd import Tensor

_CUPY_REASON = backend.cupy_unavailable_reason()
STANDIN = os.environ.get("MINIVIT_FAKE_CUPY") == "1"
REQUIRE_CUDA = os.environ.get("MINIVIT_REQUIRE_CUDA") == "1"


def require_cupy():
    """Skip the calling test when the CuPy backend is unavailable (fail under
    MINIVIT_REQUIRE_CUDA=1)."""
    if _CUPY_REASON is not None:
        message = f"CuPy backend unavailable: {_CUPY_REASON}"
        if REQUIRE_CUDA:
            pytest.fail(f"MINIVIT_REQUIRE_CUDA=1: {message}", pytrace=False)
        pytest.skip(message)


def pytest_report_header(config):
    if STANDIN:
        return "CuPy backend: the strict stand-in of tests/fake_cupy (MINIVIT_FAKE_CUPY=1)"
    return f"CuPy backend: {'available' if _CUPY_REASON is None else _CUPY_REASON}"


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        require_cupy()
    return request.param


@pytest.fixture
def standin():
    """The stand-in's counters, reset (tests that budget device reads, copies, launches)."""
    if not STANDIN:
        pytest.skip("counts device reads, copies and launches on the CuPy stand-in: "
                    "set MINIVIT_FAKE_CUPY=1")
    backend.module_for("cuda")
    from cupy import _standin
    _standin.reset()
    return _standin


def load_example(name):
    """Import examples/<name>.py as a module (the examples are scripts, not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_cifar():
    """examples/train_cifar.py as a module: tests call its main(argv)."""
    return load_example("train_cifar")


@pytest.fixture
def cifar_dir(tmp_path):
    """A tiny CIFAR-10 in the official layout: 40 training images, 8 test images."""
    from test_data import write_cifar
    write_cifar(tmp_path / "data", n=8)
    return tmp_path / "data"


@pytest.fixture
def keep_default_backend(monkeypatch):
    """For tests that run a program's main(--backend ...), which sets the process-wide
    default backend: put it back afterwards (modules use it with pytest.mark.usefixtures)."""
    monkeypatch.setattr(backend, "_default_device", backend.default_device())


def backend_flag(device):
    """The --backend flag of the programs for a test's device fixture."""
    return ["--backend", {"cpu": "numpy", "cuda": "cupy"}[device]]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def fast_paths():
    """Every fast path on for this test, whatever MINIVIT_REFERENCE says (for the tests
    of the fast paths themselves); minivit.fast as it was afterwards."""
    from minivit import fast
    before = fast.disabled()
    fast.use_reference(False)
    yield fast
    fast.use_reference(False)
    fast.use_reference(True, paths=before)


def numpy_grad(t):
    """A tensor's gradient as a NumPy array, whichever device it is on (None without one)."""
    return None if t.grad is None else backend.to_numpy(t.grad)


def as_numpy(x):
    """A tensor or a raw array of either backend as a NumPy array."""
    return backend.to_numpy(x.data if isinstance(x, Tensor) else x)
