"""The [CLS] token and the position embeddings: the whole of Eq. 1.

    z_0 = [x_class; x_p^1 E; x_p^2 E; ...; x_p^N E] + E_pos,
          E in R^{(P^2 C) x D},   E_pos in R^{(N+1) x D}                        (Eq. 1)

Two learned additions turn the N patch embeddings of lesson 04 into the
Transformer's input:

[CLS]  A learned vector x_class of width D is put in front of the sequence, like
       BERT's [class] token.  It belongs to no patch; through attention it gathers
       from all of them, and its final state is the image representation,
       y = LN(z_L^0) (Eq. 4).  The sequence grows from N to N+1 tokens:
       for ViT-B/16 at 224 px, from 196 to 197 tokens of width D = 768.

E_pos  Attention treats its input as a set: shuffle the patches and every output is
       shuffled the same way.  So each position gets its own vector, added to the
       token there.  The paper learns them (1D, one per position, initialised with
       std 0.02 in the official code); its ablation (Appendix D.4) finds learned 2D
       and relative embeddings no better, and no embedding clearly worse.  A fixed
       choice, used by the later official big_vision code: 2D sin-cos,
       a quarter of the D features each sin(col w_k), cos(col w_k), sin(row w_k),
       cos(row w_k) at frequencies w_k = 10000^(-k / (D/4 - 1)).

The paper's Figure 7 (center) shows that learned embeddings end up encoding the 2D
grid: each patch's embedding is most similar to those of nearby patches, and of its
own row and column.  The figure below draws that map for sin-cos embeddings, which
have the property by construction, and for learned ones at initialisation, which do
not have it yet.
"""
import matplotlib.pyplot as plt
import numpy as np

import minivit as mv
from common import Lesson

lesson = Lesson("05", "[CLS] token and position embeddings", __doc__)
rng = np.random.default_rng(0)


def embed(x, E, b, x_class, E_pos, P):
    """z_0 of Eq. 1: (B, C, H, W) -> (B, N+1, D), from engine primitives."""
    tokens = mv.patchify(x, P) @ E + b                               # (B, N, D), lesson 04
    cls = mv.broadcast_to(x_class, (x.shape[0], 1, E.shape[1]))      # one copy per image
    return mv.concatenate([cls, tokens], axis=1) + E_pos             # (B, N+1, D)


def sincos_2d(grid, dim, temperature=10000.0):
    """Fixed 2D sin-cos embeddings of a grid x grid patch grid, (grid^2, dim)."""
    quarter = dim // 4
    w = 1.0 / temperature ** (np.arange(quarter) / (quarter - 1))    # from 1 down to 1/10000
    row, col = np.divmod(np.arange(grid * grid), grid)               # each patch's position
    x, y = np.outer(col, w), np.outer(row, w)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


# --- 1. The sequence at ViT-B/16 size: 196 patch tokens, then 197 ----------------------------
P, C, D, size = 16, 3, 768, 224
x = mv.tensor(rng.random((2, C, size, size)))                         # B = 2 images
E = mv.tensor(rng.standard_normal((P * P * C, D)) / np.sqrt(P * P * C))
b = mv.tensor(np.zeros(D))
x_class = mv.tensor(0.02 * rng.standard_normal((1, 1, D)))           # (official init: zeros)
N = (size // P) ** 2
E_pos = mv.tensor(0.02 * rng.standard_normal((1, N + 1, D)))         # learned, std 0.02

tokens = mv.patchify(x, P) @ E + b
z0 = embed(x, E, b, x_class, E_pos, P)
lesson.say(f"patch tokens x_p E + b: {tuple(tokens.shape)}   (N = {N} tokens of width D = {D})",
           f"[x_class; x_p E] + E_pos = z_0: {tuple(z0.shape)}   (N + 1 = {z0.shape[1]} tokens)",
           f"learned parameters: x_class {x_class.size:,}, E_pos {E_pos.size:,} "
           f"(= {N + 1} x {D})")
lesson.expect("the sequence grows from 196 to 197 tokens of width 768",
              tokens.shape[1:] == (196, 768) and z0.shape[1:] == (197, 768))
lesson.same("token 0 of every image is x_class + E_pos[0], the same for all images",
            z0[:, 0], mv.broadcast_to(x_class[:, 0] + E_pos[:, 0], (2, D)))
lesson.same("tokens 1..N are the patch embeddings plus E_pos[1:]", z0[:, 1:], tokens + E_pos[:, 1:])

# --- 2. Fixed 2D sin-cos embeddings: derived here, and the library's -------------------------
grid = size // P
table = sincos_2d(grid, D)
lesson.same("sincos_2d here equals mv.nn.sincos_2d_position_embedding",
            table, mv.nn.sincos_2d_position_embedding(grid, D))
learned = E_pos.numpy()[0, 1:]                                       # the N patch rows


# --- 3. Figure 7 (center) of the paper: cosine similarity between position embeddings ---------
def similarity_mosaic(pos, grid):
    """A grid x grid mosaic; tile (r, c) = cosine similarity of patch (r, c)'s embedding with
    every patch's, drawn at their positions (NaN lines between tiles)."""
    unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    sim = (unit @ unit.T).reshape(grid, grid, grid, grid)            # (r, c, r', c')
    tile = grid + 1
    mosaic = np.full((grid * tile - 1, grid * tile - 1), np.nan)
    for r in range(grid):
        for c in range(grid):
            mosaic[r * tile:r * tile + grid, c * tile:c * tile + grid] = sim[r, c]
    return mosaic, sim


fig, axes = plt.subplots(1, 2, figsize=(13.5, 5.6), gridspec_kw=dict(wspace=0.35))
panels = [("fixed 2D sin-cos", table), ("learned, at init (std 0.02)", learned)]
for ax, (name, pos) in zip(axes, panels):
    mosaic, sim = similarity_mosaic(pos, grid)
    im = ax.imshow(mosaic, cmap="viridis")                           # each panel its own range
    centres = np.arange(grid) * (grid + 1) + (grid - 1) / 2
    ax.set_xticks(centres[::2], range(1, grid + 1, 2))
    ax.set_yticks(centres[::2], range(1, grid + 1, 2))
    ax.set(xlabel="input patch column", ylabel="input patch row",
           title=f"{name}: each tile is one patch's\nsimilarity with all {grid * grid} positions")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
lesson.figure(fig, "position_embedding_similarity.png")
sim = similarity_mosaic(table, grid)[1]
lesson.say(f"sin-cos similarities span {sim.min():.2f}..1 (its slow frequencies barely change over "
           f"{grid} patches), so each panel has its own colour range")
lesson.expect("sin-cos: a patch is more similar to its neighbour than to a far patch",
              sim[7, 7, 7, 8] > sim[7, 7, 7, 13] and sim[7, 7, 8, 7] > sim[7, 7, 13, 7],
              f"{sim[7, 7, 7, 8]:.2f} (next column) vs {sim[7, 7, 7, 13]:.2f} (6 columns away)")

# --- 4. The model's embed() is the same computation --------------------------------------------
model = mv.nn.VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8,
                                depth=1, num_heads=2, mlp_dim=16).astype("float64")
model.cls_token.data = mv.tensor(rng.standard_normal((1, 1, 8))).data   # not zero, to be seen
xs = mv.tensor(rng.standard_normal((2, 3, 8, 8)))                     # N = 4 patches, D = 8
params = (model.patch_embed.kernel, model.patch_embed.bias, model.cls_token, model.pos_embed)
lesson.same("embed() here equals VisionTransformer.embed with its parameters",
            embed(xs, *params, 4), model.embed(xs))
model2 = mv.nn.VisionTransformer(image_size=32, patch_size=4, num_classes=3, hidden_size=16,
                                 depth=1, num_heads=2, mlp_dim=16, pos_embed="sincos2d")
lesson.same("its sincos2d buffer is [0 for CLS; sincos_2d]",
            model2.pos_embed[0], np.concatenate([np.zeros((1, 16)), sincos_2d(8, 16)]),
            rtol=1e-6, atol=1e-7)

# --- 5. Gradient check of z_0 with respect to E, b, x_class and E_pos ----------------------------
lesson.gradcheck("z_0 with respect to E, b, x_class and E_pos (D = 8, N = 4)",
                 lambda E, b, cls, pos: embed(xs, E, b, cls, pos, 4), *params)
lesson.finish()
