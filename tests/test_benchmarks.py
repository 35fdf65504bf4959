"""The benchmark programs at their smallest settings, run as their users run them.

A benchmark is only worth its numbers if it runs where it is meant to: the GPU
(CuPy) as well as the CPU.  Each program runs here as a subprocess of this Python
with this environment, so MINIVIT_FAKE_CUPY=1 reaches it and the "cuda" cases run on
the CuPy stand-in without a GPU, and each test reads the numbers back out of the
output: a timing that does not parse as a positive number is a broken benchmark.

benchmarks/gpu_report.py runs every other program; its smoke run must produce every
section, and a section that fails (no CuPy, a program exiting with an error, a bug)
must be written into the report rather than stop it.
"""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from minivit import backend
from test_data import write_cifar

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUPY_REASON = backend.cupy_unavailable_reason()


def run(*args, timeout=120, **env):
    """Run a script of the repository with this Python and this environment; its completed
    process.  One BLAS/OpenMP thread unless the environment says otherwise: these runs
    measure nothing, and on a busy 2-core machine threads spinning at each barrier (NumPy's
    OpenBLAS and PyTorch's OpenMP in one process) make a step of a tiny model take seconds."""
    environment = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]), **env}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def positive(text):
    value = float(text.replace(",", ""))
    assert value > 0, text
    return value


def number_after(label, output, unit):
    """The number that follows `label` on its line, before `unit`."""
    match = re.search(re.escape(label) + r".*?([\d.,]+) " + re.escape(unit), output)
    assert match, f"no '{label} ... {unit}' in:\n{output}"
    return positive(match[1])


def load_gpu_report():
    path = ROOT / "benchmarks" / "gpu_report.py"
    spec = importlib.util.spec_from_file_location("gpu_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- engine_overhead.py and vit_step.py, on either backend ---------------------------------

def test_engine_overhead_smoke(device):
    result = run("benchmarks/engine_overhead.py", "--smoke",
                 MINIVIT_BACKEND="cupy" if device == "cuda" else "numpy")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"({device})" in out.splitlines()[0]
    raw_module = "cupy" if device == "cuda" else "numpy"
    for label in (f"raw {raw_module} op", "Tensor op under no_grad",
                  "Tensor op recording the graph", "forward + backward through the engine"):
        number_after(label, out, "us")
    number_after("raw matmuls", out, "ms"), number_after("through the engine", out, "ms")
    positive(re.search(r"\(([\d.]+)x the raw matmuls\)", out)[1])


def test_vit_step_smoke(device):
    backend_name = "cupy" if device == "cuda" else "numpy"
    result = run("benchmarks/vit_step.py", "--backend", backend_name, "--preset", "cifar-tiny",
                 "--batch", "4", "--repeat", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{backend_name} backend ({device})" in out
    step = number_after("training step", out, "ms")
    assert positive(re.search(r"\(([\d,]+) images/s\)", out)[1]) == pytest.approx(4 / step * 1e3,
                                                                                   rel=0.05, abs=1)
    assert "18 matmuls x 3, 4 attentions x 6" in out          # cifar-tiny: 4 blocks
    floor = number_after("its matrix products alone", out, "ms")
    ratio = positive(re.search(r"step / matmul floor\s+([\d.]+)x", out)[1])
    assert ratio == pytest.approx(step / floor, rel=0.1, abs=0.01)
    shares = [float(s) for s in re.findall(r"([\d.]+)%$", out, re.MULTILINE)]
    assert "matmul forward" in out and 50 < sum(shares) < 100.5     # ops under 0.5% unlisted


def test_a_missing_cupy_is_one_clear_line(tmp_path):
    if CUPY_REASON is None:
        pytest.skip("CuPy works here")
    for script in ("engine_overhead.py", "vit_step.py"):
        result = run(f"benchmarks/{script}", "--backend", "cupy")
        assert result.returncode != 0
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


# --- torch_throughput.py, where PyTorch is installed ---------------------------------------

def test_torch_throughput_smoke(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "throughput.json"
    result = run("benchmarks/torch_throughput.py", "--device", "cpu", "--preset", "cifar-tiny",
                 "--batch", "4", "--steps", "1", "--baselines", "eager,fast", "--json", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("same logits") == 2 and "MISMATCH" not in result.stdout
    report = json.loads(path.read_text())
    assert report["preset"] == "cifar-tiny" and report["batch"] == 4 and report["logits_match"]
    assert [row["name"] for row in report["rows"]] == ["minivit", "eager", "fast"]
    minivit_speed = report["rows"][0]["images_per_s"]
    for row in report["rows"]:
        assert row["images_per_s"] > 0
        assert row["minivit_over_this"] == pytest.approx(minivit_speed / row["images_per_s"])
        assert 0 <= row["logits_max_difference"] < 1e-3
        assert row["device"].startswith("CPU") and row["torch_version"] == report["torch_version"]
        assert f"{row['images_per_s']:,.0f}" in result.stdout
    assert "fused" in report["rows"][2]["label"] or "foreach" in report["rows"][2]["label"]


def test_torch_compile_failure_is_a_line_not_a_crash(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "throughput.json"
    result = run("benchmarks/torch_throughput.py", "--device", "cpu", "--preset", "cifar-tiny",
                 "--batch", "4", "--steps", "1", "--baselines", "compile",
                 "--compile-backend", "no_such_backend", "--json", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^torch\.compile: unavailable \(.+\)$", result.stdout, re.MULTILINE)
    report = json.loads(path.read_text())
    assert [row["name"] for row in report["rows"]] == ["minivit"]
    assert [u["name"] for u in report["unavailable"]] == ["compile"]


# --- gpu_report.py --------------------------------------------------------------------------

def test_gpu_report_smoke_has_every_section(tmp_path):
    write_cifar(tmp_path / "data", n=8)
    out = tmp_path / "report.md"
    start = time.monotonic()
    result = run("benchmarks/gpu_report.py", "--smoke", "--data-dir", tmp_path / "data",
                 "--out", out, timeout=180)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 120
    report = out.read_text()
    assert report.strip() == result.stdout.strip()
    sections = re.split(r"^## \d\. ", report, flags=re.MULTILINE)[1:]
    assert len(sections) == 7
    statuses = dict(re.findall(r"(\w+) (ok|skipped|failed)", report.strip().splitlines()[-1]))
    assert list(statuses) == ["gpu", "warmup", "tests", "vit_step", "kernels", "torch", "train"]
    gpu, warmup, tests, vit_step, kernels, torch, train = sections

    if CUPY_REASON is None:                     # a GPU, or the stand-in
        assert statuses["gpu"] == "ok" and re.search(r"\| CuPy \| \d+\.\d+", gpu)
        assert statuses["warmup"] == "ok" and re.search(r"^\| cifar-tiny \| \d+ s \|$", warmup,
                                                         re.MULTILINE), warmup
        assert re.search(r"\| CUDA runtime \| \d+\.\d+ \(\d+\)", gpu)
        step = re.search(r"A training step takes \*\*([\d.,]+) ms\*\*", vit_step)
        assert statuses["vit_step"] == "ok" and positive(step[1])
        assert statuses["kernels"] == "ok", kernels
        check_kernels_section(kernels)
    else:                                       # the failures are in the report, with the reason
        assert statuses["gpu"] == "failed" and "**Failed**: BackendError" in gpu
        assert statuses["warmup"] == "failed" and "exited with status 1" in warmup
        assert statuses["vit_step"] == "failed" and "exited with status 1" in vit_step
        assert "error: " in vit_step
        assert statuses["kernels"] == "failed" and "**Failed**: BackendError" in kernels

    counts = re.search(r"\| passed \| failed \| errors \| skipped \| deselected \|\n.*\n"
                       r"\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", tests)
    assert statuses["tests"] == "ok" and counts, tests
    passed, failed, errors, skipped, _ = map(int, counts.groups())
    assert passed + failed + errors + skipped > 0
    if CUPY_REASON is not None:                 # MINIVIT_REQUIRE_CUDA=1: no CuPy fails them
        assert failed + errors > 0 and passed == 0
        assert re.search(r"^\d+ failing with: .*MINIVIT_REQUIRE_CUDA", tests, re.MULTILINE)
        assert re.search(r"^- (FAILED|ERROR) `tests/test_\w+\.py::\w+\[cuda", tests, re.MULTILINE)

    if importlib.util.find_spec("torch") is None:
        assert statuses["torch"] == "skipped" and "PyTorch is not importable" in torch
    else:
        assert statuses["torch"] == "ok" and "| minivit" in torch and "PyTorch eager" in torch

    if CUPY_REASON is None and importlib.util.find_spec("matplotlib") is not None:
        assert statuses["train"] == "ok" and "finished" in train
        rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+)% \| "
                          r"([\d,]+) \|", train, re.MULTILINE)
        assert [int(r[0]) for r in rows] == [1, 2]
        assert all(positive(r[5]) for r in rows)
    else:                                       # e.g. no CuPy: train_cifar.py exits with 1
        assert statuses["train"] == "failed" and "The end of its output" in train


def check_kernels_section(text):
    """The kernels section: a row per kernel of minivit/kernels that agrees with its
    reference and has two positive times; on the stand-in, a training step's counts with
    fewer launches and bytes with the kernels than without."""
    import minivit  # noqa: F401  (defines every kernel)
    from minivit import kernels
    rows = dict((name, rest) for name, rest in
                re.findall(r"^\| `(\w+)` \| \S+\.cu \| (.+) \|$", text, re.MULTILINE))
    assert sorted(rows) == sorted(kernels.KERNELS), text
    for name, rest in rows.items():
        check, t_kernel, t_reference, speedup = rest.split(" | ")[1:]
        assert check == "agrees", (name, rest)
        positive(t_kernel), positive(t_reference)
        assert positive(speedup.rstrip("x")) == pytest.approx(
            float(t_reference) / float(t_kernel), rel=0.1, abs=0.1)
    if backend.uses_standin():
        counted = {name: (positive(launches), positive(mb)) for name, launches, mb in
                   re.findall(r"^\| (with the kernels|MINIVIT_KERNELS=0) \| ([\d,]+) \| "
                              r"([\d,]+) MB \|", text, re.MULTILINE)}
        assert set(counted) == {"with the kernels", "MINIVIT_KERNELS=0"}, text
        (launches, mb), (launches_off, mb_off) = counted["with the kernels"], counted[
            "MINIVIT_KERNELS=0"]
        assert launches < launches_off and mb < mb_off
    else:
        assert "come from the CuPy stand-in only" in text


def test_gpu_report_without_data_skips_training_and_honours_skip(tmp_path):
    result = run("benchmarks/gpu_report.py", "--smoke", "--skip",
                 "gpu,warmup,tests,vit_step,kernels,torch", "--data-dir", tmp_path / "nothing")
    assert result.returncode == 0, result.stderr
    assert "## 7. CIFAR-10 training run" in result.stdout
    assert "Skipped: --data-dir" in result.stdout
    assert "holds no cifar-10-batches-py" in result.stdout
    assert "## 1." not in result.stdout
    assert result.stdout.strip().endswith("Sections: train skipped")


def test_a_failing_section_is_reported_not_raised(tmp_path):
    gpu_report = load_gpu_report()
    args = gpu_report.parse_args(["--smoke"])

    def broken(args, timeout):
        raise ZeroDivisionError("a bug in a section")
    status, text = gpu_report.run_section("vit_step", broken, args, 10)
    assert status == "failed" and "**Failed**: ZeroDivisionError: a bug in a section" in text
    assert text.startswith("## 4. ")

    bad = tmp_path / "data" / "cifar-10-batches-py"       # a data folder of garbage
    bad.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (bad / name).write_bytes(b"not a pickle")
    args = gpu_report.parse_args(["--smoke", "--data-dir", str(tmp_path / "data")])
    status, text = gpu_report.run_section("train", gpu_report.section_train, args, 60)
    assert status == "failed" and "exited with status 1" in text and "error: " in text


def test_a_program_past_its_timeout_is_stopped(tmp_path):
    gpu_report = load_gpu_report()
    start = time.monotonic()
    status, output = gpu_report.run(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1)
    assert status is None and "started" in output and "KeyboardInterrupt" in output
    assert time.monotonic() - start < 10


def test_gpu_report_runs_where_git_is_missing(tmp_path):
    """A GPU machine may have no git binary: the header says the commit is unknown."""
    result = run("benchmarks/gpu_report.py", "--smoke", "--skip",
                 "warmup,tests,vit_step,kernels,torch,train", PATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d UTC on .*, minivit unknown;", result.stdout,
                     re.MULTILINE), result.stdout
    assert "Sections: gpu " in result.stdout


def test_gpu_report_times_pytorch_in_fp32_and_with_tf32(monkeypatch):
    """On a GPU each torch run goes twice: fp32, then TF32 matrix products on both sides
    (CUPY_TF32=1 in the environment, --tf32 to torch_throughput.py)."""
    gpu_report = load_gpu_report()
    calls = []

    def fake_run(cmd, timeout, env=None):
        tf32 = "--tf32" in cmd
        calls.append((tf32, (env or {}).get("CUPY_TF32")))
        row = {"name": "minivit", "label": "minivit (CuPy)", "images_per_s": 100.0 * (1 + tf32),
               "minivit_over_this": 1.0, "logits_max_difference": 0.0}
        result = {"preset": "cifar-small", "batch": 256, "steps": 30, "parameters": 1,
                  "device": "a GPU", "torch_version": "2", "logits_match": True,
                  "rows": [row], "unavailable": []}
        pathlib.Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(result))
        return 0, ""
    monkeypatch.setattr(gpu_report, "torch_probe", lambda timeout: ("2", True))
    monkeypatch.setattr(gpu_report, "run", fake_run)
    text = gpu_report.section_torch(gpu_report.parse_args([]), 600)
    assert calls == [(False, None), (True, "1")]
    assert "batch 256, fp32, timed" in text and "batch 256, TF32 matrix products" in text
    assert "| minivit (CuPy) | 100 |" in text and "| minivit (CuPy) | 200 |" in text


def test_a_kernel_that_differs_fails_the_kernels_section(standin, monkeypatch):
    """A kernel that disagrees with its reference is named in a failed kernels section."""
    import minivit  # noqa: F401
    from minivit import kernels
    gpu_report = load_gpu_report()
    kernel = kernels.KERNELS["gelu_erf_forward"]
    monkeypatch.setattr(kernel, "run", lambda x: kernel.reference(x) + 1)
    monkeypatch.setattr(gpu_report, "step_counts", lambda preset, batch: {
        s: {"launches": 1, "bytes": 1, "hidden_copies": 0, "reads": 0} for s in ("1", "0")})
    with pytest.raises(gpu_report.Failed) as failed:
        gpu_report.section_kernels(gpu_report.parse_args(["--smoke"]), 60)
    text = str(failed.value)
    assert "| `gelu_erf_forward` | gelu.cu | 8320x384 | **differs** |" in text
    assert "- `gelu_erf_forward`: output 0 differs from the reference by up to 1" in text
    assert "| `gelu_erf_backward` | gelu.cu | 8320x384, 8320x384 | agrees |" in text
