"""Patches with im2col: how an image becomes a sequence.

A Transformer reads a sequence of vectors.  The ViT makes one out of an image
x in R^{H x W x C} by cutting it into N = HW / P^2 square patches of P x P pixels
and flattening each into a vector of P^2 C values (Section 3.1):

    x  (C, H, W)   ->   x_p  (N, P^2 C),      x_p^i = the i-th patch, flattened

Eq. 1 then maps every x_p^i to D dimensions with one matrix E (lesson 04).  For
ViT-B/16 at 224 x 224: N = 224^2 / 16^2 = 196 patches of 16 * 16 * 3 = 768 values.

Patches are numbered row by row over the 14 x 14 grid, and the values inside a
patch are ordered (row, column, channel) with the channel fastest: the order of a
(P, P, C) array, and of the official checkpoints' embedding kernel.

Cutting an image into windows and flattening each into a row is im2col ("image to
columns"), the classic way to turn a convolution into a matrix product.  With
window = stride = P the windows tile the image and im2col gives exactly x_p.  Its
adjoint col2im puts every row back where it came from and *adds* where windows
overlap; since im2col only copies values, its backward is col2im.
"""
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw

import minivit as mv
from common import Lesson

lesson = Lesson("03", "patches with im2col", __doc__)


def draw_scene():
    """A 224 x 224 landscape drawn with Pillow (sky, sun, hills, a house), as (3, 224, 224)."""
    t = np.linspace(0, 1, 224)[:, None, None]
    sky = (1 - t) * np.array([60, 110, 210]) + t * np.array([215, 235, 255])
    img = Image.fromarray(np.broadcast_to(sky, (224, 224, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([150, 22, 196, 68], fill=(255, 205, 50))                   # sun
    d.ellipse([-80, 150, 170, 330], fill=(80, 160, 70))                  # hills
    d.ellipse([90, 160, 330, 330], fill=(45, 120, 55))
    d.rectangle([36, 118, 100, 176], fill=(195, 70, 55))                 # house
    d.polygon([(28, 120), (68, 84), (108, 120)], fill=(105, 40, 35))     # roof
    d.rectangle([60, 146, 76, 176], fill=(85, 55, 35))                   # door
    d.rectangle([44, 128, 56, 140], fill=(250, 240, 170))                # window
    return np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255


P = 16
x = mv.tensor(draw_scene()[None])                     # (B, C, H, W) = (1, 3, 224, 224)
B, C, H, W = x.shape
xp = mv.backend.array_module(x.data)

# --- 1. The patches, cut by hand: one slice per grid cell -----------------------------------
rows = []
for r in range(H // P):                               # grid row
    for c in range(W // P):                           # grid column
        patch = x.data[0, :, r * P:(r + 1) * P, c * P:(c + 1) * P]     # (C, P, P)
        rows.append(patch.transpose(1, 2, 0).reshape(-1))             # (P, P, C), flattened
x_p = xp.stack(rows)[None]                            # (B, N, P*P*C)

N, width = x_p.shape[1], x_p.shape[2]
lesson.say(f"image {tuple(x.shape)}, P = {P}: N = {H}*{W}/{P}^2 = {N} patches of "
           f"{P}*{P}*{C} = {width} values",
           f"x_p: {tuple(x_p.shape)}, {N} x {width} = {x_p.size:,} values; the image has "
           f"{C}*{H}*{W} = {x.size:,}")
lesson.expect("N = HW/P^2 = 196 patches of P^2 C = 768 values",
              (N, width) == (H * W // P ** 2, P * P * C) == (196, 768))
lesson.expect("as many values as pixels x channels: nothing lost, nothing repeated",
              x_p.size == x.size == 150_528 and bool((xp.sort(x_p.reshape(-1)) ==
                                                      xp.sort(x.data.reshape(-1))).all()))

# --- 2. The library: im2col with window = stride = P, and patchify ----------------------------
lesson.same("im2col(x, kernel=P, stride=P) equals the hand-cut patches",
            mv.im2col(x, P, P), x_p, 0, 0)
lesson.same("patchify(x, P) (a reshape and a transpose) equals them too",
            mv.patchify(x, P), x_p, 0, 0)

# --- 3. And back: the image rebuilt from its patches ---------------------------------------
lesson.same("unpatchify(x_p) rebuilds the image exactly",
            mv.unpatchify(mv.tensor(x_p), x.shape, P), x, 0, 0)
lesson.same("col2im(x_p) rebuilds it too (no overlaps: each pixel added once)",
            mv.col2im(mv.tensor(x_p), x.shape, P, P), x, 0, 0)

# --- 4. Figure: the patch grid and a few flattened patches ------------------------------------
image = x.numpy()[0].transpose(1, 2, 0)               # (H, W, C) for imshow
picked = {"sun": 2 * 14 + 9, "roof": 6 * 14 + 3, "window": 8 * 14 + 3, "hill": 11 * 14 + 7}
fig = plt.figure(figsize=(12, 5.2))
grid = fig.add_gridspec(len(picked), 3, width_ratios=[4, 0.7, 5], wspace=0.08, hspace=0.5)
ax = fig.add_subplot(grid[:, 0])
ax.imshow(image)
for k in range(0, W + 1, P):
    ax.axhline(k - 0.5, color="white", lw=0.6)
    ax.axvline(k - 0.5, color="white", lw=0.6)
for name, i in picked.items():
    r, c = divmod(i, W // P)
    ax.add_patch(Rectangle((c * P - 0.5, r * P - 0.5), P, P, fill=False, ec="red", lw=2))
    ax.text(c * P + P + 2, r * P + P / 2, f"{i}", color="red", va="center", fontsize=9,
            fontweight="bold", bbox=dict(fc="white", ec="none", pad=1))
ax.set_title(f"{H}x{W} image cut into a {H // P}x{W // P} grid\nof {P}x{P} patches (N = {N})",
             fontsize=11)
ax.set(xlabel="pixel column", ylabel="pixel row")
flat = mv.backend.to_numpy(x_p)[0]
for k, (name, i) in enumerate(picked.items()):
    crop = fig.add_subplot(grid[k, 1])
    crop.imshow(flat[i].reshape(P, P, C))
    crop.set_xticks([]), crop.set_yticks([])
    crop.set_title(f"patch {i}: {name}", fontsize=8)
    strip = fig.add_subplot(grid[k, 2])
    strip.imshow(flat[i].reshape(1, P * P, C), aspect="auto", extent=(0, width, 0, 1))
    strip.set_yticks([])
    strip.set_xticks(range(0, width + 1, 3 * P))
    strip.tick_params(labelsize=7)
    if k == 0:
        strip.set_title(f"x_p^i: the patch flattened to {width} values "
                        f"({P * P} pixels, row by row, each R,G,B)", fontsize=10, loc="left")
strip.set_xlabel(f"index into x_p^i = {C * P} * row + {C} * column + channel "
                 f"(a tick every {C * P} values: one pixel row of the patch)")
lesson.figure(fig, "patch_grid.png")

# --- 5. Overlapping windows: col2im adds, and it is im2col's backward ------------------------
rng = np.random.default_rng(0)
small = mv.tensor(rng.standard_normal((2, 2, 5, 6)), requires_grad=True)
cols = mv.im2col(small, kernel=3, stride=1, padding=1)          # 3x3 windows, every pixel
lesson.say("", f"3x3 windows with stride 1 and padding 1 overlap: im2col{tuple(small.shape)} -> "
               f"{tuple(cols.shape)}; col2im of all-ones columns counts the windows per pixel:")
counts = mv.col2im(mv.tensor(xp.ones(cols.shape)), small.shape, 3, 1, 1).numpy()[0, 0]
lesson.say(*("    " + " ".join(f"{int(v)}" for v in row) for row in counts))
lesson.expect("interior pixels lie in 9 windows, corners in 4",
              counts[2, 2] == 9 and counts[0, 0] == 4)
c = mv.tensor(rng.standard_normal(cols.shape))
lesson.same("col2im is im2col's adjoint: <im2col(x), c> = <x, col2im(c)>",
            (cols * c).sum(), (small * mv.col2im(c, small.shape, 3, 1, 1)).sum())
lesson.gradcheck("im2col, 3x3 windows, stride 1, padding 1 (overlapping)",
                 lambda x: mv.im2col(x, 3, 1, 1), small)
lesson.gradcheck("im2col, 3x2 windows, stride (2, 1)",
                 lambda x: mv.im2col(x, (3, 2), (2, 1)), small)
lesson.gradcheck("patchify, 2x2 patches of a 4x6 image",
                 lambda x: mv.patchify(x[:, :, :4], 2), small)
lesson.finish()
