"""The backend contract: one module imports NumPy or CuPy; every other module asks it.

The array module of an array decides where an operation runs, so a single code path
serves both devices.  The checks here: the import rule holds for every file in
minivit/, a missing CuPy or a missing GPU is named in the error, and arrays on two
devices are never silently combined.
"""
import ast
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import minivit as mv
from minivit import backend
from conftest import STANDIN, require_cupy

PACKAGE = pathlib.Path(mv.__file__).parent


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_only_backend_imports_numpy_or_cupy():
    offenders = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path.name != "backend.py" or path.parent != PACKAGE
        if {"numpy", "cupy", "cupyx"} & set(_imported_modules(path)))
    assert offenders == [], f"only minivit/backend.py may import numpy or cupy: {offenders}"


def test_the_import_scan_would_catch_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import numpy as np\n    from cupy import ndarray\n")
    assert set(_imported_modules(bad)) == {"numpy", "cupy"}


def test_missing_cupy_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)        # makes `import cupy` fail
    with pytest.raises(backend.BackendError, match=r"CuPy, which is not installed.*\.\[cuda12\]"):
        backend.use("cupy")
    assert "not installed" in backend.cupy_unavailable_reason()
    assert backend.default_device() == "cpu"              # a failed use() changes nothing


def _fake_cupy(count=None, error=None):
    def get_device_count():
        if error:
            raise error
        return count
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime), ndarray=type(None))


@pytest.mark.parametrize("fake", [_fake_cupy(count=0),
                                  _fake_cupy(error=RuntimeError("cudaErrorNoDevice"))])
def test_missing_gpu_is_named(monkeypatch, fake):
    monkeypatch.delenv("MINIVIT_FAKE_CUPY", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(backend.BackendError, match="CuPy is installed but no CUDA device is present"):
        backend.use("cuda")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown device 'tpu': expected 'cpu' \(NumPy\) or 'cuda'"):
        backend.use("tpu")


def test_environment_variable_chooses_the_backend():
    code = ("import minivit as mv; print(mv.backend.default_device()); "
            "print(type(mv.tensor([1.0]).data).__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MINIVIT_BACKEND": "numpy"}, check=True).stdout
    assert out.split() == ["cpu", "numpy"]
    if backend.cupy_unavailable_reason() is not None:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "MINIVIT_BACKEND": "cupy"})
        assert run.returncode != 0 and "CuPy" in run.stderr


def test_device_mismatch_names_the_operation_and_both_devices(monkeypatch):
    a, b = np.ones(2), np.ones(2)
    # Pretend b lives on the GPU: the check must refuse to combine them.
    monkeypatch.setattr(backend, "device_of", lambda x: "cuda" if x is b else "cpu")
    with pytest.raises(backend.DeviceMismatchError,
                       match=r"Mul: inputs live on different devices: input 0 on cpu .*"
                             r"input 1 on cuda"):
        mv.tensor(a) * mv.Tensor(b)


def test_device_mismatch_on_a_real_gpu():
    require_cupy()
    x = mv.tensor([1.0], device="cpu")
    y = mv.tensor([1.0], device="cuda")
    with pytest.raises(backend.DeviceMismatchError, match=r"Add: .*cpu \(numpy.ndarray\).*"
                                                           r"cuda \(cupy.ndarray\)"):
        x + y


def test_moving_between_devices(device):
    data = np.arange(6.0).reshape(2, 3)
    x = mv.tensor(data, requires_grad=True)                 # default device: cpu
    y = x.to(device)
    assert y.device == device and backend.device_of(y.data) == device
    assert (x.to("cpu") is x) and (y.to(device) is y)
    (y * y).sum().backward()                                # the gradient comes back to the cpu
    assert backend.device_of(x.grad) == "cpu"
    np.testing.assert_array_equal(x.grad, 2 * data)
    np.testing.assert_array_equal(backend.to_numpy(backend.to_device(data, device)), data)
    assert backend.array_module(backend.to_device(data, device)) is backend.module_for(device)


def test_use_sets_where_new_tensors_go(device):
    previous = backend.default_device()
    try:
        backend.use(device)
        assert mv.tensor(np.ones(2)).device == device
    finally:
        backend.use(previous)          # restore, so MINIVIT_BACKEND=cupy runs stay on CuPy


def test_scatter_add_accumulates_repeats(device):
    target = backend.to_device(np.zeros(3), device)
    backend.scatter_add(target, backend.to_device(np.array([0, 0, 2]), device),
                        backend.to_device(np.array([1.0, 2.0, 5.0]), device))
    np.testing.assert_array_equal(backend.to_numpy(target), [3.0, 0.0, 5.0])


def test_generator_is_seeded(device):
    a = backend.generator(3, device).random((4,))
    b = backend.generator(3, device).random((4,))
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert backend.device_of(a) == device


def test_programs_default_to_the_environment_backend():
    code = "import minivit as mv; print(mv.backend.default_backend_name())"
    for value, expected in (("numpy", "numpy"), ("cpu", "numpy"), ("cupy", "cupy"), ("cuda", "cupy")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "MINIVIT_BACKEND": value}, check=True).stdout
        assert out.strip() == expected


def test_only_one_gpu_is_addressed():
    assert backend.device_name("cuda:0") == "cuda" and backend.device_name("CPU") == "cpu"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        backend.device_name("cuda:1")


class _BrokenCupy(types.SimpleNamespace):
    """A CuPy that imports and sees a GPU but lacks NVRTC (kernels) or cuBLAS (matmul)."""

    def __init__(self, missing):
        device = types.SimpleNamespace(synchronize=lambda: None)
        cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                     Device=lambda: device)
        super().__init__(cuda=cuda, ndarray=type(None), __version__="14.2.0", missing=missing)

    def arange(self, n, dtype=None):
        if self.missing == "nvrtc":
            raise RuntimeError("CompileException: libnvrtc.so.12: cannot open shared object file")
        return 1.0

    def ones(self, shape, dtype=None):
        if self.missing == "cublas":
            raise ImportError("libcublas.so.12: cannot open shared object file")
        return 1.0


@pytest.mark.parametrize("missing,library", [("nvrtc", "NVRTC"), ("cublas", "cuBLAS")])
def test_a_cupy_that_cannot_compile_or_multiply_is_named(monkeypatch, missing, library):
    monkeypatch.delenv("MINIVIT_FAKE_CUPY", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", _BrokenCupy(missing))
    with pytest.raises(backend.BackendError, match=rf"found a GPU but cannot .*CUDA {library} "
                                                   rf"library is missing.*Install it with: pip "
                                                   rf"install \"cuda-toolkit\[{missing}\]==12\.\*\""):
        backend.use("cupy")
    assert library in backend.cupy_unavailable_reason()


def standin_python(code, **env):
    """Run `code` in a fresh Python on the CuPy stand-in, with `env` added; its result."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MINIVIT_")}
    environment.update(MINIVIT_FAKE_CUPY="1", PYTHONPATH=os.pathsep.join(
        [str(PACKAGE.parent), environment.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=120)


@pytest.mark.parametrize("missing,library", [("nvrtc", "NVRTC"), ("cublas", "cuBLAS")])
def test_a_missing_cuda_library_is_named_with_the_pip_command_that_brings_it(missing, library):
    """The stand-in fails as CuPy does on a machine without the library's wheel."""
    run = standin_python("from minivit import backend; print(backend.cupy_unavailable_reason())",
                         MINIVIT_FAKE_CUPY_MISSING=missing)
    assert run.returncode == 0, run.stderr
    assert f"cannot {'compile a kernel' if missing == 'nvrtc' else 'multiply matrices'}" in run.stdout
    assert f"CUDA {library} library is missing" in run.stdout
    assert f'pip install "cuda-toolkit[{missing}]==12.*"' in run.stdout
    fine = standin_python("from minivit import backend; print(backend.cupy_unavailable_reason())",
                          MINIVIT_FAKE_CUPY_MISSING="cusolver")
    assert fine.stdout.strip() == "None", fine.stdout + fine.stderr     # not needed to start


@pytest.mark.parametrize("local_rank,devices,expected", [(0, 1, 0), (3, 1, 0), (1, 2, 1),
                                                          (2, 2, 0), (5, 4, 1)])
def test_each_process_takes_the_gpu_of_its_local_rank(local_rank, devices, expected):
    """Several processes on one machine spread over its GPUs: local_rank % device count."""
    run = standin_python(f"from minivit import backend; "
                         f"backend.use('cupy', local_rank={local_rank}); "
                         f"cupy = backend.module_for('cuda'); "
                         f"print(cupy.cuda.Device().id, (backend.asarray([1.0]) * 2).item())",
                         MINIVIT_FAKE_CUPY_DEVICES=str(devices))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(expected), "2.0"]


def test_synchronize_waits_for_the_current_stream(monkeypatch):
    """Timing code must wait for the stream the work went to, which need not be the null
    stream (the stand-in's streams count their synchronisations)."""
    require_cupy()
    if not STANDIN:
        pytest.skip("counts synchronisations on the CuPy stand-in")
    cupy = backend.module_for("cuda")
    null = cupy.cuda.Stream.null.synchronized
    with cupy.cuda.Stream() as stream:
        backend.synchronize("cuda")
    assert stream.synchronized == 1 and cupy.cuda.Stream.null.synchronized == null
    backend.synchronize("cuda")
    assert cupy.cuda.Stream.null.synchronized == null + 1
    backend.synchronize("cpu")                  # NumPy: nothing queued, nothing to do
    assert cupy.cuda.Stream.null.synchronized == null + 1


def test_require_cuda_turns_the_cupy_skips_into_failures(tmp_path):
    """On a GPU runner MINIVIT_REQUIRE_CUDA=1 makes a missing or broken CuPy fail the run
    instead of skipping half the suite; here `import cupy` is made to fail."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("raise ImportError('no CuPy in this test')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MINIVIT_FAKE_CUPY", "MINIVIT_REQUIRE_CUDA")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    test = str(pathlib.Path(__file__).with_name("test_backend.py")) + "::test_scatter_add_accumulates_repeats"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    plain = subprocess.run(command, capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and "1 passed, 1 skipped" in plain.stdout, plain.stdout
    required = subprocess.run(command, capture_output=True, text=True,
                              env={**env, "MINIVIT_REQUIRE_CUDA": "1"})
    assert required.returncode == 1 and "1 passed, 1 error" in required.stdout, required.stdout
    assert "MINIVIT_REQUIRE_CUDA=1: CuPy backend unavailable" in required.stdout
