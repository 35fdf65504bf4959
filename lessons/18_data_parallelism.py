"""Data parallelism: several processes, one training step.

The paper fine-tunes ViT-B/16 with batches of 512 images at 384 x 384 (App. B.1.1):
more than one GPU, or one machine, can hold or compute in time.  Data parallelism
(ChainerMN, PyTorch DDP, minivit.distributed) splits every batch instead of the model:
N processes ("ranks") each hold the whole model and take a disjoint shard of B_r of
the batch's B images.  Why that computes the same step as one process: the loss is
the mean over the batch, so

    L = (1/B) sum_i l_i = sum_r (B_r / B) L_r,       L_r = the mean over shard r,
    dL/dw = sum_r (B_r / B) dL_r/dw.

Each rank seeds its backward with B_r / B (for equal shards: 1/N), then ONE allreduce
adds the N gradient buffers and hands every rank the sum.  All ranks take the same
optimiser step from the same parameters, so they stay identical without ever sending
parameters again.  Here two ranks are simulated in one process, in float64.

What it costs: a ring allreduce sends each rank's buffer around in N - 1 pieces twice
(a reduce-scatter, then an all-gather), so every rank sends and receives
2 (N - 1) / N times the gradient's size per step, almost independent of N.

Run it for real: python examples/train_cifar.py --processes 2 (the cores of this machine),
or mpiexec -n 2 python examples/train_cifar.py (MPI: pip install -e ".[mpi]")
"""
import matplotlib.pyplot as plt
import numpy as np

from common import Lesson

import minivit as mv
from minivit.distributed import bytes_per_step
from minivit.nn import VisionTransformer, count_parameters, preset
from minivit.optim import SGD

lesson = Lesson("18", "data parallelism", __doc__)
rng = np.random.default_rng(0)
model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=2,
                          num_heads=2, mlp_dim=16, seed=0).astype("float64").to(lesson.device)
model.head.weight.data = model.head.weight.data + mv.tensor(
    0.1 * rng.standard_normal(model.head.weight.shape)).to(lesson.device).data   # not all zero
optimizer = SGD(model.parameters(), lr=0.1)        # puts the gradients into one flat buffer
(buffer,) = optimizer.buffers
x, y = rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 3, 6)


def gradient_buffer(images, labels, weight):
    """The flat gradient buffer after backward of weight * (mean loss over these images)."""
    model.zero_grad()
    loss = mv.cross_entropy(model(mv.tensor(images).to(lesson.device)), labels)
    (loss * weight).backward()
    return mv.backend.to_numpy(buffer.grad).copy()


whole = gradient_buffer(x, y, 1.0)
lesson.say(f"one process, the whole batch of {len(y)}: a gradient buffer of {whole.size} "
           f"numbers ({len(optimizer.params)} parameter tensors in one array)")
for cut in (3, 4):                                   # equal shards, then unequal ones
    rank0 = gradient_buffer(x[:cut], y[:cut], cut / len(y))
    rank1 = gradient_buffer(x[cut:], y[cut:], (len(y) - cut) / len(y))
    allreduced = rank0 + rank1                      # what the allreduce hands both ranks
    lesson.same(f"shards of {cut} and {len(y) - cut}: sum of the weighted shard gradients "
                f"equals the batch gradient", allreduced, whole, rtol=1e-12, atol=1e-15)

unweighted = gradient_buffer(x[:4], y[:4], 0.5) + gradient_buffer(x[4:], y[4:], 0.5)
gap = np.abs(unweighted - whole).max()
lesson.expect("unequal shards need the weights B_r / B: a plain average of the shard means "
              "is another gradient", gap > 1e-6, f"max difference {gap:.2e}")

# The sharded loss as a function of the images, gradient-checked like every other op.
lesson.gradcheck("d/dx of sum_r (B_r/B) L_r(x)", lambda t: sum(
    mv.cross_entropy(model(t[a:b]), y[a:b]) * ((b - a) / len(y)) for a, b in ((0, 4), (4, 6))),
    mv.tensor(x, requires_grad=True).to(lesson.device))

lesson.say("", "Bytes each rank sends (and receives) per step, float32 gradients:")
ranks = [2, 4, 8, 16, 64]
fig, ax = plt.subplots(figsize=(6, 4))
for name in ("cifar-small", "B/16"):
    size = 4 * count_parameters(preset(name))
    per_rank = [2 * (n - 1) * size // n for n in ranks]
    lesson.say(f"  {name:12s} {size / 1e6:7.1f} MB of gradients: " +
               ", ".join(f"N={n}: {b / 1e6:.1f} MB" for n, b in zip(ranks, per_rank)))
    ax.plot(ranks, [b / 1e6 for b in per_rank], "o-", label=f"{name} ({size / 1e6:.0f} MB)")
lesson.expect("bytes_per_step follows 2 (N - 1) / N of the gradient buffer",
              bytes_per_step(optimizer, 4) == 2 * 3 * buffer.grad.nbytes // 4)
ax.set(xscale="log", yscale="log", xlabel="ranks N", ylabel="MB sent per rank per step",
       title="Ring allreduce: 2 (N - 1) / N of the gradients")
ax.legend()
ax.grid(alpha=0.3)
lesson.figure(fig, "allreduce_bytes.png")
lesson.finish()
