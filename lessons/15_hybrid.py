"""The hybrid: tokens from a CNN's feature map (Sec. 3.1, "Hybrid Architecture").

    "As an alternative to raw image patches, the input sequence can be formed from
    feature maps of a CNN.  In this hybrid model, the patch embedding projection E
    (Eq. 1) is applied to patches extracted from a CNN feature map.  As a special case,
    the patches can have spatial size 1x1, which means that the input sequence is
    obtained by simply flattening the spatial dimensions of the feature map and
    projecting to the Transformer dimension."

So only the input of Eq. 1 changes.  A ResNet (lesson 14's root block, then stages of
bottleneck units) turns images (B, C, H, W) into a feature map F (B, C', h, w); F is cut
into P x P patches exactly as lesson 03 cut the image, N = hw / P^2 of them, each
P^2 C' values, and E is (P^2 C') x D.  With P = 1 a token is the C'-vector of one
position of F, and x_p E is a 1x1 convolution.  Everything after Eq. 1 -- [CLS], E_pos,
the L encoder blocks, the head -- is the same code.

What changes, at 224 px:  R50 (3 stages) halves the image 4 times: a 14 x 14 map of
1024 channels, 196 tokens as for ViT-B/16.  R26 (4 stages): 7 x 7 and 2048 channels, as
many tokens as a /32 ViT.  The root alone (R+Ti/16): 56 x 56 x 64, cut into 8 x 8
patches: 7 x 7.  The parameter count gains the ResNet's kernels and GroupNorms, and E
becomes P^2 C' x D.  On CIFAR's 32 x 32 images the root alone gives an 8 x 8 map: 64
tokens, as many as cifar-tiny's 4 x 4 patches ("cifar-hybrid").
"""
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np

import minivit as mv
from common import Lesson
from minivit.nn.resnet import count_stem_parameters, resnet_width

lesson = Lesson("15", "the hybrid", __doc__)
rng = np.random.default_rng(0)

# --- 1. A feature map as a grid of 1x1 patches ------------------------------------------
model = mv.nn.VisionTransformer("cifar-hybrid", seed=0).astype("float64")
c = model.config
yy, xx = np.mgrid[0:32, 0:32] / 32
image = np.stack([0.3 + 0.4 * xx] * 3)                              # a ramp, a disc, a square
image[:, (xx - 0.35) ** 2 + (yy - 0.4) ** 2 < 0.18 ** 2] = [[0.9], [0.2], [0.1]]
image[:, (abs(xx - 0.72) < 0.14) & (abs(yy - 0.68) < 0.14)] = [[0.1], [0.3], [0.9]]
images = mv.tensor(np.stack([image, image[:, ::-1]]) * 2 - 1)       # two images, (2, 3, 32, 32)

F = model.resnet(images)                                            # (B, C', h, w)
tokens = mv.patchify(F, 1)                                          # (B, hw, C')
lesson.say(f"1. cifar-hybrid: images {tuple(images.shape)} -> the root block -> feature map "
           f"{tuple(F.shape)} -> 1x1 patches {tuple(tokens.shape)}")
r, s = 5, 2
lesson.same(f"token {r * 8 + s} is the {F.shape[1]} channels of F at row {r}, column {s}",
            tokens[:, r * 8 + s], F[:, :, r, s])
E, b = model.patch_embed.kernel, model.patch_embed.bias             # (C', D), (D,)
z = tokens @ E + b
conv = mv.conv2d(F, E.reshape(1, 1, c.embed_channels, c.hidden_size), b)   # (B, D, 8, 8)
lesson.same("x_p E + b with 1x1 patches == a 1x1 convolution of F, flattened",
            z, conv.reshape(2, c.hidden_size, 64).transpose(0, 2, 1))
pure = mv.patchify(images, 4)
lesson.say(f"   cifar-tiny cuts the image itself into 4x4 patches: {tuple(pure.shape)}; "
           f"the same 64 tokens, of {pure.shape[2]} pixel values instead of "
           f"{tokens.shape[2]} learned channels")

# --- 2. Tokens and parameters ---------------------------------------------------------
lesson.say("", "2. Pure ViTs and their hybrids (224 px and 1000 classes; CIFAR: 32 px, 10):",
           f"   {'model':<13}{'stem':<15}{'feature map':>15}{'P':>3}{'tokens':>7}"
           f"{'stem':>12}{'E':>11}{'total':>13}")
pairs = [("B/16", "R50+B/16"), ("B/32", "R26+B/32"), ("L/32", "R50+L/32"),
         ("Ti/16", "R+Ti/16"), ("cifar-tiny", "cifar-hybrid")]
counts = {}
for names in pairs:
    for name in names:
        k = mv.nn.preset(name)
        stem = (count_stem_parameters(k.in_channels, resnet_width(k.width_factor),
                                      k.resnet_layers) if k.hybrid else 0)
        embed = k.patch_size ** 2 * k.embed_channels * k.hidden_size + k.hidden_size
        counts[name] = total = mv.nn.count_parameters(k)
        stem_name = "-" if not k.hybrid else f"ResNet {k.resnet_layers}" if k.resnet_layers \
            else "root alone"
        grid = f"{k.feature_size}x{k.feature_size}x{k.embed_channels}"
        lesson.say(f"   {name:<13}{stem_name:<15}{grid:>15}{k.patch_size:>3}{k.num_patches:>7}"
                   f"{stem:>12,}{embed:>11,}{total:>13,}")
    a, h = (mv.nn.preset(n) for n in names)
    if names[1] != "R+Ti/16":
        lesson.expect(f"{names[1]} has as many tokens as {names[0]}",
                      a.num_tokens == h.num_tokens, f"{h.num_tokens}")
lesson.say("   R+Ti/16, despite its name, reads 7x7 = 49 tokens at 224 px, not 196: the root's",
           "   conv and pool divide by 4 and the 8x8 patches by 8 more (the official config's",
           "   comment says the stem 'downscales 2x, making /16'; its max pool halves once more).")
lesson.expect("R+Ti/16: 49 patches and exactly 6,337,704 parameters (the official count, "
              "which holds for 50 position embeddings only)",
              mv.nn.preset("R+Ti/16").num_patches == 49 and counts["R+Ti/16"] == 6_337_704)
lesson.expect("R50+ViT-B/16 has exactly 98,659,112 parameters (the official count)",
              counts["R50+B/16"] == 98_659_112)
lesson.say(f"   R50 adds {counts['R50+B/16'] - counts['B/16']:,} parameters to ViT-B/16; the "
           f"Transformer itself is unchanged.")

# --- 3. The same encoder ---------------------------------------------------------------
lesson.say("", "3. The hybrid, assembled by hand from the stem and Eq. 1-4:")


def hybrid_by_hand(images, model):
    F = model.resnet(images)                                         # the CNN
    x_p = mv.patchify(F, model.config.patch_size)                    # patches of F, not of x
    z = x_p @ model.patch_embed.kernel + model.patch_embed.bias      # Eq. 1, unchanged on
    cls = model.cls_token.broadcast_to((images.shape[0], 1, z.shape[2]))
    z = mv.concatenate([cls, z], axis=1) + model.pos_embed
    for block in model.blocks:                                       # Eq. 2-3
        z = block(z)
    y = mv.layer_norm(z[:, 0], model.norm.scale, model.norm.bias)    # Eq. 4
    return y @ model.head.weight + model.head.bias


for p in model.parameters():             # the head starts at zero: move everything a little
    p.data += mv.tensor(0.05 * rng.standard_normal(p.shape)).data
logits = hybrid_by_hand(images, model)
lesson.same("lesson hybrid == mv.nn.VisionTransformer('cifar-hybrid')", logits, model(images))
vit = mv.nn.VisionTransformer(replace(c, resnet_layers=None, image_size=c.feature_size,
                                      in_channels=c.embed_channels)).astype("float64")
vit.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("resnet.")})
lesson.same("a pure ViT whose 'image' is the 8x8x32 feature map, same weights, same logits",
            vit(model.resnet(images)), logits)

# --- 4. Gradient check of a tiny hybrid ------------------------------------------------
tiny = mv.nn.ViTConfig(image_size=16, patch_size=2, in_channels=1, num_classes=3,
                       hidden_size=4, depth=1, num_heads=1, mlp_dim=4, resnet_layers=(),
                       width_factor=0.5)
small = mv.nn.VisionTransformer(tiny, seed=0).astype("float64")
for p in small.parameters():
    p.data += mv.tensor(0.1 * rng.standard_normal(p.shape)).data
pics = mv.tensor(rng.standard_normal((1, 1, 16, 16)), requires_grad=True)
root = small.resnet.conv_root.kernel
others = [p for p in small.parameters() if p is not root]
lesson.say("", f"4. A tiny hybrid: 16x16 images, the root alone at width 32 -> 4x4x32, 2x2 "
               f"patches -> {tiny.num_patches} tokens of D = {tiny.hidden_size}; "
               f"{small.num_parameters():,} parameters",
           f"   (the {root.size:,} weights of the root kernel were checked in lesson 14, in "
           f"the root block; here the images' gradient flows back through that kernel)")
lesson.gradcheck("tiny hybrid, wrt the images and every other parameter",
                 lambda x, *params: small(x), pics, *others)

# --- Figure: the same 64 tokens, from pixels or from the feature map --------------------
fig, axes = plt.subplots(1, 4, figsize=(15, 4), gridspec_kw={"width_ratios": [1, 1, 1.3, 1.3]})
axes[0].imshow(image.transpose(1, 2, 0))
axes[0].set_title("cifar-tiny: 4x4 patches of the image", fontsize=9)
axes[1].imshow(F.numpy()[0, 0], cmap="magma")
axes[1].set_title(f"cifar-hybrid: the root's 8x8 feature map\n(channel 0 of {c.embed_channels}); "
                  f"1x1 patches", fontsize=9)
for ax, step, size in ((axes[0], 4, 32), (axes[1], 1, 8)):
    for t in np.arange(-0.5, size, step):
        ax.axhline(t, color="w", lw=0.6), ax.axvline(t, color="w", lw=0.6)
    ax.set_xticks([]), ax.set_yticks([])
axes[2].imshow(pure.numpy()[0], aspect="auto", cmap="RdBu_r")
axes[2].set(title="x_p: 64 tokens x 48 pixel values", xlabel="value (row, column, channel)",
            ylabel="token")
axes[3].imshow(tokens.numpy()[0], aspect="auto", cmap="magma")
axes[3].set(title=f"x_p: 64 tokens x {c.embed_channels} channels of F", xlabel="channel",
            ylabel="token")
fig.suptitle("Same sequence length, different tokens: E then maps each row to D = "
             f"{c.hidden_size}, and the encoder is the same")
fig.tight_layout()
lesson.figure(fig, "hybrid_tokens.png")
lesson.finish()
