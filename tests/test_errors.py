"""Bad input gets one clear line, never a traceback; a check never passes on NaN; nothing a
user made is lost.

Why gradcheck must refuse NaN: it compares |analytic - numeric| with a tolerance, and
every comparison with NaN is False, so a single NaN would make `error > rtol` false and
the check pass whatever the backward computed.  So a NaN or inf in the inputs is
refused, and one in the output or either gradient is a failure that says where.

The programs: a user's mistake (a damaged file, a wrong flag, an unwritable folder,
Ctrl-C) ends with one line on stderr naming the file or flag and what to do, and a
non-zero exit status; minivit.cli turns those errors into that line (MINIVIT_DEBUG=1
shows the traceback).  Real bugs keep their tracebacks.
"""
import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import minivit as mv
from minivit import checkpoint
from minivit.data import cifar
from test_data import write_cifar

pytestmark = pytest.mark.usefixtures("keep_default_backend")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_program(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(run, *expected):
    """The run failed with exactly one line on stderr, containing each expected text."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert len(lines) == 1, run.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- gradcheck and tensors ---------------------------------------------------------------

class WrongSquare(mv.Function):
    """y = x^2 with a wrong backward (3x instead of 2x)."""

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, g):
        return 3 * self.x * g


class NaNBackward(WrongSquare):
    def backward(self, g):
        return g * float("nan")


def test_gradcheck_refuses_non_finite_inputs(device):
    x = mv.tensor(np.array([1.0, np.nan]), requires_grad=True, device=device)
    with pytest.raises(ValueError, match=r"input 0 has a non-finite value nan at index \(1,\)"):
        mv.gradcheck(lambda x: WrongSquare()(x), x)
    x = mv.tensor(np.array([np.inf, 2.0]), requires_grad=True, device=device)
    with pytest.raises(ValueError, match=r"input 0 has a non-finite value inf at index \(0,\)"):
        mv.gradcheck(lambda x: WrongSquare()(x), x)


def test_gradcheck_fails_on_a_non_finite_output_or_gradient(device):
    x = mv.tensor(np.array([4.0, -1.0]), requires_grad=True, device=device)
    with pytest.raises(mv.GradcheckError, match=r"output of fn has a non-finite value nan "
                                                r"at index \(\)"):
        with np.errstate(invalid="ignore"):
            mv.gradcheck(lambda x: x.sqrt().sum(), x)
    x = mv.tensor(np.array([1.0, 2.0]), requires_grad=True, device=device)
    with pytest.raises(mv.GradcheckError, match="analytic gradient of input 0 has a non-finite"):
        mv.gradcheck(lambda x: NaNBackward()(x), x)
    with pytest.raises(mv.GradcheckError, match="gradcheck failed for input 0"):
        mv.gradcheck(lambda x: WrongSquare()(x), x)          # and finite wrong ones still fail


@pytest.mark.parametrize("values", [np.array([1, 2]), np.array([True, False]),
                                    np.array([1 + 2j])], ids=["int", "bool", "complex"])
def test_only_floating_tensors_take_gradients(values):
    with pytest.raises(TypeError, match=rf"requires_grad=True needs a floating-point tensor "
                                        rf".*got {values.dtype}"):
        mv.tensor(values, requires_grad=True)
    assert mv.tensor(np.ones(values.shape), requires_grad=True).requires_grad


def test_a_bad_backend_variable_is_named_and_minivit_still_imports():
    run = run_program("-c", "import minivit; print('imported')", env={"MINIVIT_BACKEND": "foo"})
    assert run.returncode == 0 and "imported" in run.stdout
    run = run_program("examples/quickstart.py", env={"MINIVIT_BACKEND": "foo"})
    one_line_error(run, "MINIVIT_BACKEND='foo' is not a backend", "'numpy'", "'cupy'")
    run = run_program("lessons/00_arrays_and_backends.py", env={"MINIVIT_BACKEND": "tpu"})
    one_line_error(run, "MINIVIT_BACKEND='tpu'")
    run = run_program("-c", "import minivit; print(minivit.backend.default_device())",
                      env={"MINIVIT_BACKEND": ""})
    assert run.stdout.strip() == "cpu"                        # empty means unset


# --- CIFAR files -------------------------------------------------------------------------

def damaged_pickles():
    good = (b"\x80\x02}q\x00(C\x04dataq\x01C\x03abcq\x02u.")
    return {"empty": b"", "truncated": good[:9], "garbled": b"this is a text file, not a pickle",
            "huge": b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"."}   # 1 TiB of bytes


@pytest.mark.parametrize("kind", sorted(damaged_pickles()))
def test_a_damaged_cifar_file_is_named(tmp_path, kind):
    path = tmp_path / "data_batch_1"
    path.write_bytes(damaged_pickles()[kind])
    with pytest.raises(cifar.CifarFormatError, match=str(path)):
        cifar.read_batch(path)


def test_train_cifar_names_a_damaged_batch_in_one_line(tmp_path):
    folder, _ = write_cifar(tmp_path / "data", n=2)
    (folder / "data_batch_3").write_bytes(damaged_pickles()["truncated"])
    run = run_program("examples/train_cifar.py", "--data-dir", tmp_path / "data", "--out",
                      tmp_path / "run")
    one_line_error(run, "data_batch_3", "not a readable CIFAR-10 batch file")


# --- train_cifar.py ----------------------------------------------------------------------



def tiny(cifar_dir, out, *extra):
    return ["--data-dir", str(cifar_dir), "--no-download", "--no-progress", "--out", str(out),
            "--hidden-size", "16", "--depth", "1", "--num-heads", "2", "--mlp-dim", "16",
            "--batch-size", "16", "--epochs", "1", *extra]


@pytest.fixture
def finished_run(train_cifar, cifar_dir, tmp_path):
    train_cifar.main(tiny(cifar_dir, tmp_path / "run"))
    return tmp_path / "run"


def test_out_is_checked_before_any_work(train_cifar, cifar_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(train_cifar, "train_epoch", lambda *a: pytest.fail("trained anyway"))
    with pytest.raises(SystemExit, match=r"--out .*file/run: cannot write there"):
        train_cifar.main(tiny(cifar_dir, tmp_path / "file" / "run"))
    if os.geteuid() != 0:                                     # root may write anywhere
        (tmp_path / "readonly").mkdir(mode=0o555)
        with pytest.raises(SystemExit, match="cannot write there"):
            train_cifar.main(tiny(cifar_dir, tmp_path / "readonly"))


def test_a_model_shape_that_cannot_work_is_refused_before_training(cifar_dir, tmp_path):
    run = run_program("examples/train_cifar.py", *tiny(cifar_dir, tmp_path / "run", "--num-heads", "3"))
    one_line_error(run, "hidden_size 16 is not divisible by num_heads 3", "--num-heads")
    (tmp_path / "fake.npz").write_text("not a checkpoint")
    run = run_program("examples/train_cifar.py", "--pretrained", tmp_path / "fake.npz",
                      "--data-dir", cifar_dir, "--out", tmp_path / "ft")
    one_line_error(run, "fake.npz")


def test_resume_refuses_flags_that_contradict_the_checkpoint(train_cifar, finished_run,
                                                             cifar_dir):
    with pytest.raises(SystemExit) as info:
        train_cifar.main(tiny(cifar_dir, finished_run, "--resume", "--lr", "0.5",
                              "--hidden-size", "32", "--preset", "gpu"))
    text = str(info.value)
    saved_lr = train_cifar.RECIPES["cpu"]["lr"]             # no --preset: the cpu recipe's
    assert f"--lr 0.5 (saved: {saved_lr:g})" in text and "--hidden-size 32 (saved: 16)" in text
    assert "--preset gpu sets model=cifar-small (saved: cifar-tiny)" in text
    # the flags it was started with, and a higher --epochs, are fine: the run goes on
    final = train_cifar.main(tiny(cifar_dir, finished_run, "--resume", "--epochs", "2"))
    assert final["epoch"] == 2


def damage(path, kind):
    """A copy of a good checkpoint damaged in one way."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind in ("bad meta", "missing key", "wrong shape"):
        with zipfile.ZipFile(path) as z:
            entries = {name: z.read(name) for name in z.namelist()}
        if kind == "bad meta":
            entries["meta.npy"] = entries["meta.npy"][:-20] + b"{not json" + b" " * 11
        elif kind == "missing key":
            del entries["model/head.bias.npy"]
        else:
            arrays, meta = checkpoint.load_npz(path)
            arrays["model/head.bias"] = np.zeros(3, np.float32)
            checkpoint.save_npz(path, arrays, meta)
            return
        with zipfile.ZipFile(path, "w") as z:
            for name, blob in entries.items():
                z.writestr(name, blob)


@pytest.mark.parametrize("kind", ["truncated", "text", "bad meta", "missing key", "wrong shape"])
def test_resume_from_a_damaged_checkpoint_is_one_line(train_cifar, finished_run, cifar_dir,
                                                      kind):
    damage(finished_run / "checkpoint.npz", kind)
    with pytest.raises(SystemExit) as info:
        train_cifar.main(tiny(cifar_dir, finished_run, "--resume", "--epochs", "2"))
    text = str(info.value)
    assert text.startswith("error: --resume") and "checkpoint.npz" in text, text
    assert "allow_pickle" not in text and "\n" not in text


def test_a_log_without_a_checkpoint_is_never_overwritten(train_cifar, cifar_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.9}) + "\n")
    with pytest.raises(SystemExit, match="log.jsonl exists without a checkpoint"):
        train_cifar.main(tiny(cifar_dir, out))
    assert json.loads((out / "log.jsonl").read_text())["test_acc"] == 0.9


def test_ctrl_c_ends_training_with_one_line(cifar_dir, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "examples/train_cifar.py", *tiny(cifar_dir, tmp_path / "run"),
         "--epochs", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even when this
    # test runs in a background job, whose children start with Ctrl-C ignored
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 60
    while not log.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert re.fullmatch(r"interrupted: the checkpoint after epoch \d+ is kept at .*"
                        r"checkpoint\.npz; continue with --resume", stderr.strip()), stderr
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")["epoch"] >= 1


# --- predict.py and the lessons ----------------------------------------------------------

def test_predict_refuses_images_over_the_pixel_limit_by_name(finished_run, tmp_path):
    from PIL import Image
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 30), (200, 20, 30)).save(tmp_path / "small.png")
    run = run_program("examples/predict.py", tmp_path / "big.png", tmp_path / "small.png",
                      "--checkpoint", finished_run / "checkpoint.npz", "--max-pixels", "10000")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "big.png: 300x200 = 60,000 pixels, over the limit of 10,000" in run.stderr
    assert "--max-pixels" in run.stderr and str(tmp_path / "small.png") in run.stdout
    run = run_program("examples/predict.py", tmp_path / "big.png", "--checkpoint",
                      finished_run / "checkpoint.npz")
    assert run.returncode == 0                                # the default limit is 50 MP


def test_predict_names_a_damaged_checkpoint(tmp_path):
    (tmp_path / "ckpt.npz").write_text("hello")
    run = run_program("examples/predict.py", tmp_path / "x.png", "--checkpoint",
                      tmp_path / "ckpt.npz")
    one_line_error(run, "ckpt.npz")


def test_a_lesson_refuses_an_unwritable_out_folder(tmp_path):
    (tmp_path / "file").write_text("")
    run = run_program("lessons/03_patches_im2col.py", "--out", tmp_path / "file" / "figures")
    one_line_error(run, "--out", "cannot write there")
