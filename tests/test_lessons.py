"""Every lesson runs, passes its own checks and writes the figures it announces.

The lessons are the first way people meet minivit; each one gradient-checks what it
builds and exits non-zero when a check fails, so running them all keeps the path
through the paper working, on NumPy and on CuPy (the GPU, or the stand-in of
tests/fake_cupy under MINIVIT_FAKE_CUPY=1).
"""
import pathlib
import re
import subprocess
import sys

import pytest

LESSONS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "lessons").glob("[0-9][0-9]_*.py"))


def test_the_path_is_complete():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(len(numbers))), [p.name for p in LESSONS]


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_and_passes(lesson, tmp_path, device):
    backend_name = {"cpu": "numpy", "cuda": "cupy"}[device]
    run = subprocess.run([sys.executable, str(lesson), "--out", str(tmp_path),
                          "--backend", backend_name],
                         capture_output=True, text=True, timeout=300,
                         cwd=lesson.parents[1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"(backend: {backend_name}" in run.stdout
    assert "[PASS]" in run.stdout and "[FAIL]" not in run.stdout
    assert "All checks passed." in run.stdout
    for figure in re.findall(r"^figure: (.+)$", run.stdout, flags=re.M):
        path = pathlib.Path(figure)
        assert path.parent == tmp_path and path.read_bytes()[:4] == b"\x89PNG"


def test_quickstart_runs_on_the_default_backend(device):
    """examples/quickstart.py follows MINIVIT_BACKEND, as its docstring says."""
    import os
    root = LESSONS[0].parents[1]
    env = {**os.environ, "MINIVIT_BACKEND": {"cpu": "numpy", "cuda": "cupy"}[device]}
    run = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"backend: {device}" in run.stdout
    error = float(re.search(r"max relative error (\S+)  PASS", run.stdout).group(1))
    assert error < 1e-6
