"""The programs on the command line: nothing a user made is lost, every flag is checked,
paths are taken as typed, and the programs end as command-line tools end.

1. One run at a time per --out: a second run into a folder that a running one holds
   refuses in one line naming the folder and the process, and a killed run leaves no
   stale lock (test_a_second_run_into_the_same_out_is_refused).
2. Only the temporary files this project writes (.NAME.XXXXXXXX.tmp of its own files)
   are removed at startup; a user's .notes.tmp stays
   (test_only_our_own_temporary_files_are_removed).
3. A diverging run stops with one line and a non-zero exit, keeping the last good
   checkpoint and never writing one with NaN in it
   (test_a_diverging_run_never_writes_a_nan_checkpoint,
   test_non_finite_weights_after_an_epoch_stop_the_run,
   test_a_non_finite_test_loss_stops_the_run); loading refuses non-finite weights,
   naming the first array (test_loading_refuses_non_finite_weights_naming_the_first).
4. `~` is expanded in every path flag of every program
   (test_every_path_flag_expands_the_home_folder,
   test_out_with_a_tilde_goes_to_the_home_folder).
5. An empty path is refused (test_an_empty_path_is_refused).
6. Every number flag of every program refuses NaN, infinities, text and values out of
   range in argparse's usage error, naming the kind of number it takes
   (test_every_number_flag_refuses_what_is_not_a_number_in_range,
   test_number_types_refuse_non_finite_values_and_name_the_kind).
7. The stop on divergence names the flags that set the size of a step
   (test_the_divergence_stop_names_the_flags_that_can_cause_it).
8. Ctrl-C ends with status 130 and a line of its own that says what exists
   (test_ctrl_c_in_the_first_epoch_says_there_is_no_checkpoint,
   test_ctrl_c_in_the_comparison_says_which_results_are_kept).
9. A progress bar only on a terminal, for evaluation too; a log gets none of its `\\r`
   (test_no_progress_bar_goes_into_a_log, test_evaluation_shows_progress_on_a_terminal).
10. Output piped into a reader that stops (`| head`) ends the program quietly
    (test_a_closed_pipe_ends_a_program_quietly).
11. --threads N runs NumPy's BLAS on N threads for the run
    (test_threads_sets_the_blas_thread_count).
Then the smaller promises: counts in the singular, each figure named once, --help
without empty or doubled defaults, a full disk named by file, the CuPy stand-in named
as such.
"""
import argparse
import errno
import os
import pathlib
import pty
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minivit import checkpoint, cli
from conftest import load_example

pytestmark = pytest.mark.usefixtures("keep_default_backend")

ROOT = pathlib.Path(__file__).resolve().parents[1]




def tiny(cifar_dir, out, *extra):
    return ["--data-dir", str(cifar_dir), "--no-download", "--no-progress", "--out", str(out),
            "--hidden-size", "16", "--depth", "1", "--num-heads", "2", "--mlp-dim", "16",
            "--batch-size", "16", "--epochs", "1", *extra]


def python(*args, **kwargs):
    """A child Python in the repository root, started with Ctrl-C at its default (even when
    the tests run in a background job, whose children start with Ctrl-C ignored)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


# --- 1, 2: the output folder ---------------------------------------------------------------

def test_a_second_run_into_the_same_out_is_refused(train_cifar, cifar_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = python("-c", "import sys, time; from minivit import cli\n"
                          "with cli.lock_folder(sys.argv[1]):\n"
                          "    print('held', flush=True); time.sleep(120)", out,
                    stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as info:
            train_cifar.main(tiny(cifar_dir, out))
        assert str(info.value) == (f"error: --out {out} is in use by another run (process "
                                   f"{holder.pid}); wait for it to end, or choose another --out")
        assert not (out / "checkpoint.npz").exists() and not (out / "log.jsonl").exists()
    finally:
        holder.kill()                                     # SIGKILL: no clean-up runs
        holder.wait()
    final = train_cifar.main(tiny(cifar_dir, out))        # the OS released its lock
    assert final["epoch"] == 1


def test_only_our_own_temporary_files_are_removed(train_cifar, cifar_dir, tmp_path):
    out = tmp_path / "run"
    train_cifar.main(tiny(cifar_dir, out))
    ours = [out / ".checkpoint.npz.a1b2c3d4.tmp", out / ".curves.png.x9_y8z7w.tmp",
            out / ".log.jsonl.zzzzzzzz.tmp"]
    users = [out / ".notes.tmp", out / ".checkpoint.npz.mine.tmp", out / ".data.a1b2c3d4.tmp",
             out / ".figures.tmp"]
    for path in ours + users:
        path.write_bytes(b"something")
    train_cifar.main(tiny(cifar_dir, out, "--resume", "--epochs", "2"))
    assert not any(path.exists() for path in ours)
    assert all(path.read_bytes() == b"something" for path in users)


# --- 3, 7: divergence -----------------------------------------------------------------------

# NumPy warns of the overflow a diverging run makes; the program sets these warnings aside
DIVERGING = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@DIVERGING
def test_a_diverging_run_never_writes_a_nan_checkpoint(train_cifar, cifar_dir, tmp_path):
    """One AdamW step of size about --lr moves every weight by 1e30: the logits overflow and
    the test loss is NaN although the training loss, measured before the step, was not."""
    with pytest.raises(SystemExit) as info:
        train_cifar.main(tiny(cifar_dir, tmp_path / "run", "--lr", "1e30", "--steps", "1",
                              "--classifier", "token", "--gelu", "erf"))
    text = str(info.value)
    assert re.match(r"error: the (weights became NaN or infinite|test loss became nan) "
                    r"(in|after) epoch 1", text), text
    assert "no checkpoint was written yet" in text and "\n" not in text
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@DIVERGING
def test_non_finite_weights_after_an_epoch_stop_the_run(train_cifar, cifar_dir, tmp_path,
                                                        monkeypatch):
    real = train_cifar.train_epoch

    def poisoned_in_epoch_two(model, optimizer, loader, epoch, *rest):
        result = real(model, optimizer, loader, epoch, *rest)
        if epoch == 1:
            optimizer.buffers[0].data[3] = np.inf
        return result
    monkeypatch.setattr(train_cifar, "train_epoch", poisoned_in_epoch_two)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"the weights became NaN or infinite in epoch 2 .*"
                                         r"the last good checkpoint \(after epoch 1\) is kept"):
        train_cifar.main(tiny(cifar_dir, out, "--epochs", "3"))
    saved = checkpoint.load_checkpoint(out / "checkpoint.npz")       # finite: it loads
    assert saved["epoch"] == 1


def test_a_non_finite_test_loss_stops_the_run(train_cifar, cifar_dir, tmp_path, monkeypatch):
    real = train_cifar.evaluate
    calls = []

    def nan_the_second_time(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        return dict(result, test_loss=float("nan")) if len(calls) == 2 else result
    monkeypatch.setattr(train_cifar, "evaluate", nan_the_second_time)
    with pytest.raises(SystemExit, match=r"the test loss became nan after epoch 2; stopping\. "
                                         r"the last good checkpoint \(after epoch 1\)"):
        train_cifar.main(tiny(cifar_dir, tmp_path / "run", "--epochs", "3", "--eval-every", "1"))
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")["epoch"] == 1


@DIVERGING
@pytest.mark.parametrize("flags,named", [
    (["--weight-decay", "1e30", "--lr", "0.002"], ["--weight-decay (now 1e+30)", "--lr (now 0.002)",
                                  "--clip-norm (now 1)"]),
    (["--optimizer", "sgd", "--lr", "1e30", "--clip-norm", "0"],
     ["--lr (now 1e+30)", "--momentum (now 0.9)", "--clip-norm (now 0: off)"])])
def test_the_divergence_stop_names_the_flags_that_can_cause_it(train_cifar, cifar_dir,
                                                              tmp_path, flags, named):
    with pytest.raises(SystemExit) as info:
        train_cifar.main(tiny(cifar_dir, tmp_path / "run", *flags))
    text = str(info.value)
    assert "stopping" in text and "warm-up" in text
    for flag in named:
        assert flag in text, text


def test_loading_refuses_non_finite_weights_naming_the_first(tmp_path):
    from minivit.nn import VisionTransformer
    from minivit.official import load_official, save_official
    model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8,
                              depth=1, num_heads=2, mlp_dim=16)
    model.head.bias.data[1] = np.nan
    checkpoint.save_checkpoint(tmp_path / "ckpt.npz", model)
    with pytest.raises(checkpoint.CheckpointError, match=r"its array model/head\.bias holds "
                                                         r"non-finite values"):
        checkpoint.model_from_checkpoint(tmp_path / "ckpt.npz")
    model.head.bias.data[1] = 0.0
    model.pos_embed.data[0, 0, 0] = -np.inf
    save_official(model, tmp_path / "official.npz")
    with pytest.raises(ValueError, match=r"its array Transformer/posembed_input/pos_embedding "
                                         r"holds non-finite values"):
        load_official(tmp_path / "official.npz")


# --- 4, 5: paths ----------------------------------------------------------------------------

class Captured(Exception):
    pass


def parser_of(call):
    """The ArgumentParser that call() builds and parses with."""
    def capture(self, *args, **kwargs):
        raise Captured(self)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        patch.setattr(sys, "excepthook", sys.excepthook)      # lessons/common installs cli
        with pytest.raises(Captured) as info:
            call()
    return info.value.args[0]


def load_script(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lesson_parser():
    sys.path.insert(0, str(ROOT / "lessons"))
    try:
        common = load_script("lessons/common.py")
    finally:
        sys.path.remove(str(ROOT / "lessons"))
    return common.Lesson("00", "a lesson")


PROGRAMS = {
    "examples/train_cifar.py": lambda m: m.parse_args([]),
    "examples/predict.py": lambda m: m.parse_args([]),
    "examples/visualize.py": lambda m: m.parse_args([]),
    "examples/inductive_bias.py": lambda m: m.parse_args([]),
    "benchmarks/engine_overhead.py": lambda m: m.main(),
    "benchmarks/vit_step.py": lambda m: m.main(),
    "benchmarks/scaling.py": lambda m: m.main(),
    "benchmarks/torch_throughput.py": lambda m: m.main(),
    "benchmarks/gpu_report.py": lambda m: m.parse_args([]),
    "lessons/common.py": None,
}


def program_parser(program):
    if program == "benchmarks/torch_throughput.py":
        pytest.importorskip("torch")
    if PROGRAMS[program] is None:
        return parser_of(lesson_parser)
    module = load_script(program)
    return parser_of(lambda: PROGRAMS[program](module))


def value_actions(parser):
    """The flags and positionals that take a value."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


PATH_NAMES = {"out", "data_dir", "checkpoint", "labels", "pretrained", "images", "json",
              "train_out", "test_files"}


def test_every_program_is_in_the_list():
    found = {str(p.relative_to(ROOT)) for folder in ("examples", "benchmarks")
             for p in (ROOT / folder).glob("*.py") if "argparse" in p.read_text()}
    assert found | {"lessons/common.py"} == set(PROGRAMS)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_path_flag_expands_the_home_folder(program, monkeypatch, tmp_path):
    parser = program_parser(program)
    monkeypatch.setenv("HOME", str(tmp_path))
    for action in value_actions(parser):
        if action.dest in PATH_NAMES:
            assert action.type is cli.path, (program, action.dest)
    assert cli.path("~/x") == str(tmp_path / "x") and cli.path("a/~") == "a/~"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_an_empty_path_is_refused(program, capsys):
    parser = program_parser(program)
    for action in value_actions(parser):
        if action.type is cli.path and action.option_strings:
            flag = action.option_strings[0]
            for empty in ("", "  "):
                with pytest.raises(SystemExit) as info:
                    parser.parse_args([flag, empty])
                assert info.value.code == 2
                assert f"argument {flag}: expected a path, got {empty!r}" in capsys.readouterr().err


def test_out_with_a_tilde_goes_to_the_home_folder(train_cifar, cifar_dir, tmp_path,
                                                  monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    train_cifar.main(tiny(cifar_dir, "~/run"))
    assert (home / "run" / "checkpoint.npz").is_file()
    assert list(work.iterdir()) == []                         # no folder named ~


# --- 6: numbers -----------------------------------------------------------------------------

@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_number_flag_refuses_what_is_not_a_number_in_range(program, capsys):
    parser = program_parser(program)
    numbers = 0
    for action in value_actions(parser):
        assert action.type not in (int, float), (program, action.dest)   # unchecked
        expected = getattr(action.type, "expected", None)
        if expected is None or not action.option_strings:
            continue
        numbers += 1
        flag = action.option_strings[0]
        for bad in ("nan", "inf", "-inf", "1e400", "abc", "", "-1", "0", "1e9999999"):
            try:
                action.type(bad)
                continue                                    # "0" is in range for this flag
            except argparse.ArgumentTypeError:
                pass
            with pytest.raises(SystemExit) as info:
                parser.parse_args([f"{flag}={bad}"])
            assert info.value.code == 2
            err = capsys.readouterr().err
            assert err.splitlines()[-1].endswith(f"error: argument {flag}: expected {expected}, "
                                                 f"got {bad!r}"), err
    assert numbers or program == "lessons/common.py"


def test_number_types_refuse_non_finite_values_and_name_the_kind():
    for text in ("nan", "NaN", "inf", "-inf", "1e400", "abc", ""):
        for kind in (cli.positive, cli.non_negative, cli.probability):
            with pytest.raises(argparse.ArgumentTypeError, match=f"expected {kind.expected}"):
                kind(text)
    assert cli.positive.expected == "a positive number"
    assert cli.positive_int("3") == 3 and cli.positive("1e-3") == 1e-3
    assert cli.seed("0") == 0 and cli.seed("4294967295") == 2 ** 32 - 1
    for kind, text in ((cli.positive_int, "0"), (cli.positive_int, "1.5"), (cli.count, "-1"),
                       (cli.positive, "0"), (cli.probability, "1"), (cli.seed, "-1"),
                       (cli.seed, str(2 ** 32))):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{re.escape(text)}'"):
            kind(text)


# --- 8: Ctrl-C ------------------------------------------------------------------------------

def read_all(fd, process, timeout=60):
    """Everything written to a pty's master until the child ends."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:                      # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


def test_ctrl_c_in_the_first_epoch_says_there_is_no_checkpoint(cifar_dir, tmp_path):
    """SIGINT at the second step of the first epoch, with stderr on a terminal (where the
    progress bar is drawn): exit status 130, and the line starts on a line of its own."""
    script = ("import os, runpy, signal, sys\n"
              "from minivit.optim import AdamW\n"
              "real = AdamW.step\n"
              "def step(self):\n"
              "    real(self)\n"
              "    if self.steps == 2:\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "AdamW.step = step\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = [a for a in tiny(cifar_dir, tmp_path / "run", "--epochs", "3") if a != "--no-progress"]
    master, slave = pty.openpty()
    process = python("-c", script, "examples/train_cifar.py", *args, stdout=subprocess.DEVNULL,
                     stderr=slave, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(slave)
    stderr = read_all(master, process)
    process.wait(timeout=60)
    os.close(master)
    assert process.returncode == 130, stderr
    assert "epoch 1/3 [" in stderr and "Traceback" not in stderr, stderr
    before, _, line = stderr.rpartition("interrupted: ")
    assert before.endswith("\n"), repr(stderr)                   # not on the bar's line
    assert line.strip() == ("no checkpoint was written yet (the first epoch had not finished): "
                            "there is nothing to resume; start the run again")
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_ctrl_c_in_the_comparison_says_which_results_are_kept(cifar_dir, tmp_path,
                                                             monkeypatch):
    inductive_bias = load_example("inductive_bias")
    real, calls = inductive_bias.evaluate, []

    def interrupted_in_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(inductive_bias, "evaluate", interrupted_in_the_second_run)
    out = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt, match=rf"^the results of 1 finished run are in "
                                                rf"{re.escape(str(out / 'results.md'))}$"):
        inductive_bias.main(["--data-dir", str(cifar_dir), "--no-download", "--models", "cnn",
                             "--sizes", "8", "16", "--steps", "1", "--out", str(out)])
    assert (out / "results.md").is_file()


# --- 9: progress ----------------------------------------------------------------------------

class Terminal:
    """A stand-in for stderr on a terminal."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


def test_no_progress_bar_goes_into_a_log(train_cifar, cifar_dir, tmp_path, capsys):
    args = [a for a in tiny(cifar_dir, tmp_path / "run", "--epochs", "2") if a != "--no-progress"]
    train_cifar.main(args)
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    assert len(re.findall(r"^epoch +\d+/2 ", out, flags=re.M)) == 2     # one line per epoch


def test_evaluation_shows_progress_on_a_terminal(train_cifar, monkeypatch):
    from minivit.nn import VisionTransformer
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    model = VisionTransformer(image_size=32, patch_size=8, num_classes=10, hidden_size=8,
                              depth=1, num_heads=2, mlp_dim=16)
    images = np.zeros((10, 3, 32, 32), np.uint8)
    labels = np.arange(10) % 10
    monkeypatch.setattr(cli.Progress, "due", lambda self: True)
    train_cifar.evaluate(model, images, labels, 4, (0.5,) * 3, (0.5,) * 3, "cpu",
                         show_progress=True)
    assert "\rtest [" in terminal.text and "0/10" in terminal.text and "8/10" in terminal.text
    assert terminal.text.endswith("\r")                          # the bar is cleared after


# --- 10: pipes ------------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["examples/train_cifar.py", "examples/predict.py"])
def test_a_closed_pipe_ends_a_program_quietly(program, cifar_dir, tmp_path):
    """The reader of stdout is gone before the program writes (as `| head` is after its
    lines): no message, the status of a program ended by SIGPIPE."""
    if program.endswith("predict.py"):
        from PIL import Image
        from minivit.nn import VisionTransformer
        model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8,
                                  depth=1, num_heads=2, mlp_dim=16)
        checkpoint.save_checkpoint(tmp_path / "ckpt.npz", model,
                                   normalization={"mean": [0.5] * 3, "std": [0.5] * 3})
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        args = ["--checkpoint", tmp_path / "ckpt.npz", tmp_path / "a.png"]
    else:
        args = tiny(cifar_dir, tmp_path / "run")
    process = python(program, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert stderr == "" and process.returncode == cli.BROKEN_PIPE, (process.returncode, stderr)


# --- 11: threads ----------------------------------------------------------------------------

def test_threads_sets_the_blas_thread_count(train_cifar, cifar_dir, tmp_path, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = lambda: [p["num_threads"] for p in threadpoolctl.threadpool_info()
                    if p["user_api"] == "blas"]
    if not blas():
        pytest.skip("threadpoolctl finds no BLAS library under NumPy here")
    before, during = blas(), []
    real = train_cifar.train_epoch
    monkeypatch.setattr(train_cifar, "train_epoch",
                        lambda *a: (during.append(blas()), real(*a))[1])
    train_cifar.main(tiny(cifar_dir, tmp_path / "run", "--threads", "1"))
    assert during == [[1] * len(before)]
    assert blas() == before                                       # given back afterwards


# --- the smaller promises -------------------------------------------------------------------

def test_counts_of_one_are_singular(train_cifar, cifar_dir, tmp_path, capsys):
    train_cifar.main(tiny(cifar_dir, tmp_path / "run", "--train-subset", "1", "--batch-size",
                          "1"))
    out = capsys.readouterr().out
    assert "training on 1 image, testing on 8; 1 step (1 epoch of 1), batch 1" in out
    assert "after 1 epoch (" in out
    assert cli.plural(0, "image") == "0 images" and cli.plural(10_000, "step") == "10,000 steps"
    assert cli.plural(1, "class") == "1 class" and cli.plural(3, "class") == "3 classes"


def test_each_figure_is_named_once(train_cifar, cifar_dir, tmp_path, capsys):
    train_cifar.main(tiny(cifar_dir, tmp_path / "run"))
    out = capsys.readouterr().out
    figures = sorted((tmp_path / "run" / "figures").glob("*.png"))
    assert len(figures) == 3
    for path in figures:
        assert out.count(path.name) == 1, out


@pytest.mark.parametrize("program", ["examples/train_cifar.py", "examples/predict.py",
                                     "examples/visualize.py", "examples/inductive_bias.py"])
def test_help_shows_no_empty_or_doubled_defaults(program, monkeypatch):
    monkeypatch.delenv("MINIVIT_BACKEND", raising=False)
    text = program_parser(program).format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    backend = text[text.index("\n  --backend {numpy,cupy}"):]
    backend = backend[:backend.index("\n  -", 1)]
    assert backend.count("default") == 1, backend


def test_a_full_disk_names_the_file_being_written(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as info:
        checkpoint.atomic_write(tmp_path / "checkpoint.npz", full)
    assert cli.message(info.value) == (f"error: {tmp_path / 'checkpoint.npz'}: "
                                       "No space left on device")
    assert list(tmp_path.iterdir()) == []                    # no temporary left behind
    with pytest.raises(OSError) as info:                      # a figure written directly
        with cli.writing(tmp_path / "curves.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert cli.message(info.value) == f"error: {tmp_path / 'curves.png'}: No space left on device"


def test_the_cupy_stand_in_is_named_as_such():
    env = {**os.environ, "MINIVIT_FAKE_CUPY": "1", "MINIVIT_BACKEND": "cupy",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("backend:"))
    assert line.startswith("backend: cuda (the CuPy stand-in, MINIVIT_FAKE_CUPY=1: NumPy "
                           "underneath, no GPU)"), line
