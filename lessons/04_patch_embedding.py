"""The patch embedding: x_p E, the first half of Eq. 1.

Lesson 03 cut the image into N flattened patches x_p^i of P^2 C values.  The
Transformer works at width D, so every patch is mapped to D dimensions by the same
learned matrix E (the official code adds a bias b):

    x_p^i E + b,      E in R^{(P^2 C) x D},      (B, N, P^2 C) @ (P^2 C, D) -> (B, N, D)

z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos   (Eq. 1; the rest is lesson 05).

Each column E[:, d] has P^2 C entries: it is a P x P x C filter, and output d of
patch (r, s) is that filter's dot product with the patch at grid cell (r, s).  A
filter slid over the image in steps of P is a convolution with kernel = stride = P:

    conv(x)[b, d, r, s] = sum_{i,j,c} x[b, c, P r + i, P s + j] W[i, j, c, d],
    W = E.reshape(P, P, C, D)

so the paper's "linear projection of flattened patches" is a convolution with
kernel = stride = P (which is how the official code computes it).
For ViT-B/16: P = 16, C = 3, D = 768, so E is 768 x 768.
"""
import matplotlib.pyplot as plt
import numpy as np

import minivit as mv
from common import Lesson

lesson = Lesson("04", "patch embedding", __doc__)
rng = np.random.default_rng(0)


def draw_shapes(size=224):
    """A grey ramp with a red disc and a blue square, (3, size, size) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.25 + 0.5 * xx] * 3)
    img[:, (xx - 0.35) ** 2 + (yy - 0.38) ** 2 < 0.2 ** 2] = [[0.9], [0.15], [0.1]]
    img[:, (abs(xx - 0.7) < 0.17) & (abs(yy - 0.7) < 0.17)] = [[0.1], [0.25], [0.85]]
    return img


# --- 1. x_p E + b, step by step, at ViT-B/16 size ------------------------------------------
P, C, D = 16, 3, 768
x = mv.tensor(draw_shapes()[None])                                  # (B, C, H, W)
E = mv.tensor(rng.standard_normal((P * P * C, D)) / np.sqrt(P * P * C))
b = mv.tensor(0.02 * rng.standard_normal(D))

x_p = mv.patchify(x, P)                                             # (B, N, P^2 C), lesson 03
z = x_p @ E + b                                                     # (B, N, D)
lesson.say(f"x {tuple(x.shape)} -> x_p {tuple(x_p.shape)} -> x_p E + b {tuple(z.shape)}",
           f"E has {E.size:,} weights and b {b.size}: {E.size + b.size:,} parameters, "
           f"whatever the image size")

r, s = 5, 9                                                         # one patch, by hand
i = r * (x.shape[3] // P) + s
patch = x.data[0, :, r * P:(r + 1) * P, s * P:(s + 1) * P].transpose(1, 2, 0).reshape(-1)
lesson.same(f"row {i} of z is patch (row {r}, col {s}) flattened, times E, plus b",
            z.data[0, i], patch @ E.data + b.data)

# --- 2. The library's version, and the convolution -------------------------------------------
lesson.same("x_p E + b equals mv.patch_embed(x, E, b, P)", z, mv.patch_embed(x, E, b, P))
conv = mv.conv2d(x, E.reshape(P, P, C, D), b, stride=P)            # (B, D, H/P, W/P)
lesson.say(f"conv2d with a {P}x{P} kernel and stride {P}: {tuple(conv.shape)}: D maps on the "
           f"{conv.shape[2]}x{conv.shape[3]} grid; flattened over the grid -> (B, N, D)")
lesson.same("x_p E + b equals a convolution with kernel = stride = P",
            z, conv.reshape(1, D, -1).transpose(0, 2, 1))

# --- 3. Figure: four hand-made columns of E as filters, and what they see ---------------------
ramp = np.linspace(1, -1, P)
filters = {                                                         # each (P, P, C)
    "brightness": np.ones((P, P, C)),
    "left - right edge": np.broadcast_to(np.sign(ramp)[None, :, None], (P, P, C)),
    "top - bottom edge": np.broadcast_to(np.sign(ramp)[:, None, None], (P, P, C)),
    "red - blue": np.broadcast_to(np.array([1.0, 0.0, -1.0]), (P, P, C)),
}
E4 = mv.tensor(np.stack([f.reshape(-1) for f in filters.values()], axis=1) / (P * P))
maps = mv.patch_embed(x, E4, None, P).numpy()[0]                    # (N, 4)
grid = x.shape[2] // P
fig = plt.figure(figsize=(14, 4.3))
gs = fig.add_gridspec(2, 5, width_ratios=[1.5, 1, 1, 1, 1], height_ratios=[1, 3.6],
                      hspace=0.2, wspace=0.5)
ax = fig.add_subplot(gs[:, 0])
ax.imshow(x.numpy()[0].transpose(1, 2, 0))
ax.set(title=f"input {x.shape[2]}x{x.shape[3]}, P = {P}", xlabel="pixel column", ylabel="pixel row")
gap = np.full((P, 2), np.nan)
for k, (name, f) in enumerate(filters.items()):
    top = fig.add_subplot(gs[0, k + 1])
    top.imshow(np.concatenate([f[:, :, 0], gap, f[:, :, 1], gap, f[:, :, 2]], axis=1),
               cmap="RdBu_r", vmin=-1, vmax=1)
    top.set_title(f"column E[:, {k}]: {name}\nas a {P}x{P}x{C} filter", fontsize=9)
    top.set_xticks([P / 2, 1.5 * P + 2, 2.5 * P + 4], ["R", "G", "B"])
    top.set_yticks([])
    bottom = fig.add_subplot(gs[1, k + 1])
    m = maps[:, k].reshape(grid, grid)
    lim = np.abs(m).max()
    im = bottom.imshow(m, cmap="gray" if k == 0 else "RdBu_r",
                       vmin=0 if k == 0 else -lim, vmax=lim)
    bottom.set_title(f"output {k} of x_p E, per patch", fontsize=9)
    bottom.set_xlabel("patch column", fontsize=8)
    bottom.set_ylabel("patch row", fontsize=8, labelpad=1)
    bottom.set_xticks(range(0, grid, 4)), bottom.set_yticks(range(0, grid, 4))
    bottom.tick_params(labelsize=7)
    fig.colorbar(im, ax=bottom, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
fig.suptitle("Each column of E is a filter; x_p E applies it to every patch "
             "(red = positive, blue = negative)", fontsize=11)
lesson.figure(fig, "patch_embedding_filters.png")

# --- 4. Gradient checks, on a small float64 problem ------------------------------------------
xs = mv.tensor(rng.standard_normal((2, 3, 8, 8)), requires_grad=True)          # P = 4: N = 4
Es = mv.tensor(rng.standard_normal((4 * 4 * 3, 5)), requires_grad=True)        # D = 5
bs = mv.tensor(rng.standard_normal(5), requires_grad=True)
lesson.gradcheck("x_p E + b with respect to x, E and b",
                 lambda x, E, b: mv.patchify(x, 4) @ E + b, xs, Es, bs)
lesson.gradcheck("the convolution route (conv2d, kernel = stride = 4)",
                 lambda x, E, b: mv.conv2d(x, E.reshape(4, 4, 3, 5), b, stride=4), xs, Es, bs)
lesson.finish()
