"""What every lesson shares: the --backend flag, PASS/FAIL checks, figure files.

    from common import Lesson
    lesson = Lesson("03", "patches with im2col", __doc__)
    ...
    lesson.check("im2col gradient", mv.gradcheck(f, x))        # prints error and PASS/FAIL
    lesson.same("lesson version equals minivit's", mine, library)
    path = lesson.figure(fig, "patch_grid.png")                # saved under lessons/out/
    lesson.finish()                                            # exit 1 if any check failed
"""
import argparse
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")              # figures go to files, never to a window

import numpy as np                 # noqa: E402

import minivit as mv               # noqa: E402
from minivit.optim import warmup_cosine  # noqa: E402

mv.cli.install()                   # a user's mistake or Ctrl-C ends in one line

OUT = pathlib.Path(__file__).resolve().parent / "out"


class Lesson:
    def __init__(self, number, title, doc=None):
        parser = argparse.ArgumentParser(description=f"Lesson {number}: {title}")
        parser.add_argument("--backend", default=mv.backend.default_backend_name(),
                            choices=["numpy", "cupy"],
                            help="array backend: numpy (CPU) or cupy (GPU); default: "
                                 "$MINIVIT_BACKEND, else numpy")
        parser.add_argument("--out", type=mv.cli.path, default=str(OUT),
                            help="folder for the figures")
        self.args = parser.parse_args()
        try:
            mv.backend.use(self.args.backend)
        except mv.backend.BackendError as e:
            sys.exit(f"error: {e}")
        self.device = mv.backend.default_device()
        self.out = pathlib.Path(self.args.out)
        try:                               # fail now, not at the first figure
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: --out {self.out}: cannot write there ({e.strerror or e})")
        self.failures = []
        print(f"=== Lesson {number}: {title}   "
              f"(backend: {mv.cli.backend_text(self.args.backend)}) ===")
        if doc:
            print(doc.strip())
        print()

    def say(self, *lines):
        for line in lines:
            print(line)

    def check(self, name, error, tol=1e-6):
        """Report a gradient check (the max relative error mv.gradcheck returned)."""
        ok = error <= tol
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: max relative error {error:.2e} (tol {tol:g})")
        if not ok:
            self.failures.append(name)
        return ok

    def gradcheck(self, name, fn, *inputs, **kwargs):
        """Run mv.gradcheck and report it; a failed check is a FAIL, not a crash."""
        try:
            return self.check(name, mv.gradcheck(fn, *inputs, **kwargs))
        except mv.GradcheckError as e:
            print(f"[FAIL] {name}: {e}")
            self.failures.append(name)
            return False

    def same(self, name, a, b, rtol=1e-10, atol=1e-12):
        """Report whether two arrays or tensors agree (e.g. the lesson's and minivit's)."""
        a = a.numpy() if isinstance(a, mv.Tensor) else mv.backend.to_numpy(a)
        b = b.numpy() if isinstance(b, mv.Tensor) else mv.backend.to_numpy(b)
        ok = a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=atol)
        diff = np.abs(a - b).max() if a.shape == b.shape and a.size else float("nan")
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: max difference {diff:.2e}")
        if not ok:
            self.failures.append(name)
        return ok

    def expect(self, name, condition, detail=""):
        """Report a yes/no fact the lesson relies on."""
        print(f"[{'PASS' if condition else 'FAIL'}] {name}{': ' + detail if detail else ''}")
        if not condition:
            self.failures.append(name)
        return bool(condition)

    def figure(self, fig, filename):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / filename
        with mv.cli.writing(path):
            fig.savefig(path, dpi=120, bbox_inches="tight")
        matplotlib.pyplot.close(fig)
        print(f"figure: {path}")
        return path

    def finish(self):
        print()
        if self.failures:
            print(f"FAILED: {', '.join(self.failures)}")
            sys.exit(1)
        print("All checks passed.")
        sys.exit(0)


def train_steps(model, optimizer, images, labels, steps, batch_size, warmup_steps=20, seed=0,
                after_step=None):
    """Lesson 13's training loop: `steps` gradient steps, each on batch_size images drawn
    at random (a fixed seed, so a lesson prints the same numbers every run).  The learning
    rate rises linearly to the optimiser's lr over warmup_steps, then falls along a cosine.
    Returns each step's loss, measured before its update; after_step(step, loss), if
    given, runs after each step (lesson 13 evaluates held-out images there)."""
    base_lr, order = optimizer.lr, np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        optimizer.lr = warmup_cosine(step, steps, warmup_steps=warmup_steps, base_lr=base_lr)
        batch = order.choice(len(images), batch_size, replace=False)
        loss = mv.cross_entropy(model(mv.tensor(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()                            # dL/dtheta for every parameter
        optimizer.step()                           # theta <- the optimiser's update
        losses.append(loss.item())
        if after_step is not None:
            after_step(step, losses[-1])
    return losses
