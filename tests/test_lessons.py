"""Every lesson runs, passes its own checks and writes the figures it announces.

The lessons are the first way people meet minivit; each one gradient-checks what it
builds and exits non-zero when a check fails, so running them all keeps the path
through the paper working.
"""
import pathlib
import re
import subprocess
import sys

import pytest

LESSONS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "lessons").glob("[0-9][0-9]_*.py"))


def test_the_path_is_complete():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(14)), [p.name for p in LESSONS]


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_and_passes(lesson, tmp_path):
    run = subprocess.run([sys.executable, str(lesson), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300,
                         cwd=lesson.parents[1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[PASS]" in run.stdout and "[FAIL]" not in run.stdout
    assert "All checks passed." in run.stdout
    for figure in re.findall(r"^figure: (.+)$", run.stdout, flags=re.M):
        path = pathlib.Path(figure)
        assert path.parent == tmp_path and path.read_bytes()[:4] == b"\x89PNG"
