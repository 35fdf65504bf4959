"""Inside the Vision Transformer: what a trained one has learned (Sec. 4.5, Fig. 6-7).

The paper looks inside a trained ViT four ways, and this lesson builds each from the
weights and the attention by hand, then compares it with minivit.inspection:

  1. attention maps A_l (Eq. 6): from each block's own LayerNorm and U_qkv;
  2. attention rollout (Appendix D.8): R = A'_L ... A'_1 with A'_l = the head-mean of
     A_l plus the identity (the residual path), rows renormalised -- how much the
     output [CLS] token draws on each patch (Fig. 6);
  3. mean attention distance (Appendix D.7): sum_j A[i, j] * dist(i, j) in pixels,
     averaged over query patches and images -- how far each head looks (Fig. 7 right);
  4. position-embedding similarity (Fig. 7 centre) and the principal components of the
     patch embedding E (Fig. 7 left).

The model is trained here in seconds on a task where *where* matters: each 24 x 24
image holds one blob in noise, and its label is which of the 3 x 3 regions of the image
holds the blob's centre (9 classes).  A patch showing a blob means a different class
depending on where it is, so the position embeddings must learn the layout of the
6 x 6 patch grid.  They start as random vectors with no 2D structure; after training,
nearby patches have similar embeddings -- the structure of Fig. 7 (centre), learned
from nothing but the labels.
"""
import math
import time

import matplotlib.pyplot as plt
import numpy as np

from common import Lesson, train_steps

import minivit as mv
from minivit import inspection
from minivit.optim import AdamW

lesson = Lesson("16", "inside the Vision Transformer", __doc__)
SIZE, P, G = 24, 4, 6                   # 24 x 24 images, 4 x 4 patches, a 6 x 6 grid


def make_blobs(n, seed):
    """n images (n, 3, 24, 24): a coloured Gaussian blob (sigma 1.5 px) at a random place,
    plus noise; label = 3 * (region row) + (region column) of the blob's centre."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0, SIZE, (2, n, 1, 1))
    row, col = np.mgrid[:SIZE, :SIZE] + 0.5
    blob = np.exp(-((row - cy) ** 2 + (col - cx) ** 2) / (2 * 1.5 ** 2))        # (n, S, S)
    colour = rng.uniform(0.4, 1.0, (n, 3, 1, 1))
    images = colour * blob[:, None] + 0.1 * rng.standard_normal((n, 3, SIZE, SIZE))
    labels = (cy[:, 0, 0] * 3 // SIZE) * 3 + cx[:, 0, 0] * 3 // SIZE
    return images.astype("float32"), labels.astype(int)


def grid_correlation(similarity):
    """Correlation, over pairs of different patches, between the cosine similarity of their
    position embeddings and their distance on the grid: about 0 for random embeddings,
    clearly negative when nearby patches have similar embeddings."""
    distance = inspection.patch_distances(G, 1).reshape(similarity.shape)
    other = distance > 0
    return np.corrcoef(similarity[other], distance[other])[0, 1]


def mosaic(similarity):
    """(g, g, g, g) -> one image: a g x g map for each patch, a NaN line between them."""
    g = similarity.shape[0]
    tiles = np.full((g, g, g + 1, g + 1), np.nan)
    tiles[:, :, :g, :g] = similarity
    return tiles.transpose(0, 2, 1, 3).reshape(g * (g + 1), g * (g + 1))[:-1, :-1]


config = mv.nn.ViTConfig(image_size=SIZE, patch_size=P, num_classes=9, hidden_size=32,
                         depth=2, num_heads=4, mlp_dim=64)
model = mv.nn.VisionTransformer(config, seed=0)
similarity_at_init = inspection.position_embedding_similarity(model)

# --- training -------------------------------------------------------------------------------
train_x, train_y = make_blobs(2048, seed=0)
test_x, test_y = make_blobs(512, seed=1)
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
steps = 300
lesson.say(model.describe(), "",
           f"Training on {len(train_x)} blob images for {steps} steps of 64 (AdamW, warm-up "
           f"+ cosine) ...")
start = time.perf_counter()
train_steps(model, optimizer, train_x, train_y, steps, batch_size=64)   # lesson 13's loop
model.eval()
with mv.no_grad():
    accuracy = mv.accuracy(model(mv.tensor(test_x)), test_y)
lesson.say(f"   {time.perf_counter() - start:.1f} s; held-out accuracy {accuracy:.1%} "
           f"(chance: 1/9 = 11%)")
lesson.expect("the model has learned where the blob is: held-out accuracy above 60%",
              accuracy > 0.6, f"{accuracy:.1%}")

x = test_x[:64]
library_maps = inspection.attention_maps(model, x)

# --- 1. attention maps, from each block's own parts -------------------------------------------
lesson.say("", "1. Attention maps: y = LN(z), [q, k, v] = y U_qkv + b, A = softmax(q k^T / "
               "sqrt(D_h)) per head,", "   computed from each block's norm1 and attn.qkv while "
               "z steps through the blocks:")
H, D = config.num_heads, config.hidden_size
d = D // H
maps, block_outputs_agree = [], True
with mv.no_grad():
    z = model.embed(mv.tensor(x))                                 # z_0 (Eq. 1), (B, T, D)
    for block in model.blocks:
        B, T, _ = z.shape
        xp = mv.backend.array_module(z.data)
        qkv = block.attn.qkv(block.norm1(z)).data                  # (B, T, 3D)
        q, k, v = (qkv[..., s * D:(s + 1) * D].reshape(B, T, H, d).transpose(0, 2, 1, 3)
                   for s in range(3))                              # (B, heads, T, D_h)
        scores = q @ k.swapaxes(-1, -2) / math.sqrt(d)
        e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        A = e / e.sum(axis=-1, keepdims=True)                      # (B, heads, T, T)
        maps.append(A)
        # finish the block from this A (Eq. 2-3): it must give the block's own output
        heads = (A @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
        z_mid = z + block.attn.out(mv.Tensor(heads))
        by_hand = z_mid + block.mlp(block.norm2(z_mid))
        z = block(z)
        block_outputs_agree &= bool(xp.allclose(by_hand.data, z.data, rtol=1e-5, atol=1e-5))
for l, (mine, theirs) in enumerate(zip(maps, library_maps)):
    lesson.same(f"block {l + 1}: A by hand equals inspection.attention_maps", mine, theirs,
                rtol=1e-5, atol=1e-6)
lesson.expect("these are the weights the model uses: z + MSA + MLP rebuilt from A equals "
              "block(z)", block_outputs_agree)

# --- 2. attention rollout -----------------------------------------------------------------------
lesson.say("", "2. Rollout: per block A' = mean over heads of A, plus I, rows renormalised; "
               "R = A'_L ... A'_1:")
xp = mv.backend.array_module(maps[0])
R = xp.eye(maps[0].shape[-1], dtype=maps[0].dtype)
for A in maps:
    A_res = A.mean(axis=1) + xp.eye(A.shape[-1], dtype=A.dtype)     # attention + residual
    A_res = A_res / A_res.sum(axis=-1, keepdims=True)
    R = A_res @ R                                                   # the newer block on the left
rollout = inspection.attention_rollout(library_maps)
lesson.same("rollout by hand equals inspection.attention_rollout", R, rollout,
            rtol=1e-5, atol=1e-6)
to_patches = rollout[:, 0, 1:].reshape(-1, G, G)                    # [CLS] -> the 36 patches
blob_patch = test_x[:64].max(axis=1).reshape(64, G, P, G, P).max(axis=(2, 4))
hits = (to_patches.reshape(64, -1).argmax(1) == blob_patch.reshape(64, -1).argmax(1)).mean()
lesson.say(f"   the patch [CLS] draws on most is the blob's brightest patch in {hits:.0%} "
           f"of 64 held-out images")

# --- 3. mean attention distance -------------------------------------------------------------------
lesson.say("", "3. Mean attention distance: for each query patch i, sum_j A[i, j] * dist(i, j), "
               "dist the distance", "   of the patch centres in pixels; [CLS] left out; averaged "
               "over patches and images:")
patch = np.arange(G * G)
r, c = patch // G, patch % G
dist = P * np.sqrt((r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2)   # (N, N)
dist = mv.backend.to_device(dist, mv.backend.device_of(maps[0])).astype(maps[0].dtype)
mine = xp.stack([(A[:, :, 1:, 1:] * dist).sum(axis=-1).mean(axis=(0, 2)) for A in maps])
distance = inspection.mean_attention_distance(library_maps, P)
lesson.same("distance by hand equals inspection.mean_attention_distance", mine, distance,
            rtol=1e-5, atol=1e-5)
uniform = dist.mean().item() * G * G / (G * G + 1)
for l, row_ in enumerate(distance):
    lesson.say(f"   block {l + 1}: heads at " + ", ".join(f"{v:.1f}" for v in row_)
               + f" px (attention spread evenly: {uniform:.1f} px)")

# --- 4. position embeddings and the patch embedding ---------------------------------------------
lesson.say("", "4. Position embeddings: cosine similarity of the embedding of each patch with "
               "all others:")
E = model.pos_embed.data[0, 1:]                                      # (N, D), [CLS] left out
norms = xp.sqrt((E * E).sum(axis=1, keepdims=True))
cosine = (E @ E.T) / (norms * norms.T)
similarity = inspection.position_embedding_similarity(model)
lesson.same("similarity by hand equals inspection.position_embedding_similarity",
            cosine.reshape(G, G, G, G), similarity, rtol=1e-5, atol=1e-6)
before, after = grid_correlation(similarity_at_init), grid_correlation(similarity)
lesson.say(f"   correlation of similarity with grid distance: {before:+.2f} at initialisation, "
           f"{after:+.2f} after training")
lesson.expect("2D structure emerges: nearby patches get similar position embeddings",
              abs(before) < 0.2 and after < -0.4, f"{before:+.2f} -> {after:+.2f}")

lesson.say("", "   Patch embedding E (48 x 32): its 32 filters are 4 x 4 x 3 pictures; their "
               "principal components,", "   from the eigenvectors of the filters' covariance "
               "(the library uses an SVD):")
F = mv.backend.to_numpy(model.patch_embed.kernel.data).T.astype(np.float64)   # (D, P*P*C)
F = F - F.mean(axis=0)
values, vectors = np.linalg.eigh(F.T @ F)                                       # ascending
k = 8
components = vectors[:, ::-1][:, :k].T
components *= np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])[:, None]
filters = inspection.embedding_filters(model, k)
lesson.same("principal components by hand equal inspection.embedding_filters",
            components, filters.reshape(k, -1), rtol=1e-3, atol=1e-4)

# --- figures ------------------------------------------------------------------------------------
fig, axes = plt.subplots(2, 6, figsize=(13, 4.8))
for i in range(6):
    picture = np.clip(test_x[i].transpose(1, 2, 0), 0, 1)
    axes[0, i].imshow(picture)
    axes[0, i].set_title(f"label {test_y[i]}", fontsize=9)
    axes[1, i].imshow(picture)
    axes[1, i].imshow(to_patches[i], cmap="inferno", alpha=0.65,
                      extent=(-0.5, SIZE - 0.5, SIZE - 0.5, -0.5),
                      interpolation="bilinear")
    for ax in axes[:, i]:
        ax.axis("off")
axes[1, 0].set_title("rollout of [CLS]", fontsize=9)
fig.suptitle("Attention rollout (Fig. 6): where the output token looks")
lesson.figure(fig, "attention_rollout.png")

fig, axes = plt.subplots(1, 2, figsize=(11, 5))
for ax, s, title in ((axes[0], similarity_at_init, f"at initialisation (r = {before:+.2f})"),
                     (axes[1], similarity, f"after {steps} steps (r = {after:+.2f})")):
    shown = ax.imshow(mosaic(s), cmap="viridis", vmin=-1, vmax=1)
    ax.set(title=title, xlabel="patch column", ylabel="patch row", xticks=[], yticks=[])
fig.colorbar(shown, ax=axes, label="cosine similarity")
fig.suptitle("Position-embedding similarity (Fig. 7 centre): each small map is one patch "
             "against all 36")
lesson.figure(fig, "position_embedding_similarity.png")

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
for h in range(H):
    left.plot(np.arange(1, config.depth + 1), distance[:, h], "o", label=f"head {h + 1}")
left.axhline(uniform, color="k", ls="--", lw=1, label="uniform attention")
left.set(xlabel="block", ylabel="mean attention distance (px)", xticks=[1, 2],
         ylim=(0, 1.3 * max(uniform, distance.max())), title="Fig. 7 right")
left.legend(fontsize=7, ncol=2)
for i, f in enumerate(filters):
    ax = right.inset_axes([i / k, 0.2, 0.9 / k, 0.6])
    ax.imshow((f - f.min()) / (f.max() - f.min()))
    ax.axis("off")
right.axis("off")
right.set_title(f"Fig. 7 left: the first {k} principal components of E")
lesson.figure(fig, "attention_distance_and_filters.png")

lesson.finish()
