"""Shared fixtures: every test that takes `device` runs once on NumPy ("cpu") and once
on CuPy ("cuda"); the CuPy run is skipped, with the reason, where CuPy or a GPU is
missing, and must pass where both are present."""
import importlib.util
import pathlib

import numpy as np
import pytest

from minivit import backend

_CUPY_REASON = backend.cupy_unavailable_reason()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and _CUPY_REASON is not None:
        pytest.skip(f"CuPy backend unavailable: {_CUPY_REASON}")
    return request.param


def load_example(name):
    """Import examples/<name>.py as a module (the examples are scripts, not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rng():
    return np.random.default_rng(0)
