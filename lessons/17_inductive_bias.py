"""Inductive bias: what a convolution knows about images before training, and ViT does not.

"Vision Transformer has much less image-specific inductive bias than CNNs.  In CNNs,
locality, two-dimensional neighborhood structure, and translation equivariance are
baked into each layer ...  In ViT, only MLP layers are local and translationally
equivariant, while the self-attention layers are global." (the paper, Sec. 3.1)

Two of those properties, measured:

1. Translation equivariance.  Shift an image by one patch (P pixels).  A convolution's
   output shifts with it exactly, conv(shift x) = shift conv(x): the same kernel is
   applied at every place.  ViT's patch embedding is a convolution of stride P, so its
   tokens shift exactly too (by whole patches only).  Then E_pos is added: a token that
   moved gets another position's embedding, so the tokens do not simply move along,
   and after the blocks even less.  Self-attention and the MLP by themselves are
   permutation-equivariant: with the same weights and no E_pos, the ViT is exactly
   equivariant to cyclic shifts by whole patches, and its [CLS] output invariant -- so
   it cannot tell where anything is.  Where things are, and how patches neighbour each
   other, the ViT must learn from data through E_pos (lesson 16 watched that happen).

2. Locality.  A 3 x 3 convolution looks only at neighbouring pixels, whatever its
   weights.  A ViT head at initialisation attends almost evenly to every patch: its mean
   attention distance (lesson 16) is that of uniform attention.  Looking nearby has to
   be learned; the paper's ViT-L/16 learned it in its lowest layers from 300M images
   (Fig. 7 right).  The blob task of lesson 16, 2048 images and 300 steps, does not
   need it, and the heads stay global.

The price is data: examples/inductive_bias.py trains a ViT and a small CNN on growing
subsets of CIFAR-10 (the paper's Fig. 3-4 in miniature).
"""
import time

import matplotlib.pyplot as plt
import numpy as np

from common import Lesson, train_steps

import minivit as mv
from minivit import inspection
from minivit.optim import AdamW

lesson = Lesson("17", "inductive bias: translation equivariance and locality", __doc__)
SIZE, P, G = 24, 4, 6                   # 24 x 24 images, 4 x 4 patches, a 6 x 6 grid


def make_blobs(n, seed):
    """Lesson 16's task: a coloured blob in noise; label = its 3 x 3 region (9 classes)."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0, SIZE, (2, n, 1, 1))
    row, col = np.mgrid[:SIZE, :SIZE] + 0.5
    blob = np.exp(-((row - cy) ** 2 + (col - cx) ** 2) / (2 * 1.5 ** 2))
    colour = rng.uniform(0.4, 1.0, (n, 3, 1, 1))
    images = colour * blob[:, None] + 0.1 * rng.standard_normal((n, 3, SIZE, SIZE))
    labels = (cy[:, 0, 0] * 3 // SIZE) * 3 + cx[:, 0, 0] * 3 // SIZE
    return images.astype("float32"), labels.astype(int)


def shift(x, pixels):
    """x moved `pixels` to the right.  The image below is zero near its border, so this
    cyclic roll is the same as a shift that brings in zeros."""
    return np.roll(x, pixels, axis=-1)


def host(t):
    return mv.backend.to_numpy(t.data if isinstance(t, mv.Tensor) else t)


def token_stages(model, x):
    """The patch tokens after the embedding (Eq. 1) and after each block, as (G, G, D) grids."""
    stages = []
    with mv.no_grad():
        z = model.embed(mv.tensor(x))
        stages.append(z)
        for block in model.blocks:
            z = block(z)
            stages.append(z)
    start = 1 if model.config.classifier == "token" else 0
    return [host(z)[0, start:].reshape(G, G, -1) for z in stages]


def moved_by_one_patch(before, after):
    """Relative change per grid cell between token (r, c) of the image and token (r, c+1) of
    the image shifted one patch right: 0 where the token simply moved along."""
    a, b = before[:, :-1], after[:, 1:]
    return np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1)


# an image: one blob, no noise, zero within 5 pixels of the border
row, col = np.mgrid[:SIZE, :SIZE] + 0.5
image = np.exp(-((row - 10) ** 2 + (col - 9) ** 2) / (2 * 2.0 ** 2))
image = image * ((row > 5) & (row < SIZE - 5) & (col > 5) & (col < SIZE - 5))
x = (np.array([1.0, 0.6, 0.2])[:, None, None] * image)[None].astype("float32")   # (1, 3, S, S)
x_shifted = shift(x, P)

# --- 1a. a convolution ------------------------------------------------------------------------
lesson.say("1. Translation equivariance: the image shifted one patch (4 px) to the right.")
weight = mv.tensor(np.random.default_rng(0).standard_normal((3, 3, 3, 8)).astype("float32"))
with mv.no_grad():
    y = host(mv.conv2d(mv.tensor(x), weight, padding=1))
    y_shifted = host(mv.conv2d(mv.tensor(x_shifted), weight, padding=1))
    y_one = host(mv.conv2d(mv.tensor(shift(x, 1)), weight, padding=1))
lesson.same("3x3 convolution: conv(shift x) = shift conv(x), shifted 4 px", y_shifted,
            shift(y, P), rtol=1e-5, atol=1e-6)
lesson.same("... and shifted 1 px", y_one, shift(y, 1), rtol=1e-5, atol=1e-6)

# --- 1b. ViT: the patch embedding, then E_pos and the blocks ------------------------------------
config = mv.nn.ViTConfig(image_size=SIZE, patch_size=P, num_classes=9, hidden_size=32,
                         depth=2, num_heads=4, mlp_dim=64)
model = mv.nn.VisionTransformer(config, seed=0)
init_model = mv.nn.VisionTransformer(config, seed=0)          # kept untrained, for part 2
train_x, train_y = make_blobs(2048, seed=0)
steps = 300
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
start = time.perf_counter()
train_steps(model, optimizer, train_x, train_y, steps, batch_size=64)   # lesson 13's loop
model.eval()
lesson.say("", f"   A ViT trained on lesson 16's blob task ({steps} steps, "
               f"{time.perf_counter() - start:.1f} s):")

with mv.no_grad():
    tokens = host(model.patch_embed(mv.tensor(x))).reshape(G, G, -1)
    tokens_shifted = host(model.patch_embed(mv.tensor(x_shifted))).reshape(G, G, -1)
    tokens_one = host(model.patch_embed(mv.tensor(shift(x, 1)))).reshape(G, G, -1)
lesson.same("patch embedding (a stride-4 convolution): the tokens move one grid cell",
            tokens_shifted, np.roll(tokens, 1, axis=1), rtol=1e-5, atol=1e-6)
aliasing = np.abs(tokens_one - tokens).max() / np.abs(tokens).max()
lesson.say(f"   a 1 px shift is not a grid shift: patches are cut at fixed places, and the "
           f"tokens change by up to {aliasing:.0%}")

stages, stages_shifted = token_stages(model, x), token_stages(model, x_shifted)
changes = [moved_by_one_patch(a, b) for a, b in zip(stages, stages_shifted)]
names = ["x_p E + E_pos"] + [f"block {l + 1}" for l in range(config.depth)]
bare_names = ["x_p E"] + names[1:]
for name, change in zip(names, changes):
    lesson.say(f"   tokens after {name:>13}: token (r, c+1) of the shifted image differs from "
               f"token (r, c) by {change.mean():.0%} on average")
lesson.expect("with position embeddings the tokens do not just move along (over 10% apart)",
              min(c.mean() for c in changes) > 0.1,
              ", ".join(f"{c.mean():.0%}" for c in changes))

no_pos = mv.nn.VisionTransformer(config, seed=0, pos_embed="none")   # same weights, no E_pos
no_pos.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_embed"})
no_pos.eval()
bare, bare_shifted = token_stages(no_pos, x), token_stages(no_pos, x_shifted)
bare_changes = [moved_by_one_patch(a, b) for a, b in zip(bare, bare_shifted)]
lesson.say(f"   the same weights without E_pos: tokens differ by at most "
           f"{max(c.max() for c in bare_changes):.1e}")
lesson.expect("without E_pos every stage is translation-equivariant (tokens within 1e-5)",
              max(c.max() for c in bare_changes) < 1e-5)
with mv.no_grad():
    logits = host(no_pos(mv.tensor(np.concatenate([x, x_shifted]))))
lesson.same("... and its output is invariant: it cannot know where the blob is",
            logits[0], logits[1], rtol=1e-5, atol=1e-5)

# --- 2. locality --------------------------------------------------------------------------------
lesson.say("", "2. Locality: mean attention distance (lesson 16) at initialisation and after "
               "training,", "   over 64 blob images:")
test_x, _ = make_blobs(64, seed=1)
at_init = inspection.mean_attention_distance(inspection.attention_maps(init_model, test_x), P)
trained = inspection.mean_attention_distance(inspection.attention_maps(model, test_x), P)
patch_distance = inspection.patch_distances(G, P)
uniform = patch_distance.mean() * G * G / (G * G + 1)       # A = 1/T, [CLS] column left out
offsets = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)])
conv_distance = np.hypot(offsets[:, 0], offsets[:, 1]).mean()   # a 3x3 window, even weights
lesson.say(f"   a 3x3 convolution looks {conv_distance:.2f} px away (its window, with even "
           f"weights), before any training",
           f"   uniform attention over the 6 x 6 patches: {uniform:.1f} px")
for l in range(config.depth):
    lesson.say(f"   block {l + 1}: at initialisation " + ", ".join(f"{d:.1f}" for d in at_init[l])
               + " px; trained " + ", ".join(f"{d:.1f}" for d in trained[l]) + " px")
lesson.expect("at initialisation every head attends almost evenly (within 3% of uniform)",
              np.abs(at_init / uniform - 1).max() < 0.03,
              f"{at_init.min():.2f}-{at_init.max():.2f} px vs {uniform:.2f} px")
lesson.expect("after this short training no head has become local (all above 80% of uniform)",
              trained.min() > 0.8 * uniform, f"closest-looking head: {trained.min():.1f} px")

# --- figures ------------------------------------------------------------------------------------
fig, axes = plt.subplots(2, 5, figsize=(15, 6))
for ax, picture, title in ((axes[0, 0], x, "image"), (axes[1, 0], x_shifted, "shifted 4 px")):
    ax.imshow(np.clip(picture[0].transpose(1, 2, 0), 0, 1))
    ax.set_title(title)
axes[0, 1].imshow(y[0, 0], cmap="coolwarm")
axes[0, 1].set_title("3x3 conv of the image", fontsize=9)
axes[1, 1].imshow(np.abs(y_shifted - shift(y, P))[0].max(axis=0), cmap="gray_r", vmin=0, vmax=1)
axes[1, 1].set_title("conv(shifted) - shifted conv: all 0", fontsize=9)
for i, (change, name) in enumerate(zip(changes, names)):
    shown = axes[0, 2 + i].imshow(change, cmap="magma", vmin=0, vmax=max(c.max() for c in changes))
    axes[0, 2 + i].set_title(f"ViT with E_pos:\n{name}", fontsize=9)
    axes[1, 2 + i].imshow(bare_changes[i], cmap="magma", vmin=0,
                          vmax=max(c.max() for c in changes))
    axes[1, 2 + i].set_title(f"same weights, no E_pos:\n{bare_names[i]}", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(shown, ax=axes[:, 2:], label="|token(r, c+1) shifted - token(r, c)| / |token|")
fig.suptitle("Shifting the image one patch right: a convolution's output moves with it; "
             "ViT's tokens (r, c) -> (r, c+1) only without position embeddings")
lesson.figure(fig, "translation_equivariance.png")

fig, ax = plt.subplots(figsize=(6.5, 4))
for l in range(config.depth):
    ax.plot(np.full(config.num_heads, l + 0.9), at_init[l], "o", color="C0",
            label="ViT heads at initialisation" if l == 0 else None)
    ax.plot(np.full(config.num_heads, l + 1.1), trained[l], "o", color="C1",
            label=f"ViT heads after {steps} steps" if l == 0 else None)
ax.axhline(uniform, color="k", ls="--", lw=1, label="uniform attention")
ax.axhline(conv_distance, color="C2", lw=2, label="3x3 convolution")
ax.set(xlabel="block", ylabel="mean attention distance (px)", xticks=[1, 2],
       ylim=(0, 1.3 * uniform), title="Locality: built into a convolution, not into a ViT")
ax.legend(fontsize=8)
lesson.figure(fig, "locality.png")

lesson.finish()
