"""One command on a GPU machine, one Markdown report of what the project needs to know.

    python benchmarks/gpu_report.py --data-dir ~/data --out report.md
    python benchmarks/gpu_report.py --skip tests,train                # the benchmarks only
    python benchmarks/gpu_report.py --smoke --data-dir DIR            # seconds, for the tests

Sections, in order (leave any out with --skip NAME[,NAME...]):

  gpu       the GPU's name, CuPy, CUDA runtime and driver versions
  warmup    one tiny step of each model timed below, so CuPy compiles (and caches on
            disk) their kernels before any timing; says how long that took
  tests     the test suite's [cuda] cases (pytest -k cuda with MINIVIT_REQUIRE_CUDA=1,
            so a missing GPU fails them instead of skipping): counts and failing ids
  vit_step  benchmarks/vit_step.py --backend cupy: one training step against the time
            of its matrix products alone
  kernels   each hand-written CUDA kernel of minivit/kernels against its reference on its
            example input (do they agree, and the time of each); on the CuPy stand-in
            also the launches and bytes of one cifar-small batch-128 training step with
            the kernels and without (MINIVIT_KERNELS=0), which only the stand-in counts
  torch     benchmarks/torch_throughput.py --device cuda: training throughput of minivit
            on CuPy against PyTorch eager, PyTorch "fast" (SDPA + fused AdamW) and
            torch.compile on the same GPU, in fp32 and again with TF32 matrix products
            (CUPY_TF32=1; skipped where PyTorch is not importable)
  train     examples/train_cifar.py --preset gpu --backend cupy, stopped after
            --train-minutes, then its OUT/log.jsonl: images/s and test accuracy per epoch
            (needs --data-dir, a folder holding cifar-10-batches-py/)

Every section stands alone: an error is written into its section and the others
still run.  The programs run as subprocesses (this Python, the repository root as
working directory and on PYTHONPATH), each with a timeout, so the whole report fits
in --budget seconds (default 600).  Each section is printed as it finishes and, with
--out, the file is rewritten after each one, so a run stopped early keeps what it had.
--smoke shrinks every section to seconds (tiny models, one step, a training run on
--train-subset, two test files) to check the report itself, e.g. on the CuPy stand-in
(MINIVIT_FAKE_CUPY=1) on a machine without a GPU.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # run from a checkout without installing

from minivit import backend, cli  # noqa: E402

SECTIONS = ("gpu", "warmup", "tests", "vit_step", "kernels", "torch", "train")
TITLES = {"gpu": "GPU and software", "warmup": "Warming CuPy's kernel cache",
          "tests": "Test suite on CuPy ([cuda] cases)",
          "vit_step": "One training step against its matmul floor (vit_step.py)",
          "kernels": "Hand-written CUDA kernels against their references",
          "torch": "Training throughput against PyTorch (torch_throughput.py)",
          "train": "CIFAR-10 training run (train_cifar.py --preset gpu)"}
# Seconds each section may take at most, and the least worth starting it with.  On a
# cold cache the tests compile about 650 distinct kernels at 0.13-0.15 s each.
CAPS = {"warmup": 180, "tests": 300, "vit_step": 60, "kernels": 120, "torch": 240}
FLOORS = {"warmup": 10, "tests": 20, "vit_step": 10, "kernels": 10, "torch": 20, "train": 60}
SMOKE_TEST_FILES = ["tests/test_loss.py", "tests/test_norm.py"]


class Skipped(Exception):
    """A section that cannot run here (no data, no PyTorch, no time left): says why."""


class Failed(Exception):
    """A section whose program failed: its message and the end of the program's output."""


# --- running programs ---------------------------------------------------------------------

def child_env(**changes):
    """This environment, with the repository root in front of PYTHONPATH and `changes`
    applied (a value of None removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def stop(proc, grace=20):
    """SIGINT to the program's process group (Python stops with KeyboardInterrupt, pytest
    prints its summary), then SIGTERM, then SIGKILL, each after `grace` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            pass


def interruptible():
    """In the child before it starts: Ctrl-C's default action back.  A shell starts
    background jobs with SIGINT ignored, and a child inherits that, so `stop` could not
    interrupt it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(cmd, timeout, env=None):
    """Run `cmd` from the repository root; (exit status, or None when it was stopped at
    `timeout` seconds, and its output: stdout and stderr together)."""
    print(f"[gpu_report] {shlex.join(str(c) for c in cmd)}  (timeout {timeout:.0f} s)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryFile() as out:          # a file, not a pipe: nothing can block
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or child_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=interruptible)
        try:
            status = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            stop(proc)
            status = None
        except KeyboardInterrupt:                  # its own session does not get our Ctrl-C
            stop(proc, grace=5)
            raise
        out.seek(0)
        return status, out.read().decode(errors="replace")


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def tail(text, lines=15):
    return "\n".join(text.rstrip().splitlines()[-lines:])


def code_block(text):
    return f"```\n{text.rstrip()}\n```"


def fail_unless_ok(what, status, output, timeout):
    if status is None:
        raise Failed(f"{what} did not finish within {timeout:.0f} s; the end of its output:\n\n"
                     + code_block(tail(output)))
    if status != 0:
        raise Failed(f"{what} exited with status {status}; the end of its output:\n\n"
                     + code_block(tail(output)))


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- (a) the GPU ---------------------------------------------------------------------------

def cuda_version(number):
    """CUDA's integer versions, e.g. 12040 -> "12.4 (12040)"."""
    return f"{number // 1000}.{number % 1000 // 10} ({number})"


def section_gpu(args, timeout):
    cupy = backend.module_for("cuda")              # the BackendError says what is missing
    runtime = cupy.cuda.runtime
    rows = []

    def add(what, get):
        try:
            rows.append((what, get()))
        except Exception as e:                     # one missing detail spoils nothing else
            rows.append((what, f"unavailable ({type(e).__name__}: {e})"))

    props = runtime.getDeviceProperties(0)
    name = props["name"]
    add("GPU", lambda: name.decode() if isinstance(name, bytes) else name)
    add("GPU memory", lambda: f"{props['totalGlobalMem'] / 2 ** 30:.1f} GiB")
    add("compute capability", lambda: f"{props['major']}.{props['minor']}")
    add("GPUs visible", runtime.getDeviceCount)
    add("CuPy", lambda: cupy.__version__)
    add("CUDA runtime", lambda: cuda_version(runtime.runtimeGetVersion()))
    add("CUDA driver", lambda: cuda_version(runtime.driverGetVersion()))
    add("NumPy", lambda: backend.module_for("cpu").__version__)
    add("Python", platform.python_version)
    text = table(["", ""], rows)
    if getattr(cupy, "_IS_STANDIN", False):
        text = ("**CuPy is the NumPy-backed stand-in of tests/fake_cupy (MINIVIT_FAKE_CUPY=1): "
                "no real GPU; the timings below are CPU timings.**\n\n" + text)
    return text


# --- (b) the kernel cache ------------------------------------------------------------------

def warmup_presets(args):
    """The models the timed sections run: the torch runs' presets and --preset gpu's."""
    if args.smoke:
        return ["cifar-tiny"]
    presets = [spec.partition(":")[0] for spec in args.torch_runs.split(",")] + ["cifar-small"]
    return list(dict.fromkeys(presets))


def section_warmup(args, timeout):
    """CuPy compiles each kernel the first time a process meets it and keeps it in its
    disk cache (~/.cupy/kernel_cache), so one tiny step of every model here makes the
    timings below those of warm kernels, in every later process."""
    deadline, rows = time.monotonic() + timeout, []
    for preset in warmup_presets(args):
        cmd = [sys.executable, "benchmarks/vit_step.py", "--backend", "cupy", "--preset", preset,
               "--batch", "2", "--repeat", "1"]
        start = time.monotonic()
        status, output = run(cmd, deadline - start)
        fail_unless_ok(f"the warm-up step of {preset}", status, output, deadline - start)
        rows.append((preset, duration(time.monotonic() - start)))
    return ("One training step of each model at batch 2, so that later sections time warm "
            "kernels:\n\n" + table(["model", "warm-up"], rows))


# --- (c) the tests -------------------------------------------------------------------------

def section_tests(args, timeout):
    files = SMOKE_TEST_FILES if args.smoke and not args.test_files else args.test_files
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-rfEs", "-p", "no:cacheprovider",
           *files]
    env = child_env(MINIVIT_REQUIRE_CUDA="1", MINIVIT_BACKEND=None, COLUMNS="200")
    status, output = run(cmd, timeout, env)
    # pytest's last word: "3 failed, 9 passed, 2 skipped, 40 deselected in 12.3s"
    summaries = re.findall(r"^.*\d+ (?:passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s.*$",
                           output, re.MULTILINE)
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in
              re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                         summaries[-1] if summaries else "")}
    failing = re.findall(r"^(FAILED|ERROR) (.+?)(?: - (.*))?$", output, re.MULTILINE)
    skip_reasons = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", output, re.MULTILINE)
    if not counts:
        raise Failed(f"pytest gave no summary (exit status {status}); the end of its output:"
                     f"\n\n{code_block(tail(output))}")
    lines = [f"`{shlex.join(cmd[1:])}` with MINIVIT_REQUIRE_CUDA=1, MINIVIT_BACKEND unset:",
             "", table(["passed", "failed", "errors", "skipped", "deselected"],
                       [[counts.get(k, 0) for k in ("passed", "failed", "error", "skipped",
                                                     "deselected")]])]
    if status is None:
        lines += ["", f"**Stopped at the {timeout:.0f} s timeout: the counts cover the tests "
                      "run until then.**"]
    by_message = {}                                 # one line per error, then its tests
    for kind, test_id, message in failing:
        key = " ".join(message.split()).rstrip(".") or "(no message)"
        by_message.setdefault(key, []).append(f"{kind} `{test_id}`")
    for message, tests in by_message.items():
        lines += ["", f"{len(tests)} failing with: {message[:300]}", ""]
        lines += [f"- {test}" for test in tests]
    if skip_reasons:
        lines += ["", "Skipped:", ""]
        lines += [f"- {n} x {reason[:200]}" for n, reason in skip_reasons[:10]]
    return "\n".join(lines)


# --- (d) vit_step --------------------------------------------------------------------------

def section_vit_step(args, timeout):
    cmd = [sys.executable, "benchmarks/vit_step.py", "--backend", "cupy"]
    if args.smoke:
        cmd += ["--preset", "cifar-tiny", "--batch", "4", "--repeat", "1"]
    status, output = run(cmd, timeout)
    fail_unless_ok("vit_step.py", status, output, timeout)
    step = re.search(r"training step .*?([\d.,]+) ms\s+\(([\d,]+) images/s\)", output)
    floor = re.search(r"its matrix products alone .*?([\d.,]+) ms", output)
    ratio = re.search(r"step / matmul floor\s+([\d.,]+)x", output)
    summary = ""
    if step and floor and ratio:
        summary = (f"A training step takes **{step[1]} ms** ({step[2]} images/s), "
                   f"**{ratio[1]}x** the {floor[1]} ms of its matrix products alone.\n\n")
    return summary + f"`{shlex.join(cmd[1:])}`:\n\n" + code_block(output)


# --- (e) the CUDA kernels ------------------------------------------------------------------

def best_seconds(fn, args, repeat):
    """The best of `repeat` runs of fn(*args), each bracketed by device synchronisations."""
    best = float("inf")
    for _ in range(repeat):
        backend.synchronize("cuda")
        start = time.perf_counter()
        fn(*args)
        backend.synchronize("cuda")
        best = min(best, time.perf_counter() - start)
    return best


def shapes(args):
    return ", ".join("x".join(map(str, a.shape)) for a in args if backend.is_array(a))


def step_counts(preset, batch):
    """What the CuPy stand-in counts in one training step (forward, cross-entropy, backward,
    AdamW), with the kernels and with MINIVIT_KERNELS=0: {setting: counts}.  The first
    step of each setting is not counted (it runs the kernels' self-checks)."""
    import numpy
    import minivit as mv
    from cupy import _standin
    from minivit import fast
    from minivit.optim import AdamW
    model = mv.nn.VisionTransformer(preset).to("cuda")
    optimizer = AdamW(model.parameters(), lr=1e-3)
    rng = numpy.random.default_rng(0)
    size = model.config.image_size
    images = mv.tensor(rng.standard_normal((batch, 3, size, size), dtype=numpy.float32),
                       device="cuda")
    labels = backend.to_device(rng.integers(0, model.config.num_classes, batch), "cuda")

    def step():
        model.zero_grad()
        mv.cross_entropy(model(images), labels).backward()
        optimizer.step()
    counts, before, off = {}, os.environ.get("MINIVIT_KERNELS"), fast.disabled()
    fast.use_reference(False, paths=["kernels"])     # even under MINIVIT_REFERENCE=1
    try:
        for setting in ("1", "0"):
            os.environ["MINIVIT_KERNELS"] = setting
            step()
            _standin.reset()
            step()
            counts[setting] = _standin.counts()
    finally:
        if before is None:
            os.environ.pop("MINIVIT_KERNELS", None)
        else:
            os.environ["MINIVIT_KERNELS"] = before
        fast.use_reference(True, paths=off)
    return counts


def section_kernels(args, timeout):
    import minivit  # noqa: F401  (defines every kernel)
    from minivit import kernels
    cupy = backend.module_for("cuda")
    standin = getattr(cupy, "_IS_STANDIN", False)
    repeat = 1 if args.smoke else 5
    rows, problems = [], []
    for name, kernel in sorted(kernels.KERNELS.items()):
        if kernel.example is None:
            rows.append((f"`{name}`", kernel.file, "-", "no example input", "-", "-", "-"))
            continue
        example = kernel.example(cupy)
        try:
            problem = kernel.compare(example)
        except Exception as e:                     # a compile or launch error
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem is not None:
            problems.append(f"- `{name}`: {problem}")
            rows.append((f"`{name}`", kernel.file, shapes(example), "**differs**", "-", "-", "-"))
            continue
        t_kernel = best_seconds(kernel.run, example, repeat)
        t_reference = best_seconds(kernel.reference, example, repeat)
        rows.append((f"`{name}`", kernel.file, shapes(example), "agrees",
                     f"{t_kernel * 1e3:.3f}", f"{t_reference * 1e3:.3f}",
                     f"{t_reference / t_kernel:.1f}x"))
    off = ("" if kernels.on() else "; kernels are off for training here (MINIVIT_KERNELS=0 "
           "or MINIVIT_REFERENCE=1), these run them all the same")
    lines = [f"{len(rows)} kernels (minivit/kernels), each on its example input against its "
             f"reference, best of {repeat} run{'s' if repeat != 1 else ''} bracketed by device "
             f"synchronisations{off}:",
             "", table(["kernel", "source", "example input", "against the reference",
                        "kernel (ms)", "reference (ms)", "speed-up"], rows)]
    if standin:
        lines += ["", "On the CuPy stand-in a kernel runs its reference: these are CPU times of "
                      "the same computation, not a measurement."]
    if problems:
        lines += ["", "Kernels that differ from their reference or fail (training falls back "
                      "to the reference, with one warning line):", ""] + problems
    preset, batch = ("cifar-tiny", 4) if args.smoke else ("cifar-small", 128)
    if standin:
        counts = step_counts(preset, batch)
        lines += ["", f"One training step of {preset} at batch {batch} (forward, cross-entropy, "
                      "backward, AdamW), counted by the CuPy stand-in (launches: kernels and "
                      "array operations; bytes: their inputs plus outputs; hidden copies: the "
                      "copies CuPy makes of non-contiguous matmul operands and reshapes):", "",
                  table(["", "launches", "bytes moved", "hidden copies", "device reads"],
                        [[label, f"{c['launches']:,}", f"{c['bytes'] / 1e6:,.0f} MB",
                          f"{c.get('hidden_copies', 0):,}", f"{c['reads']:,}"]
                         for label, c in (("with the kernels", counts["1"]),
                                          ("MINIVIT_KERNELS=0", counts["0"]))])]
    else:
        lines += ["", "Launch and traffic counts of a training step come from the CuPy stand-in "
                      "only: `MINIVIT_FAKE_CUPY=1 python benchmarks/gpu_report.py --skip "
                      "gpu,warmup,tests,vit_step,torch,train` on any machine."]
    if problems:
        raise Failed("\n".join(lines))
    return "\n".join(lines)


# --- (f) PyTorch ---------------------------------------------------------------------------

def torch_probe(timeout):
    """(version, has CUDA) of the PyTorch this Python imports; Skipped where it cannot."""
    status, output = run([sys.executable, "-c", "import torch; print(torch.__version__); "
                          "print(torch.cuda.is_available())"], timeout)
    if status != 0:
        raise Skipped(f"PyTorch is not importable here ({tail(output, 1) or 'timed out'}); "
                      "no comparison")
    version, cuda = output.split()[-2:]
    return version, cuda == "True"


def section_torch(args, timeout):
    deadline = time.monotonic() + timeout
    version, has_cuda = torch_probe(min(60, timeout))
    device = "cuda"
    lines = []
    if not has_cuda:
        if not args.smoke:
            raise Skipped(f"PyTorch {version} here has no CUDA; no comparison on the GPU")
        device = "cpu"
        lines += [f"**PyTorch {version} has no CUDA here: this smoke run compares on the CPU "
                  "(minivit on NumPy).**", ""]
    runs = ["cifar-tiny:4"] if args.smoke else args.torch_runs.split(",")
    precisions = [False, True] if device == "cuda" else [False]     # TF32: a GPU setting
    for spec in runs:
        for tf32 in precisions:
            left = deadline - time.monotonic()
            preset, _, batch = spec.partition(":")
            if left < 5:
                lines += [f"{preset} batch {batch}{', TF32' if tf32 else ''}: not run, "
                          "no time left.", ""]
                continue
            lines += torch_run(args, device, preset, batch or "256", tf32, left)
    return "\n".join(lines)


def torch_run(args, device, preset, batch, tf32, timeout):
    """The lines of one torch_throughput.py run: fp32, or with TF32 matrix products on
    both sides (CUPY_TF32=1 for CuPy, --tf32 for PyTorch)."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "throughput.json"
        cmd = [sys.executable, "benchmarks/torch_throughput.py", "--device", device,
               "--preset", preset, "--batch", batch, "--json", path,
               "--steps", "1" if args.smoke else str(args.torch_steps)]
        if args.smoke:
            cmd += ["--baselines", "eager,fast"]
        if tf32:
            cmd += ["--tf32"]
        status, output = run(cmd, timeout, child_env(CUPY_TF32="1" if tf32 else None))
        result = json.loads(path.read_text()) if path.is_file() else None
    if result is None:
        fail_unless_ok(f"torch_throughput.py --preset {preset}", status, output, timeout)
        raise Failed(f"torch_throughput.py --preset {preset} wrote no JSON:\n\n"
                     + code_block(tail(output)))
    precision = "TF32 matrix products (CUPY_TF32=1, PyTorch allow_tf32)" if tf32 else "fp32"
    lines = [f"**{result['preset']}**, {result['parameters']:,} parameters, batch "
             f"{result['batch']}, {precision}, timed over {result['steps']} steps on "
             f"{result['device']}, PyTorch {result['torch_version']}:", ""]
    lines.append(table(["", "images/s", "minivit / this", "logits: max difference"],
                       [[row["label"], f"{row['images_per_s']:,.0f}",
                         f"{row['minivit_over_this']:.2f}x",
                         "-" if row["name"] == "minivit"
                         else f"{row['logits_max_difference']:.1e}"]
                        for row in result["rows"]]))
    for missing in result["unavailable"]:
        name = "torch.compile" if missing["name"] == "compile" else f"PyTorch {missing['name']}"
        lines += ["", f"{name}: unavailable ({missing['reason']})"]
    if not result["logits_match"]:
        lines += ["", "**A baseline's logits do not match minivit's: its timing compares "
                      "different computations.**"]
    return lines + [""]


    return "\n".join(lines)


# --- (g) training on CIFAR-10 --------------------------------------------------------------

def has_cifar(folder):
    folder = pathlib.Path(folder)
    return (folder / "cifar-10-batches-py").is_dir() or (
        folder.name == "cifar-10-batches-py" and folder.is_dir())


def section_train(args, timeout):
    if not args.data_dir:
        raise Skipped("no --data-dir given (a folder holding cifar-10-batches-py/)")
    if not has_cifar(args.data_dir):
        raise Skipped(f"--data-dir {args.data_dir} holds no cifar-10-batches-py/")
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(args.train_out or pathlib.Path(scratch) / "run")
        cmd = [sys.executable, "examples/train_cifar.py", "--preset", "gpu", "--backend", "cupy",
               "--data-dir", args.data_dir, "--out", out, "--no-progress", "--no-download"]
        if args.smoke:
            cmd += ["--model", "cifar-tiny", "--train-subset", "64", "--batch-size", "32",
                    "--epochs", "2", "--warmup-epochs", "1"]
        budget = min(args.train_minutes * 60, timeout - 40)     # 40 s to stop it
        start = time.monotonic()
        status, output = run(cmd, budget)
        wall = time.monotonic() - start
        log = out / "log.jsonl"
        history = [json.loads(line) for line in log.read_text().splitlines()
                   if line.strip()] if log.is_file() else []
    how = (f"stopped after its {budget / 60:.1f}-minute budget" if status is None
           else "finished" if status == 0 else f"exited with status {status}")
    lines = [f"`{shlex.join(str(c) for c in cmd[1:])}`: {how}, {duration(wall)} wall time, "
             f"{len(history)} epoch{'s' if len(history) != 1 else ''} logged.", ""]
    if history:
        speeds = sorted(row["images_per_s"] for row in history)
        best = max(history, key=lambda row: row["test_acc"])
        lines += [f"Training speed {speeds[len(speeds) // 2]:,.0f} images/s (median over "
                  f"epochs); test accuracy {100 * history[-1]['test_acc']:.2f}% after epoch "
                  f"{history[-1]['epoch']} (best {100 * best['test_acc']:.2f}%, epoch "
                  f"{best['epoch']}), {duration(history[-1]['elapsed_s'])} of training and "
                  f"testing.", ""]
        lines.append(table(["epoch", "train loss", "train acc", "test loss", "test acc",
                            "images/s", "elapsed (min)"],
                           [[row["epoch"], f"{row['train_loss']:.4f}",
                             f"{100 * row['train_acc']:.2f}%", f"{row['test_loss']:.4f}",
                             f"{100 * row['test_acc']:.2f}%", f"{row['images_per_s']:,.0f}",
                             f"{row['elapsed_s'] / 60:.2f}"] for row in history]))
    if status not in (0, None):
        raise Failed("\n".join(lines + ["", "The end of its output:", "",
                                         code_block(tail(output))]))
    if not history:
        lines += ["No epoch finished within the budget; the end of its output:", "",
                  code_block(tail(output))]
    return "\n".join(lines)


# --- the report ----------------------------------------------------------------------------

RUNNERS = {"gpu": section_gpu, "warmup": section_warmup, "tests": section_tests,
           "vit_step": section_vit_step, "kernels": section_kernels, "torch": section_torch,
           "train": section_train}


def run_section(name, function, args, timeout):
    """(status, Markdown) of one section: "ok", "skipped" or "failed"; never raises."""
    title = f"## {SECTIONS.index(name) + 1}. {TITLES[name]}"
    start = time.monotonic()
    try:
        body, status = function(args, timeout), "ok"
    except Skipped as e:
        body, status = f"Skipped: {e}", "skipped"
    except Failed as e:
        body, status = f"**Failed**: {e}", "failed"
    except Exception as e:                          # a bug here, or the GPU itself failing
        body, status = f"**Failed**: {type(e).__name__}: {e}", "failed"
    return status, f"{title}\n\n{body}\n\n_({time.monotonic() - start:.0f} s)_\n"


def git(*arguments):
    """What a git command prints in the repository; "" where git or the repository is missing."""
    try:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:                                 # no git binary on this machine
        return ""


def header(args):
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# minivit GPU report\n\n{when} on {platform.node()}, minivit {commit}"
            f"{' with uncommitted changes' if dirty else ''}; "
            f"`{shlex.join(['python'] + sys.argv)}`"
            f"{' (smoke run: tiny settings, not measurements)' if args.smoke else ''}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[5:]))
    p.add_argument("--out", type=cli.path, help="also write the report to this Markdown file")
    p.add_argument("--budget", type=cli.positive, default=600,
                   help="seconds the whole report may take (default 600)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to leave out: "
                                              f"{', '.join(SECTIONS)}")
    p.add_argument("--data-dir", type=cli.path,
                   help="folder holding cifar-10-batches-py/, for the train section")
    p.add_argument("--train-minutes", type=cli.positive, default=5,
                   help="stop the training run after this many minutes (default 5)")
    p.add_argument("--train-out", type=cli.path,
                   help="folder for the training run's log and checkpoint "
                        "(default: a temporary folder, removed afterwards)")
    p.add_argument("--torch-runs", default="cifar-small:256",
                   help="comma-separated PRESET:BATCH runs of torch_throughput.py "
                        "(default cifar-small:256)")
    p.add_argument("--torch-steps", type=cli.positive_int, default=30,
                   help="timed steps per torch run")
    p.add_argument("--test-files", nargs="*", type=cli.path, default=[],
                   help="test files for the tests section (default: the whole suite)")
    p.add_argument("--smoke", action="store_true",
                   help="every section in seconds (tiny models, one step, a short training "
                        "run, two test files): checks the report, measures nothing")
    args = p.parse_args(argv)
    args.skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    unknown = sorted(set(args.skip) - set(SECTIONS))
    if unknown:
        p.error(f"--skip: unknown section(s) {', '.join(unknown)}; choose from "
                f"{', '.join(SECTIONS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget - 10          # 10 s to write the report
    train_seconds = args.train_minutes * 60 if args.data_dir else 0
    parts, statuses = [header(args)], {}
    print(parts[0], flush=True)
    for i, name in enumerate(SECTIONS):
        if name in args.skip:
            continue
        later = [n for n in SECTIONS[i + 1:] if n not in args.skip]
        reserve = sum(FLOORS[n] for n in later if n != "train")   # the least each later
        if "train" in later and train_seconds:                      # section needs, more
            reserve += FLOORS["train"] + min(train_seconds, 120)    # for training
        timeout = deadline - time.monotonic() - reserve
        if name in CAPS:
            timeout = min(CAPS[name], timeout)
        if name != "gpu" and timeout < FLOORS[name]:          # gpu takes a second: always
            status, text = "skipped", (f"## {i + 1}. {TITLES[name]}\n\nSkipped: the --budget "
                                       f"leaves it {max(timeout, 0):.0f} s, it needs at least "
                                       f"{FLOORS[name]} s.\n")
        else:
            status, text = run_section(name, RUNNERS[name], args, timeout)
        statuses[name] = status
        parts.append(text)
        print(text, flush=True)
        if args.out:
            pathlib.Path(args.out).write_text("\n".join(parts))
    summary = "Sections: " + ", ".join(f"{n} {s}" for n, s in statuses.items()) + "\n"
    parts.append(summary)
    print(summary, flush=True)
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(parts))


if __name__ == "__main__":
    cli.install()
    main()
