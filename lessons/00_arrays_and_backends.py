"""Arrays and backends: one code path for the CPU (NumPy) and the GPU (CuPy).

Everything in a Vision Transformer is an array: an image is (B, C, H, W), the
sequence of patch tokens z_0 of Eq. 1 is (B, N+1, D), and every equation of the
paper (Eq. 1-4) is array arithmetic on such blocks.  minivit keeps those arrays as
NumPy arrays on the CPU or CuPy arrays on an NVIDIA GPU.  CuPy copies NumPy's
interface, so a function written once against "the array module" serves both:

    xp = mv.backend.array_module(x)      # numpy for a NumPy array, cupy for a CuPy array
    y = xp.exp(x)                        # runs where x lives

Only minivit/backend.py imports numpy or cupy; every other module asks it, as above.

Where new tensors live is decided by one rule: the *default backend* (NumPy unless
the environment variable MINIVIT_BACKEND=cupy is set, or the program calls
mv.backend.use("cupy")) places every new tensor; tensor.to("cuda") / .to("cpu")
moves one explicitly, and that move is differentiable like any other operation.
Arrays on two devices are never combined silently: an operation given both fails
with an error that names them.
"""
import os
import subprocess
import sys

import numpy as np

import minivit as mv
from common import Lesson

lesson = Lesson("00", "arrays and backends", __doc__)
other = {"cpu": "cuda", "cuda": "cpu"}


def token_norms(z):
    """Normalise every token of z (..., D) to zero mean and unit variance: LayerNorm's
    core, written once against xp, so the same lines run on NumPy and on CuPy."""
    xp = mv.backend.array_module(z)
    mu = z.mean(axis=-1, keepdims=True)
    var = ((z - mu) ** 2).mean(axis=-1, keepdims=True)
    return (z - mu) / xp.sqrt(var + 1e-6)


# --- 1. The default backend decides where new tensors go -------------------------------
lesson.say(f"MINIVIT_BACKEND = {os.environ.get('MINIVIT_BACKEND', '(not set: numpy)')}; "
           f"--backend {lesson.args.backend} called mv.backend.use('{lesson.args.backend}'), so "
           f"mv.backend.default_device() = '{mv.backend.default_device()}'.")
host = np.random.default_rng(0).standard_normal((2, 197, 64))   # B=2 sequences of 197 tokens
z = mv.tensor(host)                                               # no device given: the default
xp = mv.backend.array_module(z.data)
lesson.say(f"mv.tensor(host array) -> device '{z.device}', its array is a {xp.__name__}.ndarray "
           f"of shape {z.shape} and dtype {z.dtype}")
lesson.expect("a new tensor lands on the default device", z.device == lesson.device)

mv.backend.use("numpy")                    # in code: the default for what follows
on_cpu = mv.tensor([1.0, 2.0])
mv.backend.use(lesson.args.backend)        # and back to the lesson's choice
lesson.expect("after mv.backend.use('numpy') new tensors go to the cpu", on_cpu.device == "cpu")
lesson.expect("device= overrides the default for one tensor",
              mv.tensor([1.0], device="cpu").device == "cpu")

# The environment variable is read once, when minivit is imported: a fresh Python shows it.
probe = subprocess.run(
    [sys.executable, "-c", "import minivit; print(minivit.backend.default_device())"],
    env={**os.environ, "MINIVIT_BACKEND": lesson.args.backend}, capture_output=True, text=True)
lesson.say(f"a fresh 'python' with MINIVIT_BACKEND={lesson.args.backend} starts on: "
           f"{probe.stdout.strip() or probe.stderr.strip()}")
lesson.expect("MINIVIT_BACKEND picks the default device", probe.stdout.strip() == lesson.device)

# --- 2. One function, written with xp, gives the same numbers on either backend ---------
on_default = token_norms(z.data)           # computed where z lives
on_numpy = token_norms(host)               # computed by NumPy on the host
lesson.say("", f"token_norms ran once on z.data ({mv.backend.array_module(on_default).__name__}) "
               "and once on the host array (numpy); compared on the host:")
lesson.same(f"token_norms on {lesson.device} equals token_norms on numpy",
            on_default, on_numpy, rtol=1e-9, atol=1e-12)

# --- 3. Moving data between devices ----------------------------------------------------
reason = mv.backend.cupy_unavailable_reason()
if reason is not None:
    lesson.say("", f"The CuPy backend is not available here: {reason}",
               "So everything runs on NumPy; the moves below are the no-op case.")
else:
    lesson.say("", "CuPy is available: tensors move with .to('cuda') and .to('cpu').")

lesson.expect(".to(its own device) returns the tensor itself", z.to(z.device) is z)
back_on_host = z.numpy()                   # always a NumPy copy, from either device
lesson.same(".numpy() brings the values to the host unchanged", back_on_host, host, 0, 0)

if reason is None:
    x = mv.tensor(host[0, :3, :4], requires_grad=True)          # on the default device
    there = x.to(other[x.device])
    lesson.say(f"x on '{x.device}' -> x.to('{there.device}') is a "
               f"{mv.backend.array_module(there.data).__name__}.ndarray")
    loss = (there * there).sum()           # computed on the other device
    loss.backward()                        # the gradient travels back through .to()
    lesson.expect("the gradient comes back to x's own device", x.grad is not None and
                  mv.backend.device_of(x.grad) == x.device)
    lesson.same("d sum(x^2)/dx = 2x across the move", x.grad, 2 * host[0, :3, :4])
    try:
        x + there                          # one array on each device
        lesson.expect("mixing devices raises DeviceMismatchError", False)
    except mv.backend.DeviceMismatchError as e:
        lesson.say(f"x + x.to(other device) -> DeviceMismatchError: {e}")
        lesson.expect("mixing devices raises DeviceMismatchError", True)
    lesson.gradcheck("the gradient of exp through a round trip to the other device",
                     lambda x: x.to(other[x.device]).exp().to(x.device), x)

# --- 4. dtypes: float32 to train, float64 to check -------------------------------------
z32 = mv.tensor(host, dtype="float32")
lesson.say("", f"Training runs in float32 (machine epsilon {np.finfo('float32').eps:.1e}); "
               f"gradient checks in float64 ({np.finfo('float64').eps:.1e}): lesson 02 shows why.")
lesson.same("token_norms keeps float32 close to float64", token_norms(z32.data), on_numpy,
            rtol=1e-4, atol=1e-4)
lesson.expect("token_norms keeps float32 as float32", token_norms(z32.data).dtype == np.float32)

lesson.finish()
