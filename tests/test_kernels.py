"""Hand-written CUDA kernels (minivit/kernels): compiled everywhere, trusted nowhere.

A kernel is a fast path beside its reference; it must compile for every GPU we run on,
equal its reference, and never crash a run or change its numbers when it is wrong.
These tests check, in order:

1. Every kernel of every minivit/kernels/*.cu source compiles with NVRTC for sm_80,
   sm_90 and sm_100, with no GPU: `python -m minivit.kernels --compile-only` prints one
   "ok" line per kernel and architecture and exits 0
   (test_every_kernel_compiles_for_every_architecture).  A source that does not compile
   is reported FAILED with the compiler's log and exit status 1
   (test_a_source_that_does_not_compile_fails_with_its_log); without NVRTC the exit
   status is 2 and the message says how to install it
   (test_a_missing_nvrtc_says_how_to_install_it).
2. The self-check: a kernel that agrees with its reference is "ok" after its first call,
   which costs one device read whatever the number of outputs
   (test_a_kernel_that_agrees_is_ok_at_one_device_read).
3. The fallback: a kernel that answers wrongly prints exactly one warning line naming
   itself and the error, returns the reference's values, and later calls run the
   reference with no further warning (test_a_wrong_kernel_falls_back_with_one_warning);
   likewise a kernel that fails to compile or launch at its first call
   (test_a_kernel_that_raises_falls_back_with_one_warning) or at a later one
   (test_a_launch_that_fails_later_falls_back_with_one_warning).
4. Kernels take only float32 CUDA arrays, and MINIVIT_KERNELS=0 or
   use_reference(paths=["kernels"]) turn them off (test_kernels_take_only_float32_cuda_arrays,
   test_the_switches_turn_kernels_off); then, and for float64 or NumPy input, GELU runs
   no kernel (test_gelu_runs_no_kernel_where_kernels_do_not_apply).
5. GELU through its kernels equals the reference GELU, forward and backward, both forms
   (test_gelu_kernel_path_equals_the_reference); on the stand-in, a training-sized GELU
   forward and backward is 2 launches with the kernels and many more without
   (test_gelu_forward_and_backward_are_two_launches).
6. Every kernel has an example input at a training-like size, on which its reference
   runs (test_every_kernel_has_an_example_input); on a real GPU each kernel equals its
   reference there (test_each_kernel_equals_its_reference_on_a_gpu).
"""
import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import minivit  # noqa: F401  (defines every kernel)
from minivit import backend, kernels
from minivit.kernels import __main__ as compiler
from minivit.ops.activation import GELU, GELU_KERNELS

from conftest import require_cupy

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "minivit" / "kernels").glob("*.cu"))


@pytest.fixture(autouse=True)
def kernel_state():
    """Each test starts with every kernel unchecked and leaves the kernels as it found
    them: their self-check results back, test-only kernels gone."""
    saved = {name: kernel.status for name, kernel in kernels.KERNELS.items()}
    kernels.reset()
    yield
    for name in set(kernels.KERNELS) - set(saved):
        del kernels.KERNELS[name]
    for name, status in saved.items():
        kernels.KERNELS[name].status = status


@pytest.fixture
def kernels_on(monkeypatch, fast_paths):
    """Kernels on for this test, whatever MINIVIT_KERNELS and MINIVIT_REFERENCE say."""
    monkeypatch.setenv("MINIVIT_KERNELS", "1")


@pytest.fixture
def cupy():
    """The CuPy module: a GPU's, or the stand-in's under MINIVIT_FAKE_CUPY=1."""
    require_cupy()
    return backend.module_for("cuda")


def nvrtc_or_skip():
    try:
        compiler.find_nvrtc()
    except OSError as e:
        pytest.skip(f"NVRTC cannot be loaded here ({e}); install it with: {compiler.INSTALL} "
                    "(the project's test extra lists it)")


def doubling(name="test_double", outputs=1):
    """A test-only kernel whose reference doubles its input (and triples it, for two
    outputs); its `run` is what a test replaces to make it wrong or failing."""
    if outputs == 1:
        def reference(x):
            return 2 * x
    else:
        def reference(x):
            return 2 * x, 3 * x
    return kernels.Kernel(name, "gelu.cu", launch=reference, reference=reference)


def float32(xp, *shape, seed=0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def one_warning(capsys, name):
    """The one line a kernel turning itself off writes to stderr."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"minivit: CUDA kernel {name} is off, the reference runs "
                               f"instead: "), lines[0]
    return lines[0]


# --- 1. compiling ---------------------------------------------------------------------------

def test_every_kernel_compiles_for_every_architecture():
    nvrtc_or_skip()
    expected = {(source.name, name, arch) for source in SOURCES
                for name in re.findall(r"__global__\s+void\s+(\w+)", source.read_text())
                for arch in ("80", "90", "100")}
    assert len(expected) >= 12                      # the four GELU kernels, three GPUs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    run = subprocess.run([sys.executable, "-m", "minivit.kernels", "--compile-only"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ok = re.findall(r"^(\S+\.cu)\s+(\w+)\s+sm_(\d+)\s+ok\b", run.stdout, re.MULTILINE)
    assert sorted(ok) == sorted(expected), run.stdout
    assert "FAILED" not in run.stdout


def test_a_source_that_does_not_compile_fails_with_its_log(tmp_path, capsys):
    nvrtc_or_skip()
    (tmp_path / "broken.cu").write_text(
        'extern "C" __global__ void broken(const float* x, float* y, long long n) {\n'
        "    y[0] = x[0]      // no semicolon\n"
        "}\n")
    status = compiler.main(["--compile-only", "--arch", "90", "--folder", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 1
    assert re.search(r"^broken\.cu\s+broken\s+sm_90\s+FAILED$", out, re.MULTILINE), out
    assert "broken.cu(3): error" in out or "error: expected" in out, out   # NVRTC's log
    assert "1 failure" in err


def test_a_missing_nvrtc_says_how_to_install_it(monkeypatch, capsys):
    def no_library(path, *args, **kwargs):
        raise OSError(f"{path}: cannot open shared object file")
    monkeypatch.setattr(compiler.ctypes, "CDLL", no_library)
    assert compiler.main(["--compile-only"]) == 2
    err = capsys.readouterr().err
    assert "NVRTC, the CUDA runtime compiler, was not found" in err
    assert 'pip install "nvidia-cuda-nvrtc-cu12>=12.8"' in err


# --- 2. the self-check ----------------------------------------------------------------------

@pytest.mark.parametrize("outputs", [1, 2])
def test_a_kernel_that_agrees_is_ok_at_one_device_read(standin, capsys, outputs):
    kernel = doubling(outputs=outputs)
    x = float32(backend.module_for("cuda"), 40, 16)
    standin.reset()
    kernel(x)
    assert kernel.status == "ok"
    assert standin.counts()["reads"] == 1, standin.counters.reads
    standin.reset()
    kernel(x)                                      # checked once: no read from now on
    assert standin.counts()["reads"] == 0
    assert capsys.readouterr().err == ""


# --- 3. the fallback ------------------------------------------------------------------------

def test_a_wrong_kernel_falls_back_with_one_warning(device, monkeypatch, capsys):
    kernel = doubling()
    calls = []

    def wrong(x):
        calls.append(x)
        return 2 * x + 1
    monkeypatch.setattr(kernel, "run", wrong)
    x = float32(backend.module_for(device), 40, 16)
    y = kernel(x)
    line = one_warning(capsys, "test_double")
    assert "output 0 differs from the reference by up to 1" in line
    np.testing.assert_array_equal(backend.to_numpy(y), 2 * backend.to_numpy(x))
    assert kernel.status != "ok" and len(calls) == 1
    y = kernel(x)                                  # from now on: the reference, silently
    np.testing.assert_array_equal(backend.to_numpy(y), 2 * backend.to_numpy(x))
    assert len(calls) == 1 and capsys.readouterr().err == ""


def test_a_kernel_that_raises_falls_back_with_one_warning(device, monkeypatch, capsys):
    kernel = doubling()

    def broken(x):
        raise RuntimeError("CompileException: broken.cu(3): error: expected a \";\"\n"
                           "1 error detected in the compilation of \"broken.cu\".")
    monkeypatch.setattr(kernel, "run", broken)
    x = float32(backend.module_for(device), 40, 16)
    y = kernel(x)
    line = one_warning(capsys, "test_double")
    assert line.endswith('RuntimeError: CompileException: broken.cu(3): error: expected a ";"')
    np.testing.assert_array_equal(backend.to_numpy(y), 2 * backend.to_numpy(x))
    kernel(x)
    assert capsys.readouterr().err == ""


def test_a_launch_that_fails_later_falls_back_with_one_warning(device, monkeypatch, capsys):
    kernel = doubling()
    x = float32(backend.module_for(device), 40, 16)
    monkeypatch.setattr(kernel, "run", kernel.reference)
    kernel(x)
    assert kernel.status == "ok" and capsys.readouterr().err == ""

    def fails(x):
        raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: too many resources requested")
    monkeypatch.setattr(kernel, "run", fails)
    y = kernel(x)
    assert "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" in one_warning(capsys, "test_double")
    np.testing.assert_array_equal(backend.to_numpy(y), 2 * backend.to_numpy(x))
    kernel(x)
    assert capsys.readouterr().err == ""


# --- 4. where kernels apply -----------------------------------------------------------------

def test_kernels_take_only_float32_cuda_arrays(cupy, kernels_on):
    x = float32(cupy, 4, 3)
    assert kernels.usable(x) and kernels.usable(x, x)
    assert not kernels.usable(x.astype("float64"))
    assert not kernels.usable(x, x.astype("float64"))
    assert not kernels.usable(np.ones((4, 3), np.float32))


def test_the_switches_turn_kernels_off(cupy, kernels_on, monkeypatch):
    x = float32(cupy, 4, 3)
    monkeypatch.setenv("MINIVIT_KERNELS", "0")
    assert not kernels.usable(x)
    monkeypatch.setenv("MINIVIT_KERNELS", "1")
    assert kernels.usable(x)
    minivit.use_reference(True, paths=["kernels"])      # the fast_paths fixture restores it
    assert not kernels.usable(x)


@pytest.mark.parametrize("case", ["MINIVIT_KERNELS=0", "use_reference", "float64", "numpy"])
def test_gelu_runs_no_kernel_where_kernels_do_not_apply(request, kernels_on, monkeypatch, case):
    called = []
    monkeypatch.setattr(kernels.Kernel, "__call__", lambda self, *args: called.append(self))
    x = float32(np if case == "numpy" else request.getfixturevalue("cupy"), 6, 5)
    if case == "MINIVIT_KERNELS=0":
        monkeypatch.setenv("MINIVIT_KERNELS", "0")
    elif case == "use_reference":
        minivit.use_reference(True, paths=["kernels"])
    elif case == "float64":
        x = x.astype("float64")
    for approximate in ("erf", "tanh"):
        gelu = GELU(approximate)
        y = gelu.forward(x)
        dx = gelu.backward(float32(backend.array_module(x), 6, 5, seed=1).astype(x.dtype))
        assert y.dtype == x.dtype and dx.shape == x.shape
    assert called == []


# --- 5. GELU through its kernels ------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["erf", "tanh"])
def test_gelu_kernel_path_equals_the_reference(cupy, kernels_on, monkeypatch, approximate):
    x, g = float32(cupy, 50, 37), float32(cupy, 50, 37, seed=1)
    gelu = GELU(approximate)
    y, dx = gelu.forward(x), gelu.backward(g)
    assert gelu.saved is None                      # the kernel path saves nothing
    assert [k.status for k in GELU_KERNELS[approximate]] == ["ok", "ok"]
    monkeypatch.setenv("MINIVIT_KERNELS", "0")
    reference = GELU(approximate)
    y_ref, dx_ref = reference.forward(x), reference.backward(g)
    assert reference.saved is not None             # ... and the reference path Phi(x) or t
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(y), backend.to_numpy(y_ref),
                               rtol=1e-4, atol=1e-5)      # each kernel's tolerance
    np.testing.assert_allclose(backend.to_numpy(dx), backend.to_numpy(dx_ref),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("approximate", ["erf", "tanh"])
def test_gelu_forward_and_backward_are_two_launches(standin, kernels_on, monkeypatch,
                                                    approximate):
    from minivit.kernels import gelu as gelu_cuda
    x, g = gelu_cuda.example_backward(backend.module_for("cuda"))
    warm = GELU(approximate)                       # the self-checks, done once per process
    warm.forward(x[:8])
    warm.backward(g[:8])
    launches = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("MINIVIT_KERNELS", setting)
        gelu = GELU(approximate)
        standin.reset()
        gelu.forward(x)
        gelu.backward(g)
        launches[setting] = standin.counts()["launches"]
    assert launches["1"] == 2
    assert launches["0"] >= 10, launches


# --- 6. example inputs, and the kernels on a real GPU ---------------------------------------

@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_every_kernel_has_an_example_input(name):
    kernel = kernels.KERNELS[name]
    assert callable(kernel.example), f"kernel {name} has no example input"
    args = kernel.example(np)
    assert any(backend.is_array(a) and a.dtype == np.float32 for a in args)  # what kernels take
    outputs = kernel.reference(*args)
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        assert out.dtype in (np.float32, np.float64) and np.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_each_kernel_equals_its_reference_on_a_gpu(name, cupy):
    if backend.uses_standin():
        pytest.skip("on the CuPy stand-in a kernel runs its reference: this compares the "
                    "CUDA kernel itself, on a GPU")
    kernel = kernels.KERNELS[name]
    problem = kernel.compare(kernel.example(cupy))
    assert problem is None, f"kernel {name}: {problem}"
