"""One kernel instead of ten: GELU as a hand-written CUDA kernel.

On a GPU every array operation is a kernel launch: it reads its inputs from the GPU's
memory and writes its output back.  The reference GELU that lesson 10 built,

    y = x Phi(x),   Phi(x) = (1 + erf(x / sqrt 2)) / 2,

is a chain of such operations (a multiply, an erf that is itself a rational function,
an add, a multiply, ...), each one streaming the whole activation through memory.  At
the size of a small ViT a training step is bound by that traffic and by the number of
launches, not by arithmetic.  A kernel computes the whole chain per element in one pass:
read x once, write y once.

minivit keeps the reference as the spec and puts the kernel beside it
(minivit/kernels/gelu.cu): `mv.gelu` takes the kernel for float32 CUDA arrays, checks it
against the reference the first time, and falls back to the reference (one warning line)
if they ever disagree.  This lesson shows the kernel, counts what it saves and checks it.
"""
import re
import time

import numpy as np

from common import Lesson

import minivit as mv
from minivit import backend, kernels
from minivit.ops.activation import (GELU, GELU_KERNELS, gelu_erf, gelu_erf_backward,
                                    gelu_tanh, gelu_tanh_backward)

lesson = Lesson("19", "one kernel instead of ten", __doc__)
on_gpu = lesson.device == "cuda"
standin = on_gpu and backend.uses_standin()
xp = backend.module_for(lesson.device)
SHAPE = (128 * 65, 384)     # cifar-small's MLP activation at batch 128: 128 images x 65 tokens
NBYTES = 4 * SHAPE[0] * SHAPE[1]   # one float32 array of that shape
MB = NBYTES / 1e6

# --- 1. The kernel ---------------------------------------------------------------------------
source = (kernels.FOLDER / "gelu.cu").read_text()
erf_forward = re.search(r"// y = x Phi\(x\).*?\n}\n", source, re.DOTALL)[0]
lesson.say("1. The exact GELU's forward kernel, from minivit/kernels/gelu.cu.  One thread per",
           "   element (a grid-stride loop covers any n); erff and expf are CUDA's float32",
           "   functions; x is read once and y written once:", "")
lesson.say(*("      " + line for line in erf_forward.rstrip().splitlines()), "")
names = re.findall(r'extern "C" __global__ void (\w+)', source)
lesson.expect("gelu.cu has the four kernels: both forms, forward and backward",
              sorted(names) == sorted(k.name for pair in GELU_KERNELS.values() for k in pair),
              ", ".join(names))
lesson.say("   The backward kernel recomputes Phi(x) from x instead of reading a saved Phi(x):",
           "   arithmetic is cheap, memory traffic is not.  `python -m minivit.kernels",
           "   --compile-only` compiles every kernel for A100, H100 and B200 GPUs with NVRTC,",
           "   no GPU needed.", "")


# --- 2. What the reference costs ---------------------------------------------------------------
def reference_step(x, g, approximate):
    """The reference GELU's forward and backward, as mv.gelu runs them without kernels."""
    if approximate == "erf":
        y, cdf = gelu_erf(x)
        return y, gelu_erf_backward(g, x, cdf)
    y, t = gelu_tanh(x)
    return y, gelu_tanh_backward(g, x, t)


def kernel_step(x, g, approximate):
    """The same through the two kernels (each checks itself on its first call)."""
    forward, backward = GELU_KERNELS[approximate]
    return forward(x), backward(g, x)


class Counted(np.ndarray):
    """A NumPy array that counts what a GPU would do with it: every operation on it is
    one launch that reads its array inputs and writes its output."""
    launches = 0
    bytes = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [a.view(np.ndarray) if isinstance(a, Counted) else a for a in inputs]
        out = getattr(ufunc, method)(*plain, **kwargs)
        Counted.launches += 1
        Counted.bytes += sum(a.nbytes for a in plain if isinstance(a, np.ndarray)) + out.nbytes
        return out.view(Counted)


rng = np.random.default_rng(0)
x_host = rng.standard_normal(SHAPE).astype(np.float32)
g_host = rng.standard_normal(SHAPE).astype(np.float32)
lesson.say(f"2. One GELU forward and backward at training size, x of shape {SHAPE} "
           f"({MB:.1f} MB in float32):")
if standin:
    # The CuPy stand-in counts launches and the bytes they move (inputs plus outputs); a
    # kernel there runs its reference but counts as the one launch it is on a GPU.
    x, g = xp.asarray(x_host), xp.asarray(g_host)
    kernel_step(x[:8], g[:8], "erf"), kernel_step(x[:8], g[:8], "tanh")   # the self-checks
    counts = {}
    for approximate in ("erf", "tanh"):
        for name, step in (("reference", reference_step), ("kernels", kernel_step)):
            xp.fake_stats(reset=True)
            step(x, g, approximate)
            counts[approximate, name] = xp.fake_stats(reset=True)
    lesson.say("", f"   {'':16}{'launches':>10}{'MB moved':>12}   (counted by the CuPy stand-in)")
    for (approximate, name), c in counts.items():
        lesson.say(f"   {approximate + ' ' + name:16}{c['launches']:>10}{c['bytes'] / 1e6:>12.0f}")
    for approximate in ("erf", "tanh"):
        ref, fused = counts[approximate, "reference"], counts[approximate, "kernels"]
        lesson.expect(f"{approximate}: 2 launches with the kernels, "
                      f"{ref['launches']} without", fused["launches"] == 2 < ref["launches"])
        lesson.expect(f"{approximate}: the kernels move 5 arrays (x, y; g, x, dx): "
                      f"{fused['bytes'] / 1e6:.0f} MB", fused["bytes"] == 5 * NBYTES)
else:
    # Without the stand-in, count the tanh form's operations with an array that counts.
    Counted.launches = Counted.bytes = 0
    reference_step(x_host.view(Counted), g_host.view(Counted), "tanh")
    lesson.say(f"   the reference tanh GELU: {Counted.launches} array operations moving "
               f"{Counted.bytes / 1e6:.0f} MB;",
               f"   its two kernels: 2 launches moving {5 * MB:.0f} MB (x in, y out; g and x "
               f"in, dx out).",
               "   (The erf form is longer still: erf is itself a rational function of ~25 "
               "operations.)")
    lesson.expect("the reference tanh GELU is many operations, the kernels two",
                  Counted.launches >= 10, f"{Counted.launches} vs 2")
if not on_gpu:
    lesson.say("", "   Kernels are a GPU fast path: on NumPy `mv.gelu` runs the reference "
                   "(kernels.usable(x) is",
               f"   {kernels.usable(x_host)} for a NumPy array).  To see the kernels counted "
               "without a GPU:",
               "       MINIVIT_FAKE_CUPY=1 python lessons/19_one_kernel.py --backend cupy")
    lesson.expect("NumPy arrays never take a kernel", not kernels.usable(x_host))
    lesson.say("", "3. On a GPU (or the stand-in) this section checks the kernels against the "
                   "reference and times both.")

# --- 3. The kernel equals the reference, and how long each takes on a GPU ----------------------
if on_gpu:
    lesson.say("", "3. Kernel against reference at training size, float32:")
    x, g = xp.asarray(x_host), xp.asarray(g_host)
    for approximate in ("erf", "tanh"):
        mine, ref = kernel_step(x, g, approximate), reference_step(x, g, approximate)
        for kernel, a, b in zip(GELU_KERNELS[approximate], mine, ref):
            # CUDA's erff and tanhf against the reference's: float32, in another order
            lesson.same(f"{kernel.name}: kernel == reference", a, b,
                        rtol=kernel.rtol, atol=kernel.atol)
        if not standin:
            times = {}
            for name, step in (("reference", reference_step), ("kernels", kernel_step)):
                best = float("inf")
                for _ in range(5):
                    backend.synchronize()
                    start = time.perf_counter()
                    step(x, g, approximate)
                    backend.synchronize()
                    best = min(best, time.perf_counter() - start)
                times[name] = best
            lesson.say(f"   {approximate}: reference {1e3 * times['reference']:.2f} ms, kernels "
                       f"{1e3 * times['kernels']:.2f} ms "
                       f"({times['reference'] / times['kernels']:.1f}x), best of 5")
    if standin:
        lesson.say("   (The stand-in runs each kernel's reference: times would say nothing; on "
                   "a GPU this section times both.)")
    lesson.say(f"   kernels.usable(x) is {kernels.usable(x)}: mv.gelu "
               f"{'takes' if kernels.usable(x) else 'does not take'} the kernels here "
               "(MINIVIT_KERNELS=0 turns them off).")

# --- 4. The self-check and the fallback ---------------------------------------------------------
class BuggyKernel(kernels.Kernel):
    """A kernel with a bug: it answers GELU(x) + 0.001."""

    def run(self, x):
        return self.reference(x) + 1e-3


lesson.say("", "4. A kernel with a bug never changes a run's numbers.  Its first call checks it on",
           "   a few rows against the reference; it disagrees, so one warning line goes to stderr",
           "   and the reference answers, then and from then on:")
buggy = BuggyKernel("gelu_with_a_bug", "gelu.cu", launch=None, reference=lambda x: gelu_erf(x)[0])
x = xp.asarray(x_host[:64])
y = buggy(x)
del kernels.KERNELS[buggy.name]                 # a lesson's kernel, not one of minivit's
lesson.say(f"   its status: {buggy.status!r}")
lesson.expect("the buggy kernel turned itself off", buggy.status != "ok")
lesson.same("the buggy kernel's caller got the reference's values", y, gelu_erf(x)[0])

# --- 5. Gradient checks ----------------------------------------------------------------------
lesson.say("", "5. Gradient checks (float64, which never takes a kernel):")
x_small = mv.tensor(rng.standard_normal((3, 5)), requires_grad=True)
lesson.expect("float64 arrays never take a kernel", not kernels.usable(x_small.data))
for approximate in ("erf", "tanh"):
    lesson.gradcheck(f"mv.gelu(approximate={approximate!r})",
                     lambda x: GELU(approximate)(x), x_small)
lesson.finish()
