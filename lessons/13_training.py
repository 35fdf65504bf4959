"""Training: a tiny ViT learns.

The model of lesson 12 starts knowing nothing (its head is zero, so every class
gets the same score).  Training adjusts all parameters theta to lower the loss on
labelled images, one gradient step at a time:

    logits = ViT(images; theta)                       (B, K)
    L = -(1/B) sum_b log softmax(logits_b)[label_b]   cross-entropy (mv.cross_entropy)
    theta <- AdamW(theta, dL/dtheta)                  (minivit.optim.AdamW)

dL/dtheta is one loss.backward() through everything built in lessons 03-12, in
float32.  AdamW (Loshchilov & Hutter 2019; the paper fine-tunes with SGD but
pre-trains with Adam) divides each gradient by a running estimate of its size, so
every parameter moves at about the rate lr, and decays weights separately.

The first test of any training code is to overfit one small batch: with no data to
generalise to, a working model and optimiser must drive the loss to ~0 and get
every label right.  Here: 16 synthetic 16 x 16 images of 4 patterns (horizontal,
vertical, diagonal stripes and checkerboards at random phases, widths, colours
and noise), patches of 4 x 4 (N = 16 tokens + [CLS]), D = 32, 4 heads, 2 blocks.

The real run: `python examples/train_cifar.py --preset cpu` trains on CIFAR-10
(with warm-up, a cosine schedule, patch dropout and evaluation on held-out images).
"""
import time

import matplotlib.pyplot as plt
import numpy as np

from common import Lesson, train_steps

import minivit as mv
from minivit.optim import AdamW

lesson = Lesson("13", "training a tiny ViT", __doc__)
CLASSES = ["horizontal", "vertical", "diagonal", "checkerboard"]


def make_images(n, seed, size=16):
    """n noisy images (n, 3, size, size) with labels 0..3, n/4 of each pattern (CLASSES)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    row, col = np.mgrid[:size, :size]
    images = np.empty((n, 3, size, size))
    for i, label in enumerate(labels):
        width, r, c = rng.integers(2, 5), row + rng.integers(0, 8), col + rng.integers(0, 8)
        band = [r // width, c // width, (r + c) // width, r // width + c // width][label]
        stripes = band % 2                                         # 0/1: dark or coloured
        colour = rng.uniform(0.3, 1.0, (3, 1, 1))
        images[i] = colour * stripes + 0.15 * rng.standard_normal((3, size, size))
    return images.astype("float32"), labels


def train_step(model, optimizer, images, labels):
    """One step of gradient descent on a batch; returns the loss and accuracy before it."""
    logits = model(mv.tensor(images))                  # forward, (B, K)
    loss = mv.cross_entropy(logits, labels)            # a scalar
    optimizer.zero_grad()
    loss.backward()                                    # dL/dtheta for every parameter
    optimizer.step()                                   # theta <- the AdamW update
    return loss.item(), mv.accuracy(logits, labels)


def evaluate(model, images, labels):
    model.eval()                                       # (dropout off; none here anyway)
    with mv.no_grad():                                 # no graph: just the numbers
        logits = model(mv.tensor(images))
        result = mv.cross_entropy(logits, labels).item(), mv.accuracy(logits, labels), logits
    model.train()
    return result


config = mv.nn.ViTConfig(image_size=16, patch_size=4, num_classes=4, hidden_size=32,
                         depth=2, num_heads=4, mlp_dim=64)

# --- 1. Overfit one batch ----------------------------------------------------------------
model = mv.nn.VisionTransformer(config, seed=0)
images, labels = make_images(16, seed=0)
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
lesson.say(model.describe(), "",
           f"1. Overfit one batch: images {images.shape}, labels {labels.tolist()}")
steps, losses, accuracies = 150, [], []
start = time.perf_counter()
for step in range(steps):
    loss, accuracy = train_step(model, optimizer, images, labels)
    losses.append(loss)
    accuracies.append(accuracy)
    if step % 25 == 0:
        lesson.say(f"   step {step:>3}: loss {loss:.4f}, accuracy {accuracy:.0%}")
seconds = time.perf_counter() - start
final_loss, final_accuracy, final = evaluate(model, images, labels)
lesson.say(f"   after {steps} steps ({1000 * seconds / steps:.0f} ms each): loss "
           f"{final_loss:.4f}, accuracy {final_accuracy:.0%}")
lesson.expect("at the start every class scores the same: loss log(4)",
              abs(losses[0] - np.log(4)) < 1e-4, f"{losses[0]:.4f} vs {np.log(4):.4f}")
lesson.expect("the loss falls below 0.05", final_loss < 0.05, f"{final_loss:.4f}")
lesson.expect("every training image is classified correctly", final_accuracy == 1.0,
              f"{final_accuracy:.0%}")
lesson.expect("the loss stays finite and the parameters float32",
              bool(np.isfinite(losses).all())
              and all(p.dtype == "float32" for p in model.parameters()))

predicted = final.numpy().argmax(axis=-1)
fig, axes = plt.subplots(2, 8, figsize=(13, 4))
for ax, image, label, guess in zip(axes.flat, images, labels, predicted):
    ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    ax.set_title(f"{CLASSES[label]}\npredicted: {CLASSES[guess]}", fontsize=8,
                 color="k" if guess == label else "r")
    ax.axis("off")
fig.suptitle("The training batch: each image's label and the trained model's prediction")
lesson.figure(fig, "training_images.png")

# --- 2. Learn the patterns: mini-batches, a schedule, held-out images --------------------
# The loop of part 1, with a random batch and a scheduled learning rate at every step:
#
#     base_lr, order = optimizer.lr, np.random.default_rng(seed)
#     for step in range(steps):
#         optimizer.lr = warmup_cosine(step, steps, warmup_steps, base_lr)
#         batch = order.choice(len(images), batch_size, replace=False)
#         ... the lines of train_step, on images[batch] and labels[batch]
#
# It is train_steps in lessons/common.py, which lessons 16 and 17 train with too.
lesson.say("", "2. Learn the patterns: 512 training images in random batches of 32, "
               "warm-up + cosine learning rate, 256 held-out images",
           "   (the loop of part 1 with random batches and a schedule: train_steps in "
           "lessons/common.py):")
model = mv.nn.VisionTransformer(config, seed=0)
train_images, train_labels = make_images(512, seed=2)
test_images, test_labels = make_images(256, seed=3)
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
steps, test_curve = 300, []


def evaluate_held_out(step, batch_loss):
    """Called by train_steps after each step: every 25 steps, the loss on held-out images."""
    if step % 25 == 0 or step == steps - 1:
        test_loss, test_accuracy, _ = evaluate(model, test_images, test_labels)
        test_curve.append((step, test_loss, test_accuracy))
        if step % 75 == 0 or step == steps - 1:
            lesson.say(f"   step {step:>3}: batch loss {batch_loss:.4f}, held-out loss "
                       f"{test_loss:.4f}, held-out accuracy {test_accuracy:.0%}")


batch_losses = train_steps(model, optimizer, train_images, train_labels, steps, batch_size=32,
                           warmup_steps=20, seed=0, after_step=evaluate_held_out)
held_out_accuracy = test_curve[-1][2]
lesson.expect("it generalises: held-out accuracy above 85% (chance is 25%)",
              held_out_accuracy > 0.85, f"{held_out_accuracy:.1%}")

fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
left.semilogy(losses, label="loss")
left.axhline(0.05, color="k", ls=":", label="0.05 (the check)")
left.plot([], [], color="C1", label="accuracy")          # legend entry for the twin axis
twin = left.twinx()
twin.plot(accuracies, color="C1", alpha=0.8)
twin.set(ylabel="training accuracy", ylim=(0, 1.05))
left.set(xlabel="step", ylabel="cross-entropy loss (log scale)",
         title="1. Overfitting one batch of 16 images")
right.semilogy(batch_losses, alpha=0.6, label="training batch loss")
test_steps, test_losses, test_accuracies = zip(*test_curve)
right.semilogy(test_steps, test_losses, "o-", label="held-out loss")
right.plot([], [], "s-", color="C2", label="held-out accuracy")
twin = right.twinx()
twin.plot(test_steps, test_accuracies, "s-", color="C2")
twin.set(ylabel="held-out accuracy", ylim=(0, 1.05))
right.set(xlabel="step", ylabel="cross-entropy loss (log scale)",
          title="2. Learning the patterns (512 images, batches of 32)")
for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
fig.tight_layout()
lesson.figure(fig, "training_loss.png")

lesson.say("", "Next: the real thing, on CIFAR-10:  python examples/train_cifar.py --preset cpu")
lesson.finish()
